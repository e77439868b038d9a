"""The one record codec: msgpack + raw numpy bytes, never pickle.

Wire format, version 2 (little-endian)::

    b'AACR' | uint16 version | uint16 0 | uint32 crc32c | uint32 len(meta) | uint64 len(rest) | rest
    rest = meta | zero padding | array blocks, each starting on a 64-byte boundary of the record

``meta`` is a msgpack map of the record; strings are stored in it, arrays as ``{'__nd__':
dtype.str, 'shape': [...], 'offset': o, 'nbytes': n}`` with ``o`` counted from the first block.
The CRC32C (hardware-accelerated, ``google-crc32c``) covers every byte but its own four. Decoding
parses only the small map and returns the arrays as read-only ``np.frombuffer`` views of the
record's bytes: no copy of a 16 MiB CT slab is made until the batch is assembled.

Version 3 is version 2 with the large ``image`` / ``mask`` (``externalize``: 1 MiB and more, e.g.
a 358² x 64 CT slab or a 1024² radiograph) moved out to the shard's array file, each replaced in the
map by its offset there and its own CRC32C. Only the shard writer makes it; ``decode`` reads it
when given ``external=`` (``shards.ShardSource`` does), so a big array is read once, straight into
its place in a batch, instead of through ArrayRecord's copies (docs/DESIGN.md).

Version 1 (``b'AACR' | uint16 1 | uint32 zlib crc32(payload) | uint64 len(payload) | payload``,
arrays inline in the msgpack map as ``'data'`` bytes) is still read, so shards written before
version 2 stay usable; ``encode`` writes version 2.

The fixed header lets every kind of damage give a precise error: a foreign blob fails the magic,
a newer writer fails the version, truncation fails the length, and any flipped byte fails the CRC
before msgpack ever parses it. The schema (see docs/INTERFACES.md) is checked on both sides:
``encode`` refuses to write a bad record and ``decode`` refuses to return one, so training code can
trust what it reads.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Callable
import zlib

import google_crc32c
import msgpack
import numpy as np

from aacp_jax.data import landmarks as lm
from aacp_jax.modalities import IN_CHANNELS, MODALITIES, RAW_DTYPES

VERSION = 2
# Records whose large arrays live in the shard's array file (``externalize``; read by ``decode``
# with ``external=``). Never written by ``encode``: only the shard writer makes them.
EXTERNAL_VERSION = 3
EXTERNAL_KEYS = ('image', 'mask')
_MAGIC = b'AACR'
_HEADER_V1 = struct.Struct('<4sHIQ')
_HEADER = struct.Struct('<4sHHIIQ')
_CRC_AT = 8  # byte offset of the CRC field in a version 2 header
_ALIGN = 64  # array blocks start on cache-line boundaries (aligned, vectorisable views)
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


def _array_meta(obj: dict, key: str, where: str):
  try:
    dtype = np.dtype(obj['__nd__'])
    shape = tuple(int(s) for s in obj['shape'])
  except (KeyError, TypeError, ValueError) as e:
    _fail(where, key, f'is a malformed array ({e})')
  if dtype.kind not in _ARRAY_KINDS:
    _fail(where, key, f'has unsupported dtype {dtype}')
  return dtype, shape, dtype.itemsize * int(np.prod(shape, dtype=np.int64))


def _unpack_array(obj: dict, key: str, where: str) -> np.ndarray:
  """A version 1 array (bytes inline)."""
  dtype, shape, nbytes = _array_meta(obj, key, where)
  data = obj.get('data')
  if not isinstance(data, bytes):
    _fail(where, key, 'is a malformed array (no data bytes)')
  if len(data) != nbytes:
    _fail(where, key, f'holds {len(data)} bytes, not {dtype} {shape}')
  # Copy so callers get writable, native-order arrays independent of the msgpack buffer.
  return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder('='))


def _crc32c(buf: np.ndarray) -> int:
  # Everything but the CRC field itself; numpy views, so nothing is copied.
  return google_crc32c.extend(google_crc32c.value(buf[:_CRC_AT]), buf[_CRC_AT + 4 :])


def _align(n: int) -> int:
  return -(-n // _ALIGN) * _ALIGN


def encode(record: dict[str, Any]) -> bytes:
  """Validates ``record`` and returns its bytes (deterministic: same record, same bytes)."""
  validate(record, where='encode')
  meta, blocks, offset = {}, [], 0
  for key in sorted(record):
    value = record[key]
    if isinstance(value, str):
      meta[key] = value
      continue
    a = np.asarray(value)
    if a.dtype.kind not in _ARRAY_KINDS:
      raise RecordError(f'cannot encode dtype {a.dtype}')
    # Not np.ascontiguousarray: it turns 0-d arrays (labels) into shape (1,).
    a = a.astype(a.dtype.newbyteorder('<'), order='C', copy=False)
    data = a.tobytes()
    meta[key] = {
      '__nd__': a.dtype.str,
      'shape': list(a.shape),
      'offset': offset,
      'nbytes': len(data),
    }
    blocks.append(data + bytes(_align(len(data)) - len(data)))
    offset += _align(len(data))
  return _assemble(meta, blocks, VERSION)


def _assemble(meta: dict, blocks: list, version: int) -> bytes:
  """Header + msgpack map + padding + the (already aligned) array blocks, CRC32C filled in."""
  packed = msgpack.packb(meta, use_bin_type=True)
  lead = _align(_HEADER.size + len(packed)) - _HEADER.size
  rest = b''.join([packed, bytes(lead - len(packed))] + blocks)
  out = bytearray(_HEADER.pack(_MAGIC, version, 0, 0, len(packed), len(rest)) + rest)
  struct.pack_into('<I', out, _CRC_AT, _crc32c(np.frombuffer(out, np.uint8)))
  return bytes(out)


def externalize(data: bytes, place: Callable[[memoryview], int], *, min_bytes: int) -> bytes:
  """A version 2 record's bytes -> a version 3 stub whose large ``image`` / ``mask`` live elsewhere.

  Each such array of at least ``min_bytes`` is handed to ``place(bytes) -> offset`` (the shard
  writer appends it to the shard's array file) and replaced in the map by ``{'__nd__', 'shape',
  'nbytes', 'ext': offset, 'crc32c': CRC32C of its bytes}``. A record with no such array comes back
  unchanged (still version 2). The input's own CRC is checked first: damaged bytes are never
  split into an intact-looking stub.
  """
  if len(data) < min_bytes or struct.unpack_from('<4sH', data) != (_MAGIC, VERSION):
    return data
  _, _, _, crc, meta_len, _ = _HEADER.unpack_from(data)
  if _crc32c(np.frombuffer(data, np.uint8)) != crc:
    raise RecordError('externalize: record fails its CRC32C check (corrupt bytes)')
  obj = _unpack_map(memoryview(data)[_HEADER.size : _HEADER.size + meta_len], 'externalize')
  start = _align(_HEADER.size + meta_len)
  view = memoryview(data)
  meta, blocks, offset, moved = {}, [], 0, False
  for key in sorted(obj):
    value = obj[key]
    if not isinstance(value, dict):
      meta[key] = value
      continue
    lo = start + value['offset']
    block = view[lo : lo + value['nbytes']]
    if key in EXTERNAL_KEYS and value['nbytes'] >= min_bytes:
      crc32c = google_crc32c.value(np.frombuffer(block, np.uint8))  # it takes no memoryview
      meta[key] = {**_shape_of(value), 'ext': int(place(block)), 'crc32c': crc32c}
      moved = True
      continue
    meta[key] = {**_shape_of(value), 'offset': offset}
    blocks.append(bytes(block) + bytes(_align(len(block)) - len(block)))
    offset += _align(len(block))
  return _assemble(meta, blocks, EXTERNAL_VERSION) if moved else data


def _shape_of(value: dict) -> dict:
  return {'__nd__': value['__nd__'], 'shape': value['shape'], 'nbytes': value['nbytes']}


_IOV_MAX = 1024  # POSIX's minimum guarantee is 16; Linux allows 1024 (preadv's vector length)


class External:
  """An array of a version 3 record that lives in its shard's array file: dtype and shape known,
  bytes not read yet. ``read_into(out)`` reads them straight into ``out`` (e.g. a record's slot
  of a padded batch, so a 16 MiB CT slab is copied once, by the kernel) and checks their CRC32C
  (and, for float images, finiteness); ``materialise()`` reads them into a new array.

  ``fd``: a descriptor, or an object with ``fileno()`` that owns it (kept alive while this is).
  Never sent to another process (Grain workers batch, and so read, in the process that decoded).
  """

  __slots__ = ('dtype', 'shape', 'nbytes', 'offset', 'crc', 'fd', 'where', 'key')

  def __init__(self, dtype, shape, offset, crc, fd, where, key):
    self.dtype, self.shape = np.dtype(dtype), tuple(shape)
    self.nbytes = self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))
    self.offset, self.crc, self.fd, self.where, self.key = offset, crc, fd, where, key

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __reduce__(self):
    raise TypeError(f'{self.where}: {self.key!r} is not read yet; materialise() it first')

  def materialise(self) -> np.ndarray:
    return self.read_into(np.empty(self.shape, self.dtype))

  def read_into(self, out: np.ndarray) -> np.ndarray:
    if out.shape != self.shape or out.dtype != self.dtype:
      raise ValueError(
        f'{self.where}: {self.key!r} is {self.dtype} {self.shape}, not {out.dtype} {out.shape}'
      )
    if out.flags.c_contiguous:
      parts = [out.reshape(-1)]
    elif out[0].flags.c_contiguous:  # a slot of a padded batch: rows contiguous, strided apart
      parts = list(out)
    else:
      return out.__setitem__(Ellipsis, self.materialise()) or out
    views = [memoryview(p).cast('B') for p in parts]
    fd = self.fd if isinstance(self.fd, int) else self.fd.fileno()
    try:
      got = 0
      for i in range(0, len(views), _IOV_MAX):
        n = os.preadv(fd, views[i : i + _IOV_MAX], self.offset + got)
        got += n
        if n < sum(len(v) for v in views[i : i + _IOV_MAX]):
          break  # end of file: reported as truncated below
    except OSError as e:
      _fail(self.where, self.key, f'cannot be read from the array file ({e.strerror or e})')
    if got != self.nbytes:
      _fail(self.where, self.key, f'is truncated in the array file ({got} of {self.nbytes} bytes)')
    crc = 0
    for p in parts:
      p = p.view()
      p.flags.writeable = False  # google_crc32c takes read-only buffers only
      crc = google_crc32c.extend(crc, p.reshape(-1).view(np.uint8))
    if crc != self.crc:
      _fail(self.where, self.key, 'fails its CRC32C check in the array file (corrupt bytes)')
    if self.dtype.kind == 'f' and not _all_finite(out):
      _fail(self.where, self.key, 'has non-finite values')
    return out


def decode(data: bytes, *, where: str = '', external: Callable | None = None) -> dict[str, Any]:
  """Bytes from ``encode`` -> validated record; any damage raises a one-line ``RecordError``.

  Version 2 arrays are read-only views of ``data`` (which they keep alive); copy one to modify it.
  Version 3 arrays kept in an array file come from ``external(key, dtype, shape, offset, crc)``
  (an ``External`` or the array; ``shards.ShardSource`` supplies it).
  """
  where = where or 'record'
  if len(data) < 6:
    _fail(where, 'header', f'is truncated ({len(data)} bytes)')
  magic, version = struct.unpack_from('<4sH', data)
  if magic != _MAGIC:
    _fail(where, 'header', f'has magic {magic!r}, not an aacp record')
  if version == 1:
    return _decode_v1(bytes(data), where)
  if version not in (VERSION, EXTERNAL_VERSION):
    _fail(where, 'version', f'is {version}; this code reads versions 1 to {EXTERNAL_VERSION}')
  if len(data) < _HEADER.size:
    _fail(where, 'header', f'is truncated ({len(data)} bytes)')
  _, _, _, crc, meta_len, size = _HEADER.unpack_from(data)
  if len(data) - _HEADER.size != size:
    _fail(where, 'payload', f'is truncated or padded ({len(data) - _HEADER.size} of {size} bytes)')
  buf = np.frombuffer(data, np.uint8)
  if _crc32c(buf) != crc:
    _fail(where, 'payload', 'fails its CRC32C check (corrupt bytes)')
  start = _align(_HEADER.size + meta_len)
  if start > len(data):
    _fail(where, 'payload', f'has a map of {meta_len} bytes in {size}')
  obj = _unpack_map(memoryview(data)[_HEADER.size : _HEADER.size + meta_len], where)
  record = {}
  for key, value in obj.items():
    if not isinstance(value, dict):
      record[key] = value
      continue
    dtype, shape, nbytes = _array_meta(value, key, where)
    if version == EXTERNAL_VERSION and 'ext' in value:
      record[key] = _external(value, key, where, external, dtype, shape, nbytes)
      continue
    offset = value.get('offset')
    if not isinstance(offset, int) or value.get('nbytes') != nbytes or offset < 0:
      _fail(where, key, f'is a malformed array block (offset {offset!r}, {nbytes} bytes wanted)')
    if start + offset + nbytes > len(data):
      _fail(where, key, f'block [{offset}, +{nbytes}) runs past the record')
    a = np.frombuffer(data, dtype, int(np.prod(shape, dtype=np.int64)), start + offset)
    record[key] = a.reshape(shape) if dtype.isnative else a.astype(dtype.newbyteorder('='))
  validate(record, where=where)
  return record


def _external(value, key, where, external, dtype, shape, nbytes):
  offset, crc = value.get('ext'), value.get('crc32c')
  if key not in EXTERNAL_KEYS or not isinstance(offset, int) or offset < 0:
    _fail(where, key, f'is a malformed external array (offset {offset!r})')
  if value.get('nbytes') != nbytes or not isinstance(crc, int):
    _fail(where, key, f'is a malformed external array ({nbytes} bytes wanted, crc {crc!r})')
  if external is None:
    _fail(
      where, key, "lives in its shard's array file: read the record through aacp_jax.data.shards"
    )
  return external(key, dtype, shape, offset, crc)


def _unpack_map(payload, where: str) -> dict:
  """The record's msgpack map (both codec versions), or a one-line error."""
  try:
    obj = msgpack.unpackb(payload, raw=False)
  except Exception as e:  # pylint: disable=broad-except  # msgpack raises many unrelated types.
    _fail(where, 'payload', f'is not valid msgpack ({type(e).__name__})')
  if not isinstance(obj, dict):
    _fail(where, 'payload', 'is not a map')
  return obj


