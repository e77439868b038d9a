"""Pretraining methods by name: `config.method` is a module of this package defining `METHOD`.

A new method is one new module here (and a config variant that selects it); nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from aacp_jax.methods.base import LossFn, Method, RunInfo  # noqa: F401  (the interface)

_NOT_METHODS = ('base', 'terms')


def names() -> tuple[str, ...]:
  """Every method module of this package, sorted."""
  return tuple(
    sorted(
      m.name
      for m in pkgutil.iter_modules(__path__)
      if m.name not in _NOT_METHODS and not m.name.startswith('_')
    )
  )


def get(name: str) -> Method:
  """The `Method` named `name`; a one-line ValueError naming config.method otherwise."""
  known = names()
  if name not in known:
    raise ValueError(f'config.method={name!r}: expected one of {", ".join(known)}')
  return importlib.import_module(f'{__name__}.{name}').METHOD
