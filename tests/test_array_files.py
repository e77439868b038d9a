"""Array files: large images and masks beside their shard, read straight into the batch.

The threshold is lowered to 1 KiB here so that small records exercise the path that real
358² x 64 CT slabs and 1024² radiographs take (shards.ARRAY_FILE_MIN_BYTES is 1 MiB).
"""

import dataclasses
import os

import numpy as np
import pytest

from aacp_jax.data import buffers, shards
from aacp_jax.data import pipeline as pl
from aacp_jax.data import records as rec
from tests.test_pipeline import _xray
from tests.test_records import assert_same, make

SIZES = ((40, 36), (48, 24), (32, 40), (48, 40))


@pytest.fixture
def small_threshold(monkeypatch):
  monkeypatch.setattr(shards, 'ARRAY_FILE_MIN_BYTES', 1024)


def _records():
  rng = np.random.default_rng(1)
  out = [_xray(rng, h, w, f's{i}') for i, (h, w) in enumerate(SIZES)]
  out.append(_xray(rng, 8, 8, 'small'))  # 64 bytes: stays inline beside the external ones
  return out


def _write(root, records, **kw):
  return shards.write_split(root, 'train', {'xray': records}, seed=0, num_shards=2, **kw)


def test_externalize_round_trip_and_stub(tmp_path):
  r = make('ct', size=16)  # image 32 KiB, mask 256 bytes
  data = rec.encode(r)
  blob = bytearray()

  def place(block):
    blob.extend(bytes(-len(blob) % 4096))
    offset = len(blob)
    blob.extend(block)
    return offset

  stub = rec.externalize(data, place, min_bytes=1024)
  assert stub[4] == rec.EXTERNAL_VERSION and len(stub) < 4096 < len(data)
  assert rec.externalize(data, place, min_bytes=len(data) + 1) == data  # nothing that large
  path = tmp_path / 'a.arrays'
  path.write_bytes(bytes(blob))
  fd = os.open(path, os.O_RDONLY)
  try:
    lazy = rec.decode(stub, external=lambda *a: rec.External(*a[1:], fd, 'unit', a[0]))
    assert isinstance(lazy['image'], rec.External) and 'mask' not in blob.hex()[:0]
    assert lazy['image'].shape == r['image'].shape and lazy['image'].dtype == r['image'].dtype
    got = dict(lazy, image=lazy['image'].materialise())
    assert_same(r, got)
  finally:
    os.close(fd)
  with pytest.raises(rec.RecordError, match="lives in its shard's array file"):
    rec.decode(stub)
  damaged = bytearray(data)
  damaged[-1] ^= 1
  with pytest.raises(rec.RecordError, match='CRC32C'):
    rec.externalize(bytes(damaged), place, min_bytes=1024)  # never split damaged bytes


def test_layout_manifest_and_eager_read(tmp_path, small_threshold):
  records = _records()
  m = _write(str(tmp_path), records)
  names = sorted(os.listdir(tmp_path / 'train'))
  assert names == [
    'manifest.json',
    'xray-00000-of-00002.array_record',
    'xray-00000-of-00002.arrays',
    'xray-00001-of-00002.array_record',
    'xray-00001-of-00002.arrays',
  ]
  for f in m['modalities']['xray']['files']:
    arrays = f['arrays']
    assert arrays['name'] == f['name'].replace('.array_record', '.arrays')
    assert os.path.getsize(tmp_path / 'train' / arrays['name']) == arrays['bytes']
  src = shards.open_source(str(tmp_path), 'train', 'xray')
  for i, r in enumerate(records):
    got = src[i]
    assert isinstance(got['image'], np.ndarray) and isinstance(got['mask'], np.ndarray)
    assert_same(r, got)


def test_inline_layout_on_request(tmp_path, small_threshold):
  m = _write(str(tmp_path), _records(), arrays=False)
  assert not [n for n in os.listdir(tmp_path / 'train') if n.endswith('.arrays')]
  assert all('arrays' not in f for f in m['modalities']['xray']['files'])


