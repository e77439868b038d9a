"""ArrayRecord shards: layout, manifest, random access, and one-line errors for damaged files."""

import hashlib
import json
import os

from array_record.python import array_record_module
import grain
import numpy as np
import pytest

from aacp_jax.data import records as rec
from aacp_jax.data import shards
from tests.test_records import make


def _records(modality, n):
  out = []
  for i in range(n):
    r = make(modality, size=6)
    r['subject'] = f's{i:03d}'
    r['label'] = np.array(i % 2, np.int32)
    out.append(r)
  return out


@pytest.fixture
def root(tmp_path):
  shards.write_split(
    str(tmp_path),
    'train',
    {'xray': _records('xray', 10), 'ct': (r for r in _records('ct', 3))},
    seed=7,
    num_shards={'xray': 3},
    label_names={'xray': ['a', 'b']},
  )
  return str(tmp_path)


def test_layout_and_manifest(root):
  names = sorted(os.listdir(os.path.join(root, 'train')))
  assert names == [
    'ct-00000-of-00001.array_record',
    'manifest.json',
    'xray-00000-of-00003.array_record',
    'xray-00001-of-00003.array_record',
    'xray-00002-of-00003.array_record',
  ]  # no temporary files left behind
  m = shards.read_manifest(root, 'train')
  assert m['seed'] == 7 and m['split'] == 'train' and m['code_version'] and m['created']
  assert m['label_names'] == {'xray': ['a', 'b']}
  x = m['modalities']['xray']
  assert x['count'] == 10 and [f['count'] for f in x['files']] == [3, 3, 4]
  assert x['shapes']['image'] == [6, 6, 1] and x['dtypes']['image'] == 'uint8'
  assert x['label_counts'] == {'0': 5, '1': 5}
  for f, path in zip(x['files'], shards.shard_paths(root, 'train', 'xray')):
    assert hashlib.sha256(open(path, 'rb').read()).hexdigest() == f['sha256']
    assert os.path.getsize(path) == f['bytes']
  assert m['modalities']['ct']['count'] == 3  # a plain generator works too


def test_random_access_across_shards(root):
  src = shards.open_source(root, 'train', 'xray')
  assert len(src) == 10
  expected = _records('xray', 10)
  for i in (9, 0, 3, 5, 6, 2):
    assert src[i]['subject'] == f's{i:03d}'
    np.testing.assert_array_equal(src[i]['image'], expected[i]['image'])
  with pytest.raises(IndexError):
    src[10]
  ds = grain.MapDataset.source(src)
  assert [r['subject'] for r in ds[::4]] == ['s000', 's004', 's008']


def test_auto_num_shards():
  assert shards.auto_num_shards(1) == 1 and shards.auto_num_shards(256) == 1
  assert shards.auto_num_shards(1000) == 4


def test_rewrite_replaces_old_shards(root):
  shards.write_split(root, 'train', {'xray': _records('xray', 4)}, seed=1)
  assert shards.shard_paths(root, 'train', 'xray')[0].endswith('xray-00000-of-00001.array_record')
  assert not [
    n
    for n in os.listdir(os.path.join(root, 'train'))
    if n.startswith('xray-0000') and not n.endswith('of-00001.array_record')
  ]
  assert len(shards.open_source(root, 'train', 'xray')) == 4


def _writer_options(path):
  reader = array_record_module.ArrayRecordReader(path, 'readahead_buffer_size:0')
  try:
    return reader.writer_options_string()
  finally:
    reader.close()