def _decode_v1(data: bytes, where: str) -> dict[str, Any]:
  if len(data) < _HEADER_V1.size:
    _fail(where, 'header', f'is truncated ({len(data)} bytes)')
  _, _, crc, size = _HEADER_V1.unpack_from(data)
  payload = data[_HEADER_V1.size :]
  if len(payload) != size:
    _fail(where, 'payload', f'is truncated or padded ({len(payload)} of {size} bytes)')
  if zlib.crc32(payload) != crc:
    _fail(where, 'payload', 'fails its CRC32 check (corrupt bytes)')
  obj = _unpack_map(payload, where)
  record = {}
  for key, value in obj.items():
    record[key] = _unpack_array(value, key, where) if isinstance(value, dict) else value
  validate(record, where=where)
  return record


def _check_array(record, key, where, dtype, shape):
  """Checks dtype and shape; ``None`` entries of ``shape`` match any size."""
  a = record[key]
  if not isinstance(a, (np.ndarray, External)):
    _fail(where, key, f'is {type(a).__name__}, not a numpy array')
  if a.dtype != dtype:
    _fail(where, key, f'has dtype {a.dtype}, expected {np.dtype(dtype)}')
  if a.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, a.shape)):
    want = ', '.join('*' if s is None else str(s) for s in shape)
    _fail(where, key, f'has shape {a.shape}, expected ({want})')
  return a


def _all_finite(a: np.ndarray) -> bool:
  if a.dtype == np.float16:
    # Exponent bits all set = inf or NaN; an integer test is ~6x faster than float16 isfinite,
    # which numpy emulates element by element.
    return not (a.view(np.uint16) & 0x7C00 == 0x7C00).any()
  return bool(np.isfinite(a).all())


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
  # An External image is checked for finiteness when read (External.read_into).
  if dtype.kind == 'f' and isinstance(image, np.ndarray) and not _all_finite(image):
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
