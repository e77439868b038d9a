"""The one record codec: msgpack + raw numpy bytes, never pickle.

Wire format (little-endian)::

    b'AACR' | uint16 version | uint32 crc32(payload) | uint64 len(payload) | payload

``payload`` is a msgpack map of the record; arrays travel as ``{'__nd__': dtype.str, 'shape': [...],
'data': raw bytes}``. The fixed header lets every kind of damage give a precise error: a foreign blob
fails the magic, a newer writer fails the version, truncation fails the length, and any flipped
payload byte fails the CRC before msgpack ever parses it.

The schema (see docs/INTERFACES.md) is checked on both sides: ``encode`` refuses to write a bad record
and ``decode`` refuses to return one, so training code can trust what it reads.
"""

from __future__ import annotations

import struct
from typing import Any
import zlib

import msgpack
import numpy as np

from aacp_jax.data import landmarks as lm
from aacp_jax.modalities import IN_CHANNELS, MODALITIES, RAW_DTYPES

VERSION = 1
_MAGIC = b'AACR'
_HEADER = struct.Struct('<4sHIQ')
# Per modality: (image dtype, channel count), from aacp_jax.modalities (MODALITIES re-exported).
IMAGE_SPEC = {m: (RAW_DTYPES[m], IN_CHANNELS[m]) for m in MODALITIES}
_STR_KEYS = ('modality', 'region', 'source', 'subject')
REQUIRED_KEYS = (
  'image',
  'spacing',
  'landmarks',
  'landmark_visible',
  'landmarks_canonical',
  'organs',
) + _STR_KEYS
# label: one class index; labels: multi-label findings (-1 uncertain, 0 negative or not mentioned,
# 1 positive; names in the manifest's label_names); target: a regression value (e.g. bone age in months);
# landmark_confidence: the frozen detector's per-landmark confidence in [0, 1].
OPTIONAL_KEYS = ('mask', 'label', 'labels', 'target', 'landmark_confidence')
# Object, string and complex dtypes cannot round-trip through raw bytes safely.
_ARRAY_KINDS = 'biuf'


class RecordError(ValueError):
  """A record that breaks the schema or bytes that are not a valid record; the message is one line."""


def _fail(where: str, key: str, what: str):
  raise RecordError(f'{where or "record"}: {key!r} {what}')


def _pack_array(a: np.ndarray) -> dict:
  if a.dtype.kind not in _ARRAY_KINDS:
    raise RecordError(f'cannot encode dtype {a.dtype}')
  # Not np.ascontiguousarray: it turns 0-d arrays (labels) into shape (1,).
  a = a.astype(a.dtype.newbyteorder('<'), order='C', copy=False)
  return {'__nd__': a.dtype.str, 'shape': list(a.shape), 'data': a.tobytes()}


def _unpack_array(obj: dict, key: str, where: str) -> np.ndarray:
  try:
    dtype = np.dtype(obj['__nd__'])
    shape = tuple(int(s) for s in obj['shape'])
    data = obj['data']
  except (KeyError, TypeError, ValueError) as e:
    _fail(where, key, f'is a malformed array ({e})')
  if dtype.kind not in _ARRAY_KINDS:
    _fail(where, key, f'has unsupported dtype {dtype}')
  if len(data) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
    _fail(where, key, f'holds {len(data)} bytes, not {dtype} {shape}')
  # Copy so callers get writable, native-order arrays independent of the msgpack buffer.
  return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder('='))


def encode(record: dict[str, Any]) -> bytes:
  """Validates ``record`` and returns its bytes (deterministic: same record, same bytes)."""
  validate(record, where='encode')
  obj = {}
  for key in sorted(record):
    value = record[key]
    obj[key] = value if isinstance(value, str) else _pack_array(np.asarray(value))
  payload = msgpack.packb(obj, use_bin_type=True)
  return _HEADER.pack(_MAGIC, VERSION, zlib.crc32(payload), len(payload)) + payload


def decode(data: bytes, *, where: str = '') -> dict[str, Any]:
  """Bytes from ``encode`` -> validated record; any damage raises a one-line ``RecordError``."""
  where = where or 'record'
  data = bytes(data)
  if len(data) < _HEADER.size:
    _fail(where, 'header', f'is truncated ({len(data)} bytes)')
  magic, version, crc, size = _HEADER.unpack_from(data)
  if magic != _MAGIC:
    _fail(where, 'header', f'has magic {magic!r}, not an aacp record')
  if version != VERSION:
    _fail(where, 'version', f'is {version}; this code reads version {VERSION}')
  payload = data[_HEADER.size :]
  if len(payload) != size:
    _fail(where, 'payload', f'is truncated or padded ({len(payload)} of {size} bytes)')
  if zlib.crc32(payload) != crc:
    _fail(where, 'payload', 'fails its CRC32 check (corrupt bytes)')
  try:
    obj = msgpack.unpackb(payload, raw=False)
  except Exception as e:  # pylint: disable=broad-except  # msgpack raises many unrelated types.
    _fail(where, 'payload', f'is not valid msgpack ({type(e).__name__})')
  if not isinstance(obj, dict):
    _fail(where, 'payload', 'is not a map')
  record = {}
  for key, value in obj.items():
    record[key] = _unpack_array(value, key, where) if isinstance(value, dict) else value
  validate(record, where=where)
  return record


