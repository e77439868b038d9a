"""Grain pipeline: batch shapes, determinism, process sharding, checkpoint/resume, split arrays."""

import hashlib

import grain
import numpy as np
import pytest

from aacp_jax.data import landmarks as lm
from aacp_jax.data import phantoms as ph
from aacp_jax.data import pipeline as pl
from aacp_jax.data import shards

S = 24
COUNTS = {'train': {'ct': 12, 'xray': 16, 'mri': 16}, 'test': {'mri': 6}}
BATCH = {'ct': 2, 'xray': 4, 'mri': 3}


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return ph.build(
    str(tmp_path_factory.mktemp('ph')), seed=0, image_size=S, counts=COUNTS, progress=False
  )


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for m in x:
      for k in pl.TRAIN_KEYS:
        np.testing.assert_array_equal(x[m][k], y[m][k])


def digest(image):
  return hashlib.sha256(image.tobytes()).hexdigest()


def test_batch_shapes_and_dtypes(root):
  batch = next(pl.pretrain_loader(root, 'train', BATCH, seed=0, image_size=S))
  assert set(batch) == set(BATCH)
  channels = {'ct': 64, 'xray': 1, 'mri': 3}
  dtypes = {'ct': np.int16, 'xray': np.uint8, 'mri': np.float16}
  k, o = len(lm.LANDMARKS), len(lm.ORGANS)
  for m, b in BATCH.items():
    assert set(batch[m]) == set(pl.TRAIN_KEYS)  # one record size: no 'extent' needed
    assert batch[m]['image'].shape == (b, S, S, channels[m])
    assert batch[m]['image'].dtype == dtypes[m]
    assert batch[m]['landmarks'].shape == (b, k, 2) and batch[m]['landmarks'].dtype == np.float32
    assert batch[m]['landmarks_canonical'].shape == (b, k, 2)
    assert (
      batch[m]['landmark_visible'].shape == (b, k) and batch[m]['landmark_visible'].dtype == bool
    )
    assert batch[m]['organs'].shape == (b, o) and batch[m]['organs'].dtype == np.uint8


def _xray(rng, h, w, subject):
  pts, vis, can = lm.empty_landmarks()
  pts[:2], vis[:2], can[:2] = rng.uniform(0, 1, (2, 2)), True, rng.uniform(0, 1, (2, 2))
  return dict(
    image=rng.integers(1, 255, (h, w, 1), endpoint=True).astype(np.uint8),
    modality='xray',
    region='chest',
    source='unit',
    subject=subject,
    spacing=np.ones(3, np.float32),
    landmarks=pts,
    landmark_visible=vis,
    landmarks_canonical=can,
    organs=lm.organ_multi_hot(['lungs']),
    mask=rng.choice([0, 2, 5], (h, w)).astype(np.uint8),
    label=np.array(1, np.int32),
  )


SIZES = ((10, 12), (16, 8), (6, 6))


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
  """X-rays of three sizes (as real shards hold), so batches must pad."""
  root = str(tmp_path_factory.mktemp('mixed'))
  rng = np.random.default_rng(0)
  records = [_xray(rng, h, w, f's{i}') for i, (h, w) in enumerate(SIZES)]
  shards.write_split(root, 'train', {'xray': records}, seed=0)
  return root, records


def test_mixed_sizes_pad_on_the_host_without_resampling(mixed):
  root, records = mixed
  assert shards.read_manifest(root, 'train')['modalities']['xray']['max_hw'] == [16, 12]
  assert pl.pad_hw(root, 'train', 'xray') == (16, 12)
  it = pl.pretrain_loader(root, 'train', {'xray': 3}, seed=0, image_size=S, num_epochs=1)
  batch = next(it)['xray']
  assert set(batch) == set(pl.BATCH_KEYS)
  assert batch['image'].shape == (3, 16, 12, 1) and batch['image'].dtype == np.uint8
  by_subject = {r['image'].tobytes(): r for r in records}
  for image, (h, w) in zip(batch['image'], batch['extent']):
    r = by_subject[np.ascontiguousarray(image[:h, :w]).tobytes()]  # stored bytes, unchanged
    assert (h, w) == r['image'].shape[:2]
    assert not image[h:].any() and not image[:, w:].any()  # zero padding


