"""File digests: shards and checkpoints record them at write and check them at read."""

import hashlib


def sha256_file(path: str) -> str:
  """The sha256 hex digest of a file, read in 1 MiB blocks (shards and checkpoints are GiB-sized)."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()
