"""Salted subject hashes: the only form in which a patient id ever leaves a data_prep converter.

A plain hash of a patient id can be reversed by hashing every plausible id (MRNs are short numbers);
an HMAC keyed with a secret salt cannot, as long as the salt stays with the data owner. So the salt
comes from the command line or a file, is never written anywhere, and the manifest carries only a
slow fingerprint of it: enough to tell whether two runs used the same salt, too costly to search.
"""

from __future__ import annotations

import hashlib
import hmac
import os

MIN_SALT_BYTES = 16
_FINGERPRINT_ROUNDS = 200_000


def load_salt(salt: str | None = None, salt_file: str | None = None) -> bytes:
  """The salt from ``salt`` or the first line of ``salt_file`` (exactly one of them), as bytes."""
  if bool(salt) == bool(salt_file):
    raise ValueError(
      'give exactly one of --salt or --salt_file (a secret of >= 16 characters '
      'kept with the raw data; subjects are hashed with it)'
    )
  if salt_file:
    try:
      with open(salt_file, 'rb') as f:
        value = f.read().strip()
    except OSError as e:
      raise ValueError(f'--salt_file={salt_file}: unreadable ({e.strerror})') from None
    source = f'--salt_file={salt_file}'
  else:
    value = salt.strip().encode('utf-8')
    source = '--salt'
  if len(value) < MIN_SALT_BYTES:
    # Short salts can be searched; the message never echoes the value.
    raise ValueError(f'{source}: salt has {len(value)} bytes, need >= {MIN_SALT_BYTES}')
  return value


def subject_hash(salt: bytes, dataset: str, raw_id: str) -> str:
  """HMAC-SHA256 of ``dataset:raw_id`` keyed by ``salt``, 20 hex characters (80 bits).

  The dataset name is part of the message so that short ids (``1``, ``42``) of two datasets never
  collide into one subject.
  """
  if not raw_id:
    raise ValueError(f'{dataset}: empty subject id')
  msg = f'{dataset}:{raw_id}'.encode('utf-8')
  return hmac.new(salt, msg, hashlib.sha256).hexdigest()[:20]


def salt_fingerprint(salt: bytes) -> str:
  """A slow (PBKDF2) one-way fingerprint of the salt for the manifest; 16 hex characters."""
  return hashlib.pbkdf2_hmac('sha256', salt, b'aacp-salt-fingerprint', _FINGERPRINT_ROUNDS).hex()[
    :16
  ]


def split_unit(seed: int, dataset: str, raw_id: str) -> float:
  """A uniform number in [0, 1) per subject, fixed by ``seed``: the patient-level split draw.

  Deliberately independent of the salt, so two sites with different salts split a public dataset
  the same way; only split membership (a bit or two) depends on the raw id, and it is not written.
  """
  digest = hashlib.sha256(f'{seed}:{dataset}:{raw_id}'.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def random_salt() -> str:
  """A fresh 32-hex-character salt, for the README's `python -c` one-liner."""
  return os.urandom(16).hex()
