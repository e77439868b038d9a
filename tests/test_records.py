"""Record codec: exact round trips, schema checks and damaged-bytes detection."""

import struct

import msgpack
import numpy as np
import pytest

from aacp_jax.data import landmarks as lm
from aacp_jax.data import records as rec

K, O = len(lm.LANDMARKS), len(lm.ORGANS)


def make(modality='ct', size=8, **overrides):
  rng = np.random.default_rng(0)
  dtype, channels = rec.IMAGE_SPEC[modality]
  if dtype.kind == 'f':
    image = rng.standard_normal((size, size, channels)).astype(dtype)
  else:
    info = np.iinfo(dtype)
    image = rng.integers(info.min, info.max, (size, size, channels), endpoint=True).astype(dtype)
  pts, vis, canon = lm.empty_landmarks()
  pts[:3], vis[:3], canon[:3] = rng.uniform(0, 1, (3, 2)), True, rng.uniform(0, 1, (3, 2))
  record = dict(
    image=image,
    modality=modality,
    region='chest',
    source='unit',
    subject='ab12',
    spacing=np.array([1, 1, 1], np.float32),
    landmarks=pts,
    landmark_visible=vis,
    landmarks_canonical=canon,
    organs=lm.organ_multi_hot(['lungs', 'heart']),
    mask=np.zeros((size, size), np.uint8),
    label=np.array(1, np.int32),
  )
  record.update(overrides)
  return record


def assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], str):
      assert a[k] == b[k]
    else:
      assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
      assert a[k].tobytes() == b[k].tobytes(), k  # bit-exact, NaN payloads and -0.0 included


@pytest.mark.parametrize('modality', rec.MODALITIES)
def test_round_trip_exact(modality):
  r = make(modality)
  data = rec.encode(r)
  assert data == rec.encode(make(modality))  # deterministic bytes
  assert_same(r, rec.decode(data))


def test_optional_keys_may_be_absent():
  r = make('xray')
  del r['mask'], r['label']
  assert_same(r, rec.decode(rec.encode(r)))


@pytest.mark.parametrize(
  'dtype',
  [
    'bool',
    'uint8',
    'uint16',
    'int16',
    'int32',
    'int64',
    'float16',
    'float32',
    'float64',
    '>i4',
    '>f8',
  ],
)
@pytest.mark.parametrize('shape', [(), (0,), (3,), (2, 3, 4)])
def test_array_codec_every_dtype(dtype, shape):
  a = (np.arange(int(np.prod(shape))) * 37 - 5).reshape(shape).astype(dtype)
  b = rec._unpack_array(rec._pack_array(a), 'x', 'test')  # pylint: disable=protected-access
  assert b.shape == a.shape and b.dtype == a.dtype.newbyteorder('=')
  np.testing.assert_array_equal(a, b)


def test_float_special_values_are_bit_exact():
  a = np.array([np.nan, -0.0, np.inf, 1e-8, 65504], np.float16)
  b = rec._unpack_array(rec._pack_array(a), 'x', 'test')  # pylint: disable=protected-access
  assert a.tobytes() == b.tobytes()


def _nan_landmark(r):
  r['landmarks'][0, 0] = np.nan


def _outside(r):
  r['landmarks'][1, 1] = 1.5


def _invisible_nonzero(r):
  r['landmarks'][-1] = 0.5


