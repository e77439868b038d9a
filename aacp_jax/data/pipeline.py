"""Grain input pipelines: per-host pretraining batches of every modality, and whole-split arrays.

Per modality: ArrayRecord source -> this process's slice -> shuffle -> repeat -> decode -> host
batch. The modalities are then zipped by batch index into one random-access ``MapDataset``, so the
iterator's checkpoint state is a single position (a few bytes of JSON) and resuming replays exactly.

The host never resamples: records keep their stored size and dtype, and a batch pads them to the
modality's largest record (one array shape per modality, so the step compiles once) with each
record's true (h, w) in ``extent``. The on-device augmentation resizes to the training size inside
its single resample (``augment.augment_batch(..., extent=, out_size=)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import zlib

import grain
import numpy as np
from scipy import ndimage

from aacp_jax.data import buffers, records, shards

TRAIN_KEYS = ('image', 'landmarks', 'landmark_visible', 'landmarks_canonical', 'organs')
# What a pretraining host batch holds: TRAIN_KEYS, plus each record's valid (h, w) in the padding
# when the modality's records differ in size (records of one size need none: the array is the
# record, and the device then runs the very program it ran before records could differ).
BATCH_KEYS = TRAIN_KEYS + ('extent',)
# Spatial arrays padded to the batch's common (H, W); the rest stack as they are.
_PADDED = ('image', 'mask')
# Bounded prefetch: the Grain default (500 elements) would hold gigabytes of CT host batches.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def resize_image(image: np.ndarray, image_size: int, order: int = 1) -> np.ndarray:
  """Resizes ``(H, W, C)`` to ``(image_size, image_size, C)`` keeping the dtype.

  ``grid_mode=True`` maps pixel edges to pixel edges, the convention normalised landmarks use, so the
  landmarks stay valid unchanged.
  """
  h, w = image.shape[:2]
  if (h, w) == (image_size, image_size):
    return image
  factors = (image_size / h, image_size / w) + (1,) * (image.ndim - 2)
  out = ndimage.zoom(image.astype(np.float32), factors, order=order, mode='nearest', grid_mode=True)
  if image.dtype.kind in 'iu':
    info = np.iinfo(image.dtype)
    out = np.clip(np.rint(out), info.min, info.max)
  return out.astype(image.dtype)


def _training_arrays(record: dict, image_size: int | None = None) -> dict:
  """The record's TRAIN_KEYS, as stored (views of the decoded bytes: nothing is copied or
  resized here; ``image_size`` is unused and kept for callers of the old signature)."""
  del image_size
  return {k: record[k] for k in TRAIN_KEYS}


def pad_hw(root: str, split: str, modality: str) -> tuple[int, int]:
  """The (H, W) a modality's batches are padded to: its records' largest, from the manifest.

  A split of one size has it in ``shapes``; mixed sizes need the maximum, which ``write_split``
  records as ``max_hw`` and data_prep as ``meta.stats[modality].image_hw.max``.
  """
  hw, _ = pad_info(root, split, modality)
  if hw is None:
    raise ValueError(
      f'{root}/{split}/{modality}: records of several sizes and no maximum (max_hw) in the '
      'manifest; pass pad_to={modality: (h, w)}'
    )
  return hw


def pad_info(root, split, modality):
  """((H, W) or None when unknown, whether every record has exactly that size)."""
  manifest = shards.read_manifest(root, split)
  entry = manifest['modalities'].get(modality)
  if entry is None:
    raise ValueError(f'{root}/{split}: no modality {modality!r}')
  shape = (entry.get('shapes') or {}).get('image')
  if isinstance(shape, list):
    return (int(shape[0]), int(shape[1])), True
  stats = ((manifest.get('meta') or {}).get('stats') or {}).get(modality) or {}
  hw = entry.get('max_hw') or (stats.get('image_hw') or {}).get('max')
  return ((int(hw[0]), int(hw[1])) if hw else None), False


class PadBatch:
  """Grain ``batch_fn``: stacks records, padding 'image' (and 'mask') to ``(h, w)`` and adding
  ``extent`` (B, 2) int32, each record's true size (``extent=False``: records known to be of
  size ``hw``, so no extent). One copy per record, straight into the batch: an unread
  ``records.External`` (a lazy source's array-file image) is read into its slot by ``preadv``.

  The padding is zero; it is never read (the device resample treats it as outside the record).
  """

  def __init__(self, hw: tuple[int, int], where: str, extent: bool = True, reuse: bool = False):
    self.hw, self.where, self.extent = (int(hw[0]), int(hw[1])), where, bool(extent)
    # reuse: large batch arrays come from a pool, so a 0.5 GiB CT batch does not fault in fresh
    # pages every step (data/buffers.py: reused only once nothing references the old batch).
    self.pool = buffers.BufferPool() if reuse else None

  def _empty(self, shape, dtype) -> np.ndarray:
    return np.empty(shape, dtype) if self.pool is None else self.pool.take(shape, dtype)

  def __call__(self, items):
    h, w = self.hw
    out = {}
    for key in items[0]:
      if key == 'subject':  # carried only to name a record in the error below
        continue
      if key not in _PADDED:
        out[key] = np.stack([it[key] for it in items])
        continue
      first = items[0][key]
      batch = self._empty((len(items), h, w) + tuple(first.shape[2:]), first.dtype)
      for i, it in enumerate(items):
        a = it[key]
        if a.shape[0] > h or a.shape[1] > w:
          raise ValueError(
            f'{self.where}: record of subject {it.get("subject", "?")} has {key} '
            f'{a.shape[0]}x{a.shape[1]}, larger than the pad size {h}x{w}'
          )
        if isinstance(a, records.External):
          a.read_into(batch[i, : a.shape[0], : a.shape[1]])  # from the array file, checked
        else:
          batch[i, : a.shape[0], : a.shape[1]] = a
        batch[i, a.shape[0] :] = 0
        batch[i, : a.shape[0], a.shape[1] :] = 0
      out[key] = batch
    if self.extent:
      out['extent'] = np.asarray([it['image'].shape[:2] for it in items], np.int32)
    return out


def _batch_arrays(record: dict) -> dict:
  out = _training_arrays(record)
  out['subject'] = record['subject']  # names the record in a pad-size error, dropped after
  return out


class _ZipBatches(grain.MapDataset):
  """Item ``i`` is ``{modality: batch i of that modality}``; length is the shortest modality's."""

  def __init__(self, datasets: Mapping[str, grain.MapDataset]):
    self._names = tuple(datasets)
    super().__init__([datasets[m] for m in self._names])

  def __len__(self) -> int:
    return min(len(p) for p in self.parents)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return {m: p[index] for m, p in zip(self._names, self.parents)}

  def __str__(self) -> str:
    return f'ZipBatches({", ".join(self._names)})'


def _modality_seed(seed: int, modality: str) -> int:
  # Distinct but reproducible per modality, so two modalities of equal size do not shuffle alike.
  return (int(seed) * 1_000_003 + zlib.crc32(modality.encode())) % (2**31 - 1)


def pretrain_dataset(
  root: str,
  split: str,
  per_host_batch: Mapping[str, int],
  *,
  seed: int,
  image_size: int,
  process_index: int = 0,
  process_count: int = 1,
  num_epochs: int | None = None,
  verify: bool = True,
  pad_to: Mapping[str, tuple[int, int]] | None = None,
  open_source: Callable = shards.open_source,
) -> grain.MapDataset:
  """The random-access dataset behind ``pretrain_loader`` (item i = host batch i of all modalities).

  ``image_size`` is the training size the device resamples to; host batches hold the records as
  stored, padded per modality to ``pad_to[m]`` (default ``pad_hw``: the largest record).
  ``open_source(root, split, modality, verify=, lazy=)`` gives each modality's records (``bench input``
  swaps in a larger virtual source: Grain's shuffle costs ~2 ms a record on 16 records, 6 us on
  100k, so a small benchmark split would measure the shuffle, not the input).
  """
  del image_size  # the device resizes; kept so every caller states the training size
  if not per_host_batch:
    raise ValueError('per_host_batch is empty: name at least one modality')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, process_count={process_count})')
  per_modality = {}
  for modality in sorted(per_host_batch):
    batch = int(per_host_batch[modality])
    # lazy: arrays kept in array files are read by PadBatch straight into their batch slots.
    ds = grain.MapDataset.source(open_source(root, split, modality, verify=verify, lazy=True))
    total = len(ds)
    ds = ds[process_index::process_count]  # Disjoint, near-equal strided slices per process.
    if batch < 1 or len(ds) < batch:
      raise ValueError(
        f'{root}/{split}/{modality}: {len(ds)} records for process {process_index} of '
        f'{process_count} ({total} in all) < per-host batch {batch}'
      )
    ds = ds.shuffle(seed=_modality_seed(seed, modality)).repeat(num_epochs)
    ds = ds.map(_batch_arrays)
    hw, fixed = pad_info(root, split, modality)
    want = (pad_to or {}).get(modality)
    want = (int(want[0]), int(want[1])) if want else pad_hw(root, split, modality)
    pad = PadBatch(want, f'{root}/{split}/{modality}', extent=not fixed or want != hw, reuse=True)
    per_modality[modality] = ds.batch(batch, drop_remainder=True, batch_fn=pad)
  return _ZipBatches(per_modality)


