"""Config values checked by rule: each experiment lists its numeric keys with the range a run
can use, and `check` walks them, ending in one line naming the first key out of range.

A table rather than an `if` per key: a new key gets its rule in one line, and the comparisons
are written once, right for NaN (`nan <= 0` is False, so a bare `<= 0` test lets NaN through).
No JAX here: configs, `main` and the checks run before anything compiles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Number:
  """A finite number (an int when `integer`) within [lo, hi]; `open_lo`/`open_hi` exclude the
  bound. A tuple or list value must hold such numbers only (`model.projector`)."""

  lo: float | None = None
  hi: float | None = None
  open_lo: bool = False
  open_hi: bool = False
  integer: bool = False

  def accepts(self, value) -> bool:
    if isinstance(value, (tuple, list)):
      return all(self._scalar(v) for v in value)
    return self._scalar(value)

  def _scalar(self, v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      return False
    if self.integer and not isinstance(v, int):
      return False
    if not math.isfinite(v):
      return False
    if self.lo is not None and (v <= self.lo if self.open_lo else v < self.lo):
      return False
    if self.hi is not None and (v >= self.hi if self.open_hi else v > self.hi):
      return False
    return True

  def describe(self) -> str:
    kind = 'an integer' if self.integer else 'a finite number'
    if self.lo is not None and self.hi is not None:
      left, right = '(' if self.open_lo else '[', ')' if self.open_hi else ']'
      return f'{kind} in {left}{_num(self.lo)}, {_num(self.hi)}{right}'
    if self.lo is not None:
      return f'{kind} {">" if self.open_lo else ">="} {_num(self.lo)}'
    if self.hi is not None:
      return f'{kind} {"<" if self.open_hi else "<="} {_num(self.hi)}'
    return kind


def _num(x) -> str:
  return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE = Number(lo=0, open_lo=True)
NON_NEGATIVE = Number(lo=0)
UNIT = Number(lo=0, hi=1)  # a probability or a fraction
COUNT = Number(lo=1, integer=True)  # steps, sizes, widths: at least one
INDEX = Number(lo=0, integer=True)  # seeds, optional step counts: 0 allowed

# The augmentation every experiment runs on device (aacp_jax/augment_defaults.py).
AUGMENT_RULES = (
  ('augment.crop.area', Number(lo=0, hi=1, open_lo=True)),
  ('augment.crop.ratio', POSITIVE),
  ('augment.crop.margin', NON_NEGATIVE),
  ('augment.rotation.p', UNIT),
  ('augment.rotation.max_deg', NON_NEGATIVE),
  ('augment.translation.p', UNIT),
  ('augment.translation.max_frac', UNIT),
  ('augment.scale.p', UNIT),
  ('augment.scale.range', POSITIVE),
  ('augment.flip.p', UNIT),
  ('augment.elastic.p', UNIT),
  ('augment.elastic.alpha', NON_NEGATIVE),
  ('augment.elastic.sigma', NON_NEGATIVE),
  # Bilinear interpolation between control points needs two of them per axis.
  ('augment.elastic.grid', Number(lo=2, integer=True)),
  ('augment.elastic.inverse_iters', COUNT),
  ('augment.simclr.area', Number(lo=0, hi=1, open_lo=True)),
  ('augment.simclr.ratio', POSITIVE),
  ('augment.simclr.flip_p', UNIT),
  ('augment.brightness.p', UNIT),
  ('augment.brightness.max_delta', NON_NEGATIVE),
  ('augment.contrast.p', UNIT),
  ('augment.contrast.range', POSITIVE),
  ('augment.noise.p', UNIT),
  ('augment.noise.std', NON_NEGATIVE),
  ('augment.cutout.p', UNIT),
  ('augment.cutout.size', UNIT),
  ('augment.xray_scale', POSITIVE),
)


def get(config, key: str, default=_MISSING):
  """config's value at the dotted `key`; `default` (or a one-line KeyError) when absent."""
  node = config
  for part in key.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      if default is _MISSING:
        raise KeyError(f'config.{key}: no such key') from None
      return default
  return node


def check(config, rules: Iterable[tuple[str, Number]], *, optional: Iterable[str] = ()) -> None:
  """Each (key, rule) of `rules` holds for `config`, or a one-line ValueError names the key.

  Keys in `optional` may be absent (a config without that part); any other absent key is an
  error of the table itself (a KeyError), so a renamed key cannot silently go unchecked.
  """
  optional = set(optional)
  for key, rule in rules:
    value = get(config, key, None if key in optional else _MISSING)
    if value is None and key in optional:
      continue
    if not rule.accepts(value):
      every = 'every entry must be' if isinstance(value, (tuple, list)) else 'must be'
      raise ValueError(f'config.{key}={_show(value)}: {every} {rule.describe()}')


def check_finite(config, prefix: str = 'config') -> None:
  """No NaN or infinity anywhere in `config`: no key of these configs means anything with one
  (an "off" switch is 0, never inf), and NaN passes every comparison-based check."""
  for key, value in _leaves(config, prefix):
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f'{key}={value}: must be finite')


def _leaves(node, prefix: str) -> Iterable[tuple[str, Any]]:
  if hasattr(node, 'items'):
    for k, v in node.items():
      yield from _leaves(v, f'{prefix}.{k}')
  elif isinstance(node, (tuple, list)):
    for i, v in enumerate(node):
      yield from _leaves(v, f'{prefix}[{i}]')
  else:
    yield prefix, node


def _show(value) -> str:
  if isinstance(value, str):
    return repr(value)
  if isinstance(value, list):
    value = tuple(value)
  return str(value)