def test_pad_size_errors_name_the_record(mixed):
  root, _ = mixed
  it = pl.pretrain_loader(
    root, 'train', {'xray': 3}, seed=0, image_size=S, pad_to={'xray': (12, 12)}
  )
  with pytest.raises(ValueError) as e:
    next(it)
  msg = str(e.value)
  assert 'subject s1' in msg and '16x8' in msg and '12x12' in msg and '\n' not in msg


def test_eval_split_is_the_device_resample_of_each_record(mixed):
  """Evaluation images: the augmentation's resample of each record (pixel-centre bilinear,
  scipy's grid-mode zoom as reference), rounded to the stored dtype; masks label-exact
  (nearest: the record pixel whose cell holds the output pixel's centre)."""
  from scipy import ndimage

  from aacp_jax.eval import embed

  root, records = mixed
  arrays = embed.load_split(root, 'train', 'xray', 8)
  assert arrays['image'].shape == (3, 8, 8, 1) and arrays['image'].dtype == np.uint8
  assert arrays['mask'].shape == (3, 8, 8) and set(np.unique(arrays['mask'])) <= {0, 2, 5}
  for i, r in enumerate(records):
    (h, w), x = r['image'].shape[:2], r['image'].astype(np.float64)
    ref = ndimage.zoom(x, (8 / h, 8 / w, 1), order=1, mode='grid-constant', grid_mode=True)
    assert np.abs(arrays['image'][i].astype(float) - ref).max() <= 0.5 + 1e-3
    iy = np.floor((np.arange(8) + 0.5) * h / 8).astype(int)
    ix = np.floor((np.arange(8) + 0.5) * w / 8).astype(int)
    np.testing.assert_array_equal(arrays['mask'][i], r['mask'][iy][:, ix])


def test_resize_image_keeps_dtype_and_range():
  ct = np.full((8, 8, 64), 3000, np.int16)
  ct[:4] = -1024
  out = pl.resize_image(ct, 16)
  assert out.dtype == np.int16 and out.shape == (16, 16, 64)
  assert out.min() == -1024 and out.max() == 3000
  assert pl.resize_image(np.ones((5, 5, 3), np.float16), 7).dtype == np.float16


def test_deterministic_and_seeded(root):
  a = take(pl.pretrain_loader(root, 'train', BATCH, seed=1, image_size=S), 3)
  b = take(pl.pretrain_loader(root, 'train', BATCH, seed=1, image_size=S), 3)
  c = take(pl.pretrain_loader(root, 'train', BATCH, seed=2, image_size=S), 3)
  assert_batches_equal(a, b)
  assert any(digest(x['xray']['image']) != digest(y['xray']['image']) for x, y in zip(a, c))


def test_epochs_cover_every_record_once(root):
  it = pl.pretrain_loader(root, 'train', {'xray': 4}, seed=0, image_size=S, num_epochs=1)
  seen = [digest(img) for batch in it for img in batch['xray']['image']]
  assert len(seen) == 16 and len(set(seen)) == 16


def test_processes_get_disjoint_records(root):
  per_process = []
  for p in range(3):
    it = pl.pretrain_loader(
      root,
      'train',
      {'mri': 1},
      seed=0,
      image_size=S,
      process_index=p,
      process_count=3,
      num_epochs=1,
    )
    per_process.append({digest(b['mri']['image'][0]) for b in it})
  assert [len(s) for s in per_process] == [6, 5, 5]
  assert len(set.union(*per_process)) == 16  # disjoint, and together the whole split