def test_batches_equal_the_inline_layout(tmp_path, small_threshold, monkeypatch):
  """Lazy records read into strided batch slots (records narrower than the pad) give the very
  batches the inline layout gives: same pixels, same zero padding, same extents, same order."""
  records = _records()
  a, b = str(tmp_path / 'arrays'), str(tmp_path / 'inline')
  _write(a, records)
  _write(b, records, arrays=False)
  lazy = shards.open_source(a, 'train', 'xray', lazy=True)
  assert isinstance(lazy[0]['image'], rec.External)
  kw = dict(seed=3, image_size=32, num_epochs=2)
  monkeypatch.setattr(buffers, 'MIN_BYTES', 0)  # pooled batch buffers, reused while iterating
  streamed = [
    {m: {k: v.copy() for k, v in x.items()} for m, x in batch.items()}
    for batch in pl.pretrain_loader(a, 'train', {'xray': 2}, **kw)
  ]
  got = list(pl.pretrain_loader(a, 'train', {'xray': 2}, **kw))
  want = list(pl.pretrain_loader(b, 'train', {'xray': 2}, **kw))
  assert len(got) == len(want) == 5
  for x, y in zip(got, want):
    assert x['xray'].keys() == y['xray'].keys()
    for k in x['xray']:
      np.testing.assert_array_equal(x['xray'][k], y['xray'][k])
  for x, y in zip(streamed, want):  # each batch dropped before the next: buffers were reused
    for k in x['xray']:
      np.testing.assert_array_equal(x['xray'][k], y['xray'][k])
  split = pl.load_split_arrays(a, 'train', 'xray', 48)  # eager: evaluation reads them too
  ref = pl.load_split_arrays(b, 'train', 'xray', 48)
  for k in ('image', 'mask', 'label'):
    np.testing.assert_array_equal(split[k], ref[k])


def _array_file(root):
  return os.path.join(root, 'train', 'xray-00000-of-00002.arrays')


def _flip(path, at):
  with open(path, 'r+b') as f:
    f.seek(at)
    byte = f.read(1)
    f.seek(at)
    f.write(bytes([byte[0] ^ 0xFF]))


def test_damaged_array_file_errors_name_the_file_and_record(tmp_path, small_threshold):
  root = str(tmp_path)
  _write(root, _records())
  path = _array_file(root)
  _flip(path, 5)  # inside record 0's image
  with pytest.raises(shards.ShardError) as e:
    shards.open_source(root, 'train', 'xray')  # verify: sha256 at open
  assert str(e.value) == f'{path}: sha256 mismatch with manifest (corrupt)'
  src = shards.open_source(root, 'train', 'xray', verify=False)
  with pytest.raises(shards.ShardError) as e:
    src[0]
  msg = str(e.value)
  assert 'record 0' in msg and 'xray-00000-of-00002.arrays' in msg and 'CRC32C' in msg
  assert '\n' not in msg
  lazy = shards.open_source(root, 'train', 'xray', verify=False, lazy=True)
  it = pl.pretrain_loader(root, 'train', {'xray': 5}, seed=0, image_size=32, verify=False)
  with pytest.raises(rec.RecordError, match=r'record 0 \(xray-00000-of-00002.arrays\)'):
    next(it)  # the batch's read of the slot checks the CRC too
  assert isinstance(lazy[1]['image'], rec.External)


def test_missing_or_truncated_array_file(tmp_path, small_threshold):
  root = str(tmp_path)
  _write(root, _records())
  path = _array_file(root)
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:-100])
  for verify in (True, False):
    with pytest.raises(shards.ShardError, match='truncated'):
      shards.open_source(root, 'train', 'xray', verify=verify)
  os.remove(path)
  with pytest.raises(shards.ShardError) as e:
    shards.open_source(root, 'train', 'xray', verify=False)
  assert str(e.value) == f'{path}: array file missing'


