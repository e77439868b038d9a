"""The package version, and `code_version`: what a manifest or results row records as its code."""

import functools
import hashlib
import os

__version__ = '0.1.0'

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The code that decides the bytes a shard holds: the record codec and vocabularies, the phantoms,
# and every converter. A change anywhere here changes `code_version`.
_DATA_CODE = (os.path.join('aacp_jax', 'data'), 'data_prep')


@functools.lru_cache(maxsize=1)
def code_version() -> str:
  """`<__version__>+<12 hex of sha256 over the data code>`, e.g. '0.1.0+3f2a9c1b0d4e'.

  One meaning everywhere (prep manifests, phantom manifests and their cache key): the package
  version plus a hash of the source files that decide the output bytes, so a record can be
  traced to its code without git (installed copies have no repository).
  """
  h = hashlib.sha256()
  paths = []
  for top in _DATA_CODE:
    for folder, _, names in sorted(os.walk(os.path.join(_ROOT, top))):
      paths += [
        os.path.relpath(os.path.join(folder, n), _ROOT) for n in sorted(names) if n.endswith('.py')
      ]
  for rel in sorted(paths):
    with open(os.path.join(_ROOT, rel), 'rb') as f:
      h.update(rel.encode() + b'\0' + f.read() + b'\0')
  return f'{__version__}+{h.hexdigest()[:12]}'