def _check_array(record, key, where, dtype, shape):
  """Checks dtype and shape; ``None`` entries of ``shape`` match any size."""
  a = record[key]
  if not isinstance(a, np.ndarray):
    _fail(where, key, f'is {type(a).__name__}, not a numpy array')
  if a.dtype != dtype:
    _fail(where, key, f'has dtype {a.dtype}, expected {np.dtype(dtype)}')
  if a.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, a.shape)):
    want = ', '.join('*' if s is None else str(s) for s in shape)
    _fail(where, key, f'has shape {a.shape}, expected ({want})')
  return a


def validate(record: dict[str, Any], *, where: str = '') -> None:
  """Raises ``RecordError`` naming ``where`` and the first offending key; returns None if valid."""
  where = where or 'record'
  if not isinstance(record, dict):
    raise RecordError(f'{where}: record is {type(record).__name__}, not a dict')
  for key in REQUIRED_KEYS:
    if key not in record:
      _fail(where, key, 'is missing')
  for key in record:
    if key not in REQUIRED_KEYS + OPTIONAL_KEYS:
      _fail(where, key, 'is not a record key (see docs/INTERFACES.md)')
  for key in _STR_KEYS:
    if not isinstance(record[key], str) or not record[key]:
      _fail(where, key, 'must be a non-empty string')
  modality = record['modality']
  if modality not in IMAGE_SPEC:
    _fail(where, 'modality', f'is {modality!r}, expected one of {MODALITIES}')
  dtype, channels = IMAGE_SPEC[modality]
  image = _check_array(record, 'image', where, dtype, (None, None, channels))
  if image.shape[0] < 1 or image.shape[1] < 1:
    _fail(where, 'image', f'has empty spatial shape {image.shape}')
  if dtype.kind == 'f' and not np.isfinite(image).all():
    _fail(where, 'image', 'has non-finite values')
  spacing = _check_array(record, 'spacing', where, np.float32, (3,))
  if not np.isfinite(spacing).all() or (spacing < 0).any():
    _fail(where, 'spacing', f'must be finite and >= 0, got {spacing.tolist()}')

  k = len(lm.LANDMARKS)
  visible = _check_array(record, 'landmark_visible', where, np.bool_, (k,))
  for key in ('landmarks', 'landmarks_canonical'):
    pts = _check_array(record, key, where, np.float32, (k, 2))
    if np.isnan(pts).any():
      _fail(where, key, 'has NaN')
    if not np.isfinite(pts).all():
      _fail(where, key, 'has inf')
    seen = pts[visible]
    if ((seen < 0) | (seen > 1)).any():
      bad = lm.LANDMARKS[int(np.flatnonzero(visible)[((seen < 0) | (seen > 1)).any(1)][0])]
      _fail(where, key, f'has visible landmark {bad!r} outside [0, 1]')
    if (pts[~visible] != 0).any():
      _fail(where, key, 'must hold (0, 0) for invisible landmarks')

  organs = _check_array(record, 'organs', where, np.uint8, (len(lm.ORGANS),))
  if (organs > 1).any():
    _fail(where, 'organs', 'must be multi-hot (0 or 1)')
  if 'mask' in record:
    _check_array(record, 'mask', where, np.uint8, image.shape[:2])
  if 'label' in record:
    _check_array(record, 'label', where, np.int32, ())
  if 'labels' in record:
    labels = _check_array(record, 'labels', where, np.int8, (None,))
    if not np.isin(labels, (-1, 0, 1)).all():
      _fail(where, 'labels', 'must hold only -1 (uncertain), 0 or 1')
  if 'target' in record:
    if not np.isfinite(_check_array(record, 'target', where, np.float32, ())):
      _fail(where, 'target', 'must be finite')
  if 'landmark_confidence' in record:
    conf = _check_array(record, 'landmark_confidence', where, np.float32, (k,))
    if not (np.isfinite(conf).all() and ((conf >= 0) & (conf <= 1)).all()):
      _fail(where, 'landmark_confidence', 'must be finite and in [0, 1]')