def pretrain_loader(
  root: str,
  split: str,
  per_host_batch: Mapping[str, int],
  *,
  seed: int,
  image_size: int,
  process_index: int = 0,
  process_count: int = 1,
  num_epochs: int | None = None,
  worker_count: int = 0,
  verify: bool = True,
  pad_to: Mapping[str, tuple[int, int]] | None = None,
  open_source: Callable = shards.open_source,
) -> grain.DatasetIterator:
  """Checkpointable iterator of ``{modality: {key: (B, ...) numpy}}`` host batches (``BATCH_KEYS``).

  ``num_epochs`` None repeats forever; with a number, iteration stops when the modality with the
  fewest batches runs out. ``worker_count`` > 0 decodes in that many worker processes.
  """
  ds = pretrain_dataset(
    root,
    split,
    per_host_batch,
    seed=seed,
    image_size=image_size,
    process_index=process_index,
    process_count=process_count,
    num_epochs=num_epochs,
    verify=verify,
    pad_to=pad_to,
    open_source=open_source,
  )
  it_ds = ds.to_iter_dataset(READ_OPTIONS)
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


def _host_resize(images, extent, image_size, order):
  return np.stack([resize_image(x[:h, :w], image_size, order) for x, (h, w) in zip(images, extent)])


def load_split_arrays(
  root: str,
  split: str,
  modality: str,
  image_size: int,
  *,
  verify: bool = True,
  resize: Callable | None = None,
) -> dict[str, np.ndarray]:
  """Every record of a split stacked: ``TRAIN_KEYS`` plus ``label`` (int32, -1 where a record has
  none), ``subject`` (str) and, when every record has one, ``labels`` (int8 multi-hot, -1
  uncertain), ``target`` (float32) and ``mask``, all at ``image_size``.

  Records already at ``image_size`` are returned as stored. The others are resized by
  ``resize(images, extent, image_size, order)`` (padded raw batch -> (N, S, S, C); order 1 for
  images, 0 for masks), cast back to the stored dtype (integers rounded). Evaluation passes the
  device resample of the augmentation (``eval.embed.load_split``), so it sees the training frame;
  the default, ``resize_image`` on the host, is for tools without JAX devices.
  """
  source = shards.open_source(root, split, modality, verify=verify)
  if not len(source):
    raise ValueError(f'{root}/{split}/{modality}: no records')
  records = [source[i] for i in range(len(source))]
  hw = tuple(int(max(r['image'].shape[i] for r in records)) for i in (0, 1))
  where = f'{root}/{split}/{modality}'
  stack = PadBatch(hw, where)([_training_arrays(r) for r in records])
  out = {k: stack[k] for k in TRAIN_KEYS}
  out['label'] = np.asarray([int(r.get('label', -1)) for r in records], np.int32)
  out['subject'] = np.asarray([r['subject'] for r in records])
  # Multi-label findings (CheXpert, MIMIC-CXR) and regression targets (bone age), when every
  # record has them.
  for key, dtype in (('labels', np.int8), ('target', np.float32)):
    if all(key in r for r in records):
      out[key] = np.stack([np.asarray(r[key], dtype) for r in records])
  masks = len(records) and all('mask' in r for r in records)
  if masks:
    out['mask'] = PadBatch(hw, where)([{'image': r['mask'][..., None]} for r in records])['image']
  extent = stack['extent']
  if (extent == image_size).all() and hw == (image_size, image_size):
    if masks:
      out['mask'] = out['mask'][..., 0]
    return out
  resize = resize or _host_resize
  dtype = out['image'].dtype
  image = np.asarray(resize(out['image'], extent, image_size, 1))
  if dtype.kind in 'iu':
    info = np.iinfo(dtype)
    image = np.clip(np.rint(image), info.min, info.max)
  out['image'] = image.astype(dtype)
  if masks:
    out['mask'] = np.asarray(resize(out['mask'], extent, image_size, 0))[..., 0].astype(np.uint8)
  return out
