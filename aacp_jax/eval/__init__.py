"""Frozen-feature evaluation. `aacp_jax.eval.notebook` is the notebook API (load a pretrained
workdir, embed raw images, probe / k-NN / few-shot); `plots` and `clusters` draw and score
embeddings. They load lazily, so importing the package costs nothing (no JAX, no matplotlib).

Use `from aacp_jax.eval import notebook as nb` and then `nb.embed`, `nb.probe`, `nb.knn`,
`nb.few_shot`: those names are also this package's submodules (embed.py, probe.py, ...), so
only the unambiguous ones are re-exported here.
"""

import importlib

_LAZY = ('notebook', 'plots', 'clusters')
_NOTEBOOK = ('load_pretrained', 'encoder', 'Pretrained')


def __getattr__(name):
  if name in _LAZY:
    return importlib.import_module(f'{__name__}.{name}')
  if name in _NOTEBOOK:
    return getattr(importlib.import_module(f'{__name__}.notebook'), name)
  if name == 'load_split':
    return importlib.import_module(f'{__name__}.embed').load_split
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
