"""The code version of one dataset's shards: the package version plus a hash of the code that decides them.

``aacp_jax.version.code_version()`` hashes every file under ``data_prep`` and ``aacp_jax/data``, so an
edit to one converter would re-convert every dataset (its sidecars' fingerprints change). Here the
hash covers only what a dataset's bytes depend on: the runner and its worker side, and every project
module they or the dataset's module import, at any depth and inside functions too (the ops, the
codec, shared helpers such as ``volume_common``), read from the source, not from ``sys.modules``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os

from aacp_jax import version

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every dataset's bytes go through these (the plan, the worker, the shard writer they import).
RUNNER = ('data_prep.runner', 'data_prep.runner_shard')


def _path(module: str, root: str) -> str | None:
  base = os.path.join(root, *module.split('.'))
  for path in (base + '.py', os.path.join(base, '__init__.py')):
    if os.path.isfile(path):
      return path
  return None


def _imports(module: str, path: str, root: str) -> set[str]:
  """Project modules ``module`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  is_package = path.endswith('__init__.py')
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = module.split('.') if is_package else module.split('.')[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = '.'.join(parts + ([base] if base else []))
      names += [base] + [f'{base}.{a.name}' for a in node.names]
  found = set()
  for name in names:
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py too.
    parts = name.split('.')
    for i in range(1, len(parts) + 1):
      candidate = '.'.join(parts[:i])
      if candidate and _path(candidate, root):
        found.add(candidate)
  return found - {module}


def modules_for(dataset_module: str, root: str = _ROOT) -> list[str]:
  """The project modules (sorted) whose source decides the bytes ``dataset_module`` converts to."""
  seen, todo = set(), [*RUNNER, dataset_module]
  while todo:
    module = todo.pop()
    path = _path(module, root)
    if module in seen or path is None:
      continue
    seen.add(module)
    todo += sorted(_imports(module, path, root))
  return sorted(seen)


def digest(dataset_module: str, root: str = _ROOT) -> str:
  """``<__version__>+<12 hex of sha256 over modules_for(dataset_module)>``, read from ``root``."""
  h = hashlib.sha256()
  for module in modules_for(dataset_module, root):
    path = _path(module, root)
    with open(path, 'rb') as f:
      rel = os.path.relpath(path, root).replace(os.sep, '/')
      h.update(rel.encode() + b'\0' + f.read() + b'\0')
  return f'{version.__version__}+{h.hexdigest()[:12]}'


@functools.lru_cache(maxsize=None)
def code_version(dataset_module: str) -> str:
  """``digest`` of the installed tree, once per process (the sources do not change under a run)."""
  return digest(dataset_module)
