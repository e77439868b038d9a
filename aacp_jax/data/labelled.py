"""Labelled input for fine-tuning: one modality's records with a task's labels, a label fraction
of the fitting split drawn per patient, shuffled, repeated and batched by Grain.

`task` is an `aacp_jax.task_specs.TaskSpec`. The host only decodes and pads (as the pretraining
loader): records keep their stored size, and the device resamples image and mask together.
Item i of the dataset is host batch i, so the iterator's checkpoint is one position and a resumed
run sees the same batches.

Labels per kind (`LabelTable.values`): class ids int32 (binary, multiclass), int8 multi-hot with
-1 uncertain (multilabel), float32 targets (regression), and for segmentation the record's class
ids after `mask_values` (stored value of each class) are mapped to 0..C-1, with any other stored
value an error naming the record.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from aacp_jax.data import pipeline, records, shards

# What a fine-tuning host batch holds besides the task's label key (and 'extent' when padded).
IMAGE_KEYS = ('image', 'landmarks', 'landmark_visible')


@dataclasses.dataclass(frozen=True)
class LabelTable:
  """Per record of a split: `subjects` (str), `strata` (int: class id, first positive label, or
  whether a mask holds foreground) and `values` (what the task predicts; see module docstring)."""

  subjects: np.ndarray
  strata: np.ndarray
  values: np.ndarray


def _where(root, split, modality, i):
  return f'{root}/{split}/{modality} record {i}'


def mask_lut(task) -> np.ndarray | None:
  """uint8 (256,) stored mask value -> class id, 255 where no class has that value."""
  if task.kind != 'segmentation':
    return None
  lut = np.full(256, 255, np.uint8)
  for c, v in enumerate(task.mask_values or range(task.num_outputs)):
    lut[int(v)] = c
  return lut


def record_value(record, task, where: str, lut=None):
  """The record's label for `task`, checked; one-line ValueError naming `where` otherwise."""
  key = task.label_key
  if task.target == 'lesion_area':
    if 'mask' not in record:
      raise ValueError(f'{where}: task {task.name} derives its target from a mask; none stored')
    return np.float32(100.0 * np.mean(np.asarray(record['mask']) > 0))
  if key not in record:
    raise ValueError(f'{where}: task {task.name} needs {key!r}, which the record does not hold')
  value = record[key]
  if task.kind in ('binary', 'multiclass'):
    value = int(value)
    if not 0 <= value < task.num_outputs:
      raise ValueError(
        f'{where}: label {value} outside the {task.num_outputs} classes of task {task.name}'
      )
    return np.int32(value)
  if task.kind == 'multilabel':
    value = np.asarray(value, np.int8)
    if value.shape != (task.num_outputs,):
      raise ValueError(
        f'{where}: labels of shape {value.shape}, task {task.name} has {task.num_outputs}'
      )
    return value
  if task.kind == 'regression':
    value = np.float32(value)
    if not np.isfinite(value):
      raise ValueError(f'{where}: target {value} is not finite')
    return value
  mapped = (lut if lut is not None else mask_lut(task))[np.asarray(value, np.uint8)]
  if (mapped == 255).any():
    bad = np.unique(np.asarray(value)[mapped == 255])
    raise ValueError(
      f"{where}: mask values {bad.tolist()} are not among task {task.name}'s "
      f'{list(task.mask_values)}'
    )
  return mapped


def _stratum(value, task) -> int:
  if task.kind in ('binary', 'multiclass'):
    return int(value)
  if task.kind == 'segmentation':
    return int((value > 0).any())
  return 0  # multilabel strata come from the multi-hot rows; regression: none


def read_labels(root: str, split: str, task, *, verify: bool = True) -> LabelTable:
  """Every record's subject and label for `task` (one decode pass; images are not read)."""
  source = shards.open_source(root, split, task.modality, verify=verify, lazy=True)
  if not len(source):
    raise ValueError(f'{root}/{split}/{task.modality}: no records')
  lut = mask_lut(task)
  subjects, strata, values = [], [], []
  for i in range(len(source)):
    record = _with_mask(source[i])
    value = record_value(record, task, _where(root, split, task.modality, i), lut)
    subjects.append(record['subject'])
    strata.append(_stratum(value, task))
    values.append(value if task.kind != 'segmentation' else np.int8(0))
  values = np.stack(values)
  if task.kind == 'multilabel':
    strata_arr = np.where(values > 0, 1, 0).astype(np.int8)  # multi-hot rows: fractions' strata
  else:
    strata_arr = np.asarray(strata, np.int32)
  return LabelTable(np.asarray(subjects), strata_arr, values)


def _with_mask(record):
  """A lazy record with its mask read (labels come from it); the image stays unread."""
  if isinstance(record.get('mask'), records.External):
    record = dict(record, mask=record['mask'].materialise())
  return record


class _Select:
  """A random-access source restricted to `indices` (the drawn label fraction)."""

  def __init__(self, source, indices):
    self._source, self._indices = source, np.asarray(indices, np.int64)

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, i):
    return self._source[int(self._indices[i])]


class ToItem:
  """Record -> the arrays a fine-tuning batch needs: image, landmarks, the task's label."""

  def __init__(self, task, where: str):
    self.task, self.where, self.lut = task, where, mask_lut(task)

  def __call__(self, record):
    record = _with_mask(record)  # the image, if in an array file, is read into its batch slot
    out = {k: record[k] for k in IMAGE_KEYS}
    out['subject'] = record['subject']
    key = 'mask' if self.task.kind == 'segmentation' else 'y'
    out[key] = record_value(record, self.task, self.where, self.lut)
    return out


def finetune_dataset(
  root: str,
  split: str,
  task,
  indices,
  per_host_batch: int,
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  num_epochs: int | None = None,
  verify: bool = True,
) -> grain.MapDataset:
  """Host batches of the records at `indices` (a label fraction): {'image', 'landmarks',
  'landmark_visible', 'y' (or 'mask' for segmentation)[, 'extent']}, shuffled per epoch,
  repeated (`num_epochs` None: forever) before batching, so a fraction smaller than a batch
  still gives full batches."""
  modality = task.modality
  source = _Select(shards.open_source(root, split, modality, verify=verify, lazy=True), indices)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) < 1:
    raise ValueError(
      f'{root}/{split}/{modality}: {len(indices)} records drawn leave none for process '
      f'{process_index} of {process_count}'
    )
  ds = ds.shuffle(seed=int(seed)).repeat(num_epochs)
  ds = ds.map(ToItem(task, f'{root}/{split}/{modality}'))
  hw, fixed = pipeline.pad_info(root, split, modality)
  hw = hw or pipeline.pad_hw(root, split, modality)
  return ds.batch(
    per_host_batch,
    drop_remainder=True,
    batch_fn=pipeline.PadBatch(hw, f'{root}/{split}/{modality}', extent=not fixed, reuse=True),
  )


def finetune_loader(*args, **kwargs) -> grain.DatasetIterator:
  """`finetune_dataset(...)` as a checkpointable iterator (bounded prefetch)."""
  ds = finetune_dataset(*args, **kwargs)
  return iter(ds.to_iter_dataset(pipeline.READ_OPTIONS))