BAD = {
  'nan landmarks': ('landmarks', 'NaN', _nan_landmark),
  'landmarks outside [0, 1]': ('landmarks', 'outside', _outside),
  'canonical outside': (
    'landmarks_canonical',
    'outside',
    lambda r: r['landmarks_canonical'].__setitem__((0, 0), -0.1),
  ),
  'invisible not zero': ('landmarks', '(0, 0)', _invisible_nonzero),
  'wrong K': ('landmarks', 'shape', lambda r: r.update(landmarks=r['landmarks'][:-1])),
  'wrong visible K': (
    'landmark_visible',
    'shape',
    lambda r: r.update(landmark_visible=np.ones(K + 1, bool)),
  ),
  'landmarks float64': (
    'landmarks',
    'dtype',
    lambda r: r.update(landmarks=r['landmarks'].astype(np.float64)),
  ),
  'image dtype': ('image', 'dtype', lambda r: r.update(image=r['image'].astype(np.float32))),
  'channel count': ('image', 'shape', lambda r: r.update(image=r['image'][..., :63])),
  'image rank': ('image', 'shape', lambda r: r.update(image=r['image'][..., 0])),
  'organs length': ('organs', 'shape', lambda r: r.update(organs=np.zeros(O - 1, np.uint8))),
  'organs not binary': ('organs', 'multi-hot', lambda r: r['organs'].__setitem__(0, 2)),
  'empty subject': ('subject', 'non-empty', lambda r: r.update(subject='')),
  'unknown modality': ('modality', 'expected', lambda r: r.update(modality='pet')),
  'missing key': ('spacing', 'missing', lambda r: r.pop('spacing')),
  'unknown key': ('patient_name', 'not a record key', lambda r: r.update(patient_name='x')),
  'mask shape': ('mask', 'shape', lambda r: r.update(mask=np.zeros((4, 4), np.uint8))),
  'label shape': ('label', 'shape', lambda r: r.update(label=np.zeros(2, np.int32))),
  'spacing negative': (
    'spacing',
    '>= 0',
    lambda r: r.update(spacing=np.array([1, -1, 1], np.float32)),
  ),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_record_names_key(case):
  key, words, mutate = BAD[case]
  r = make('ct')
  mutate(r)
  for check in (lambda: rec.validate(r, where='f.array_record:3'), lambda: rec.encode(r)):
    with pytest.raises(rec.RecordError) as e:
      check()
    msg = str(e.value)
    assert f"'{key}'" in msg and words in msg and '\n' not in msg, msg
  assert 'f.array_record:3' in str(
    pytest.raises(rec.RecordError, rec.validate, r, where='f.array_record:3').value
  )


def test_mri_non_finite_image_rejected():
  r = make('mri')
  r['image'][0, 0, 0] = np.inf
  with pytest.raises(rec.RecordError, match="'image' has non-finite"):
    rec.validate(r)


def _decode_error(data):
  with pytest.raises(rec.RecordError) as e:
    rec.decode(data, where='shard train/ct-00000-of-00001.array_record record 7')
  msg = str(e.value)
  assert msg.startswith('shard train/ct-00000-of-00001.array_record record 7: ') and '\n' not in msg
  return msg


def test_unknown_version_rejected():
  data = bytearray(rec.encode(make()))
  struct.pack_into('<H', data, 4, rec.EXTERNAL_VERSION + 1)
  assert (
    f"'version' is {rec.EXTERNAL_VERSION + 1}; this code reads versions 1 to 3"
    in _decode_error(bytes(data))
  )


@pytest.mark.parametrize('where', [0.3, 0.5, 0.99])
def test_flipped_payload_byte_fails_crc(where):
  data = bytearray(rec.encode(make('xray')))
  data[int(len(data) * where)] ^= 0x01
  assert 'CRC32' in _decode_error(bytes(data))


def test_any_flipped_byte_is_detected():
  data = rec.encode(make('xray', size=4))
  for i in range(0, len(data), 7):
    bad = bytearray(data)
    bad[i] ^= 0x80
    assert _decode_error(bytes(bad))  # raises if the damage went unnoticed


@pytest.mark.parametrize('keep', [0, 10, 100, -1])
def test_truncated_bytes(keep):
  data = rec.encode(make('mri'))
  assert 'truncated' in _decode_error(data[:keep] if keep >= 0 else data[:-1])


def test_foreign_bytes():
  assert 'magic' in _decode_error(b'\x89PNG' + bytes(100))


def _encode_v1(record):
  """The version 1 writer as it was (arrays inline in msgpack, zlib CRC32): old shards' bytes."""
  import zlib  # pylint: disable=g-import-not-at-top

  payload = msgpack.packb(
    {
      k: v if isinstance(v, str) else rec._pack_array(np.asarray(v))  # pylint: disable=protected-access
      for k, v in sorted(record.items())
    },
    use_bin_type=True,
  )
  return struct.pack('<4sHIQ', b'AACR', 1, zlib.crc32(payload), len(payload)) + payload


@pytest.mark.parametrize('modality', rec.MODALITIES)
def test_old_version_1_records_still_decode(modality):
  r = make(modality)
  old = _encode_v1(r)
  assert old[4:6] == b'\x01\x00' and rec.encode(r)[4:6] == b'\x02\x00'
  assert_same(r, rec.decode(old))
  assert_same(rec.decode(old), rec.decode(rec.encode(r)))


def test_version_1_damage_is_detected():
  data = bytearray(_encode_v1(make('xray')))
  data[len(data) // 2] ^= 0x01
  assert 'fails its CRC32 check' in _decode_error(bytes(data))
  assert 'truncated' in _decode_error(_encode_v1(make('xray'))[:-1])


def test_decode_is_zero_copy_and_read_only():
  # The arrays are views of the record's bytes (no copy of a CT slab), aligned for fast access;
  # read-only, so a shared buffer cannot be changed behind another reader's back.
  data = rec.encode(make('ct', size=16))
  out = rec.decode(data)
  for k, v in out.items():
    if isinstance(v, np.ndarray):
      assert not v.flags.writeable and v.base is not None, k
  image = out['image']
  assert image.ctypes.data % 16 == 0
  base = np.frombuffer(data, np.uint8)
  assert base.ctypes.data <= image.ctypes.data < base.ctypes.data + len(data)


def test_decoded_record_is_validated():
  # A record written by a buggy encoder (valid CRC, bad content) must still be refused on read.
  r = make('xray')
  r['landmarks'][0, 0] = np.nan
  assert "'landmarks' has NaN" in _decode_error(_encode_v1(r))
  # The same bug in a version 2 record: NaN written into the landmarks block, CRC recomputed.
  data = bytearray(rec.encode(make('xray')))
  header = struct.Struct('<4sHHIIQ')
  meta_len = header.unpack_from(data)[4]
  meta = msgpack.unpackb(bytes(data[header.size : header.size + meta_len]))
  start = -(-(header.size + meta_len) // 64) * 64
  struct.pack_into('<f', data, start + meta['landmarks']['offset'], np.nan)
  crc = rec._crc32c(np.frombuffer(data, np.uint8))  # pylint: disable=protected-access
  struct.pack_into('<I', data, 8, crc)
  assert "'landmarks' has NaN" in _decode_error(bytes(data))