def test_too_few_records_is_one_line_error(root):
  with pytest.raises(ValueError) as e:
    pl.pretrain_loader(
      root, 'train', {'ct': 7}, seed=0, image_size=S, process_index=1, process_count=2
    )
  msg = str(e.value)
  assert 'ct' in msg and '6 records' in msg and 'batch 7' in msg and '\n' not in msg


def test_get_set_state_resume(root):
  it = pl.pretrain_loader(root, 'train', BATCH, seed=0, image_size=S)
  take(it, 3)
  state = it.get_state()
  expected = take(it, 2)
  fresh = pl.pretrain_loader(root, 'train', BATCH, seed=0, image_size=S)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 2), expected)


def test_orbax_checkpoint_round_trip(root, tmp_path):
  import orbax.checkpoint as ocp  # a required dependency

  it = pl.pretrain_loader(root, 'train', BATCH, seed=0, image_size=S)
  take(it, 3)
  ckpt = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  ckpt.save(tmp_path / 'iter', args=grain.checkpoint.CheckpointSave(it))
  expected = take(it, 2)
  fresh = pl.pretrain_loader(root, 'train', BATCH, seed=0, image_size=S)
  restored = ckpt.restore(tmp_path / 'iter', args=grain.checkpoint.CheckpointRestore(fresh))
  assert_batches_equal(take(restored, 2), expected)


def test_load_split_arrays(root):
  arrays = pl.load_split_arrays(root, 'test', 'mri', S)
  assert set(arrays) == set(pl.TRAIN_KEYS) | {'label', 'subject', 'mask'}
  assert arrays['image'].shape == (6, S, S, 3) and arrays['image'].dtype == np.float16
  assert arrays['label'].dtype == np.int32 and arrays['label'].shape == (6,)
  assert len(set(arrays['subject'])) == 6
  np.testing.assert_array_equal(arrays['mask'].any(axis=(1, 2)), arrays['label'] == 1)
  resized = pl.load_split_arrays(root, 'test', 'mri', 32)
  assert resized['image'].shape == (6, 32, 32, 3) and resized['mask'].shape == (6, 32, 32)
  assert set(np.unique(resized['mask'])) <= {0, 1}


def _prefetch(root, **kw):
  from aacp_jax.train import inputs  # pylint: disable=g-import-not-at-top

  return inputs.Prefetch(pl.pretrain_loader(root, 'train', BATCH, seed=0, image_size=S, **kw), dict)


def test_prefetch_saves_the_consumed_position(root):
  """The thread runs ahead, but the state is that of the batches handed out: a resume from it
  replays exactly the batches that follow, not those after the prefetched one."""
  it = _prefetch(root)
  take(it, 3)
  state = it.get_state()
  assert isinstance(state, bytes)
  expected = take(it, 2)
  plain = pl.pretrain_loader(root, 'train', BATCH, seed=0, image_size=S)
  take(plain, 3)
  assert_batches_equal(expected, take(plain, 2))  # the same batches as without prefetching
  fresh = _prefetch(root)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 2), expected)
  take(it, 1)
  it.set_state(state)  # also on a running prefetcher: its queued batch is dropped
  assert_batches_equal(take(it, 2), expected)
  it.close()


def test_prefetch_orbax_round_trip_and_end(root, tmp_path):
  import orbax.checkpoint as ocp  # a required dependency

  it = _prefetch(root)
  take(it, 2)
  ckpt = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  ckpt.save(tmp_path / 'iter', args=grain.checkpoint.CheckpointSave(it))
  expected = take(it, 2)
  fresh = _prefetch(root)
  restored = ckpt.restore(tmp_path / 'iter', args=grain.checkpoint.CheckpointRestore(fresh))
  assert_batches_equal(take(restored, 2), expected)
  one_epoch = list(_prefetch(root, num_epochs=1))  # StopIteration reaches the consumer
  assert len(one_epoch) == 4 and it.wait_s >= 0 and it.batches == 4