def test_shards_are_uncompressed_and_compressed_ones_still_read(tmp_path, root):
  # Default: uncompressed chunks (ArrayRecord's own default would be zstd:3).
  for path in shards.shard_paths(root, 'train', 'xray'):
    options = _writer_options(path).split(',')
    assert 'group_size:1' in options and 'uncompressed' in options
  expected = _records('xray', 10)
  # Compressed shards (as written before, with ArrayRecord's default zstd, or asked for) read the same.
  for compression in ('zstd:3', 'snappy', 'brotli:1'):
    out = str(tmp_path / compression.replace(':', ''))
    shards.write_split(
      out, 'train', {'xray': expected}, seed=7, num_shards=2, compression=compression
    )
    path = shards.shard_paths(out, 'train', 'xray')[0]
    assert compression.split(':')[0] in _writer_options(path)
    src = shards.open_source(out, 'train', 'xray')
    for i in (9, 0, 4, 5):
      np.testing.assert_array_equal(src[i]['image'], expected[i]['image'])
  old = str(tmp_path / 'old')
  os.makedirs(os.path.join(old, 'train'))
  path = os.path.join(old, 'train', shards.shard_name('xray', 0, 1))
  writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')  # the options of old shards
  for r in expected:
    writer.write(rec.encode(r))
  writer.close()
  entry = {'name': os.path.basename(path), 'count': 10, 'bytes': os.path.getsize(path)}
  entry['sha256'] = hashlib.sha256(open(path, 'rb').read()).hexdigest()
  shards.write_manifest(old, 'train', {'xray': {'count': 10, 'files': [entry]}}, seed=7)
  assert 'zstd' in _writer_options(path)
  src = shards.open_source(old, 'train', 'xray')
  assert [src[i]['subject'] for i in (3, 9, 0)] == ['s003', 's009', 's000']
  np.testing.assert_array_equal(src[7]['image'], expected[7]['image'])


def test_bad_compression_fails_before_writing(tmp_path):
  for bad in ('gzip', 'zstd:99x', 'zstd:23', 'brotli:12', '', 'uncompressed,group_size:64'):
    with pytest.raises(ValueError, match='compression'):
      shards.write_split(
        str(tmp_path), 'train', {'xray': _records('xray', 2)}, seed=0, compression=bad
      )
  assert not os.path.exists(os.path.join(tmp_path, 'train'))
  with pytest.raises(ValueError, match='compression'):
    shards.write_shard(str(tmp_path / 'x.array_record'), [b'x'], compression='lz4')
  assert not os.listdir(tmp_path)


def test_invalid_record_is_not_written(tmp_path):
  bad = _records('xray', 2)
  bad[1]['landmarks'][0, 0] = np.nan
  with pytest.raises(rec.RecordError, match="'landmarks' has NaN"):
    shards.write_split(str(tmp_path), 'train', {'xray': bad}, seed=0)
  assert not os.path.exists(os.path.join(tmp_path, 'train', 'manifest.json'))


def _error(fn):
  with pytest.raises(shards.ShardError) as e:
    fn()
  msg = str(e.value)
  assert '\n' not in msg
  return msg


def test_missing_manifest_and_modality(tmp_path, root):
  assert 'manifest missing' in _error(lambda: shards.read_manifest(str(tmp_path), 'test'))
  assert "no modality 'mri'" in _error(lambda: shards.open_source(root, 'train', 'mri'))


def test_missing_shard(root):
  path = shards.shard_paths(root, 'train', 'xray')[1]
  os.remove(path)
  assert path in _error(lambda: shards.open_source(root, 'train', 'xray'))


def test_truncated_shard(root):
  path = shards.shard_paths(root, 'train', 'xray')[0]
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[: len(data) // 2])
  for verify in (True, False):
    msg = _error(lambda v=verify: shards.open_source(root, 'train', 'xray', verify=v))
    assert path in msg and 'truncated' in msg


def test_truncated_shard_with_matching_manifest(root):
  # Even if the manifest agrees with the damaged size, array_record's own errors surface as ShardError.
  path = shards.shard_paths(root, 'train', 'xray')[0]
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[: len(data) - 100])
  mpath = os.path.join(root, 'train', 'manifest.json')
  m = json.load(open(mpath))
  m['modalities']['xray']['files'][0]['bytes'] = len(data) - 100
  json.dump(m, open(mpath, 'w'))
  src = shards.open_source(root, 'train', 'xray', verify=False)
  assert os.path.basename(path) in _error(lambda: src[0])


def test_corrupt_shard(root):
  path = shards.shard_paths(root, 'train', 'xray')[2]
  data = bytearray(open(path, 'rb').read())
  data[100] ^= 0xFF  # inside the first chunk
  open(path, 'wb').write(data)
  assert path in _error(lambda: shards.open_source(root, 'train', 'xray'))  # sha256 at open
  src = shards.open_source(root, 'train', 'xray', verify=False)
  assert src[0]['subject'] == 's000'  # other shards still read
  assert 'xray-00002-of-00003.array_record' in _error(lambda: src[6])  # array_record's chunk hash