def test_rewrite_without_large_records_drops_the_old_array_file(tmp_path, small_threshold):
  root = str(tmp_path)
  _write(root, _records())
  rng = np.random.default_rng(2)
  shards.write_split(root, 'train', {'xray': [_xray(rng, 8, 8, 'a')]}, seed=0)
  assert sorted(os.listdir(tmp_path / 'train')) == [
    'manifest.json',
    'xray-00000-of-00001.array_record',
  ]
  path = os.path.join(root, 'train', 'x.array_record')
  entry = shards.write_shard(path, [rec.encode(_xray(rng, 40, 40, 'b'))])
  assert os.path.exists(shards.array_file_path(path)) and entry['arrays']['bytes'] > 0
  shards.write_shard(path, [rec.encode(_xray(rng, 8, 8, 'c'))])  # same shard, small records
  assert not os.path.exists(shards.array_file_path(path))


def test_external_is_never_pickled(tmp_path, small_threshold):
  import pickle  # only to prove an unread array cannot leave its process

  _write(str(tmp_path), _records())
  image = shards.open_source(str(tmp_path), 'train', 'xray', lazy=True)[0]['image']
  with pytest.raises(TypeError, match='materialise'):
    pickle.dumps(image)


def test_data_prep_writes_checks_and_prunes_array_files(tmp_path, monkeypatch):
  """data_prep's runner: array files land beside their shards, a damaged one makes its shard be
  converted again (byte-identical), and a smaller plan removes the stale ones."""
  from tests import test_prep_runner as tpr

  monkeypatch.setattr(shards, 'ARRAY_FILE_MIN_BYTES', 16)  # the runner's 6x5 images: 30 bytes
  items = tpr._items()
  assert tpr.runner.run('toy', items, tpr.convert, tpr._options(tmp_path)) == 0
  first = tpr._tree(tmp_path)
  arrays = sorted(p for p in first if p.endswith('.arrays'))
  assert arrays and len(arrays) == len([p for p in first if p.endswith('.array_record')])
  _flip(tmp_path / arrays[0], 3)
  tpr.CALLS.clear()
  assert tpr.runner.run('toy', items, tpr.convert, tpr._options(tmp_path)) == 0
  assert 0 < len(tpr.CALLS) <= 5 and tpr._tree(tmp_path) == first
  tpr.runner.run('toy', items[:8], tpr.convert, tpr._options(tmp_path, test_fraction=0))
  for split in ('train', 'val'):
    files = shards.read_manifest(str(tmp_path), split)['modalities']['xray']['files']
    listed = {f['name'] for f in files} | {f['arrays']['name'] for f in files}
    assert set(os.listdir(tmp_path / split)) == listed | {'manifest.json'}


@pytest.mark.parametrize('task_name', ['phantom_xray_seg', 'phantom_xray_area', 'phantom_xray_cls'])
def test_fine_tuning_batches_equal_the_inline_layout(tmp_path, small_threshold, task_name):
  """Labels (from masks kept in array files, too) and fine-tuning batches are the inline ones."""
  from aacp_jax import task_specs
  from aacp_jax.data import labelled

  task = task_specs.get(task_name)
  rng = np.random.default_rng(3)
  records = [dict(r, mask=rng.choice([0, 1], r['mask'].shape).astype(np.uint8)) for r in _records()]
  a, b = str(tmp_path / 'arrays'), str(tmp_path / 'inline')
  _write(a, records)
  _write(b, records, arrays=False)
  mask = shards.open_source(a, 'train', 'xray', lazy=True)[0]['mask']
  assert isinstance(mask, rec.External)  # 1,440 bytes: in the array file with the image
  la, lb = labelled.read_labels(a, 'train', task), labelled.read_labels(b, 'train', task)
  for field in dataclasses.fields(la):
    np.testing.assert_array_equal(getattr(la, field.name), getattr(lb, field.name))
  kw = dict(seed=1, num_epochs=1)
  got = list(labelled.finetune_dataset(a, 'train', task, np.arange(5), 2, **kw))
  want = list(labelled.finetune_dataset(b, 'train', task, np.arange(5), 2, **kw))
  assert len(got) == len(want) == 2
  for x, y in zip(got, want):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
