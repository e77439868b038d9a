"""Grain input pipelines: per-host pretraining batches of every modality, and whole-split arrays.

Per modality: ArrayRecord source -> this process's slice -> shuffle -> repeat -> decode/resize ->
host batch. The modalities are then zipped by batch index into one random-access ``MapDataset``, so the
iterator's checkpoint state is a single position (a few bytes of JSON) and resuming replays exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import zlib

import grain
import numpy as np
from scipy import ndimage

from aacp_jax.data import shards

TRAIN_KEYS = ('image', 'landmarks', 'landmark_visible', 'landmarks_canonical', 'organs')
# Bounded prefetch: the Grain default (500 elements) would hold gigabytes of CT host batches.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


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


def _training_arrays(record: dict, image_size: int) -> dict:
  out = {k: record[k] for k in TRAIN_KEYS}
  out['image'] = resize_image(record['image'], image_size)
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
) -> grain.MapDataset:
  """The random-access dataset behind ``pretrain_loader`` (item i = host batch i of all modalities)."""
  if not per_host_batch:
    raise ValueError('per_host_batch is empty: name at least one modality')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, process_count={process_count})')
  per_modality = {}
  for modality in sorted(per_host_batch):
    batch = int(per_host_batch[modality])
    ds = grain.MapDataset.source(shards.open_source(root, split, modality, verify=verify))
    total = len(ds)
    ds = ds[process_index::process_count]  # Disjoint, near-equal strided slices per process.
    if batch < 1 or len(ds) < batch:
      raise ValueError(
        f'{root}/{split}/{modality}: {len(ds)} records for process {process_index} of '
        f'{process_count} ({total} in all) < per-host batch {batch}'
      )
    ds = ds.shuffle(seed=_modality_seed(seed, modality)).repeat(num_epochs)
    ds = ds.map(functools.partial(_training_arrays, image_size=image_size))
    per_modality[modality] = ds.batch(batch, drop_remainder=True)
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
) -> grain.DatasetIterator:
  """Checkpointable iterator of ``{modality: {key: (B, ...) numpy}}`` host batches.

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
  )
  it_ds = ds.to_iter_dataset(_READ_OPTIONS)
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


def load_split_arrays(
  root: str, split: str, modality: str, image_size: int, *, verify: bool = True
) -> dict[str, np.ndarray]:
  """Every record of a split stacked: ``TRAIN_KEYS`` plus ``label`` (int32, -1 where a record has
  none), ``subject`` (str) and, when every record has one, ``mask`` resized to ``image_size``."""
  source = shards.open_source(root, split, modality, verify=verify)
  if not len(source):
    raise ValueError(f'{root}/{split}/{modality}: no records')
  rows: dict[str, list] = {k: [] for k in TRAIN_KEYS + ('label', 'subject', 'mask')}
  for i in range(len(source)):
    record = source[i]
    for k, v in _training_arrays(record, image_size).items():
      rows[k].append(v)
    rows['label'].append(int(record.get('label', -1)))
    rows['subject'].append(record['subject'])
    if 'mask' in record:
      # Nearest neighbour keeps masks binary.
      rows['mask'].append(resize_image(record['mask'][..., None], image_size, order=0)[..., 0])
  out = {k: np.stack(rows[k]) for k in TRAIN_KEYS}
  out['label'] = np.asarray(rows['label'], np.int32)
  out['subject'] = np.asarray(rows['subject'])
  if len(rows['mask']) == len(source):
    out['mask'] = np.stack(rows['mask'])
  return out
