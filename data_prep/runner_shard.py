"""One shard of a data_prep run: convert its items, write the file, summarise (``runner``'s worker side).

A task is plain data (keys, payloads, subject hashes); this module writes the shard itself and hands
back a JSON-able summary, which also lands in a sidecar ``OUT/.progress/<split>/<shard>.json``. The
sidecar's fingerprint covers everything that decides the shard's bytes, so a re-run skips a shard
exactly when it would write the same bytes again.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import hashlib
import importlib
import json
import os
import re
import sys
import threading
import time
from typing import Any

import numpy as np

from aacp_jax.data import landmarks as lm
from aacp_jax.data import records as rec
from aacp_jax.data import shards
from aacp_jax.errors import one_line


# Item and Options live here, not in runner, because a worker rebuilds them from a task: runner
# imports this module, never the reverse (runner re-exports both under their usual names).
@dataclasses.dataclass(frozen=True)
class Item:
  """One input unit (an image, a volume, a case). ``subject`` is hashed, never written."""

  key: str
  subject: str
  modality: str
  payload: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Options:
  input: str
  output: str
  salt: bytes = dataclasses.field(repr=False)
  workers: int = 1
  seed: int = 0
  val_fraction: float = 0.1
  test_fraction: float = 0.1
  items_per_shard: int = 64
  image_size: int = 1024
  limit: int | None = None
  progress: bool = True
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Reject(Exception):
  """Raised by a converter: this item is rejected for ``kind`` (one word) with a one-line reason."""

  def __init__(self, kind: str, reason: str):
    super().__init__(f'{kind}: {reason}')
    self.kind, self.reason = kind, reason


def _paths(output, task):
  # Sidecars live outside the split folders: those hold only what a reader needs and may be shared;
  # sidecars name input paths (in their reject rows), which stay with the raw data.
  progress = os.path.join(output, '.progress', task['split'])
  return (
    os.path.join(output, task['split'], task['name']),
    os.path.join(progress, task['name'] + '.json'),
    os.path.join(progress, task['name'] + '.current'),
  )


def current_item(output: str, task: dict) -> str | None:
  """The key a worker was converting when it stopped (None if it was between items)."""
  try:
    with open(_paths(output, task)[2], encoding='utf-8') as f:
      return f.read() or None
  except OSError:
    return None


def clear_current(output: str, task: dict) -> None:
  try:
    os.remove(_paths(output, task)[2])
  except FileNotFoundError:
    pass


# What our writers name a file until it is complete: shards, sidecars, manifests, rejects.jsonl.
_TEMPORARY = re.compile(r'\.tmp-\d+$')


def remove_temporary(output: str) -> list[str]:
  """Deletes the half-written ``*.tmp-PID`` files a killed run left under ``output``; returns them.

  One run per ``--output`` at a time (as the README asks), so no live writer owns such a file.
  """
  removed = []
  folders = [output] + [os.path.join(output, d) for d in ('train', 'val', 'test')]
  folders += [os.path.join(output, '.progress', d) for d in ('train', 'val', 'test')]
  for folder in folders:
    try:
      names = os.listdir(folder)
    except OSError:
      continue
    for name in names:
      path = os.path.join(folder, name)
      if _TEMPORARY.search(name) and os.path.isfile(path):
        os.remove(path)
        removed.append(path)
  return removed


def _die_with(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(0.5)
  os._exit(1)  # pylint: disable=protected-access


def worker_init(parent: int) -> None:
  """Makes a worker process die with the parent that started it (``ProcessPoolExecutor`` initializer).

  A worker outlives a parent killed by SIGKILL: it would finish its task and write a shard nobody
  waits for, and one blocked in a reader would stay forever. On Linux the kernel kills it at once
  (``PR_SET_PDEATHSIG``); everywhere a daemon thread notices the new parent (reparenting) within 0.5 s.
  """
  if sys.platform.startswith('linux'):
    try:
      import ctypes  # pylint: disable=g-import-not-at-top
      import signal  # pylint: disable=g-import-not-at-top

      pr_set_pdeathsig = 1
      ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
      pass  # the thread below still covers it
  if os.getppid() != parent:  # the parent died before the signal was armed
    os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=_die_with, args=(parent,), daemon=True).start()


def _fingerprint(task, common) -> str:
  opts = {
    k: v
    for k, v in common['options'].items()
    if k not in ('salt', 'workers', 'progress', 'input', 'output', 'limit')
  }
  blob = json.dumps(
    {
      'items': task['items'],
      'modality': task['modality'],
      'options': opts,
      'dataset': common['dataset'],
      'convert': common['convert'],
      'code_version': common['code_version'],
      'salt_fingerprint': common['salt_fingerprint'],
    },
    sort_keys=True,
    default=str,
  )
  return hashlib.sha256(blob.encode()).hexdigest()


def _finished(shard_path, sidecar, fingerprint):
  try:
    with open(sidecar, encoding='utf-8') as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  entry = summary.get('file')
  if entry is None:  # every item was rejected: no shard file, by design
    if summary.get('fingerprint') != fingerprint or os.path.exists(shard_path):
      return None
    return summary
  if summary.get('fingerprint') != fingerprint or shards.check_files(
    os.path.dirname(shard_path), entry
  ):  # the shard and its array file, if any, as the summary recorded them
    return None
  return summary


class _Stats:
  """Per-shard summary: shapes, dtypes, label counts, spacing, image sizes, multi-labels, targets."""

  def __init__(self):
    self.shapes, self.dtypes, self.labels = {}, {}, {}
    self.records = 0
    self.spacing = [[np.inf] * 3, [-np.inf] * 3, [0.0] * 3]
    self.hw = [[np.inf] * 2, [-np.inf] * 2]
    self.multi = None
    self.target = [np.inf, -np.inf, 0.0, 0]

  def add(self, r):
    self.records += 1
    for key, value in r.items():
      if isinstance(value, str):
        continue
      shape = list(np.shape(value))
      self.shapes[key] = shape if self.shapes.get(key, shape) == shape else 'variable'
      self.dtypes[key] = str(np.asarray(value).dtype)
    if 'label' in r:
      label = str(int(r['label']))
      self.labels[label] = self.labels.get(label, 0) + 1
    sp = np.asarray(r['spacing'], float)
    self.spacing = [
      np.minimum(self.spacing[0], sp).tolist(),
      np.maximum(self.spacing[1], sp).tolist(),
      (np.asarray(self.spacing[2]) + sp).tolist(),
    ]
    hw = np.asarray(r['image'].shape[:2], float)
    self.hw = [np.minimum(self.hw[0], hw).tolist(), np.maximum(self.hw[1], hw).tolist()]
    if 'labels' in r:
      v = np.asarray(r['labels'])
      counts = np.stack([(v == 1), (v == -1)]).astype(int)
      self.multi = (counts if self.multi is None else np.asarray(self.multi) + counts).tolist()
    if 'target' in r:
      t = float(r['target'])
      self.target = [
        min(self.target[0], t),
        max(self.target[1], t),
        self.target[2] + t,
        self.target[3] + 1,
      ]

  def as_dict(self):
    return {
      'shapes': self.shapes,
      'dtypes': self.dtypes,
      'label_counts': self.labels,
      'records': self.records,
      'spacing': self.spacing if self.records else None,
      'hw': self.hw if self.records else None,
      'multi': self.multi,
      'target': self.target if self.target[3] else None,
    }


def _complete(record, subject_hash, dataset):
  """Fills what the runner owns; the converter never sets ``subject``."""
  r = dict(record)
  r['subject'] = subject_hash
  r.setdefault('source', dataset)
  if 'landmarks' not in r:
    r['landmarks'], r['landmark_visible'], r['landmarks_canonical'] = lm.empty_landmarks()
  if 'organs' not in r:
    region = r.get('region')
    if region not in lm.REGION_ORGANS:
      raise ValueError(
        f'region {region!r} has no default organs; set record["organs"] '
        f'(known regions: {sorted(lm.REGION_ORGANS)})'
      )
    r['organs'] = lm.organ_multi_hot(lm.REGION_ORGANS[region])
  return r


def _convert_item(item, subject_hash, convert, options, dataset):
  """Encoded records of one item, all or none; or a (kind, reason) reject."""
  it = Item(key=item['key'], subject='', modality=item['modality'], payload=item['payload'])
  out, bad = _attempt(it, subject_hash, convert, options, dataset)
  if bad:
    reason = bad[1]
    if options.input:
      # Readers name files by absolute path; under --input the relative one says the same, shorter.
      reason = reason.replace(os.path.join(options.input, ''), '')
    bad = (bad[0], one_line(reason))
  return out, bad


def _attempt(it, subject_hash, convert, options, dataset):
  try:
    out = []
    for record in convert(it, subject_hash, options):
      record = _complete(record, subject_hash, dataset)
      out.append((rec.encode(record), record))
    if not out:
      return None, ('empty', 'the converter produced no records')
    return out, None
  except Reject as e:
    return None, (e.kind, e.reason)
  except MemoryError:
    return None, ('memory', 'out of memory converting it')
  except Exception as e:  # pylint: disable=broad-except  # one bad item never stops the run.
    # data_prep.ops.PrepError carries its own kind and a reason that already names the file.
    kind, reason = getattr(e, 'kind', None), getattr(e, 'reason', None)
    if isinstance(kind, str) and kind and isinstance(reason, str):
      return None, (kind, reason)
    return None, ('error', f'{type(e).__name__}: {e}')


def finished(task: dict, common: dict) -> dict | None:
  """The summary of a shard already written with the same fingerprint and intact bytes, else None."""
  shard_path, sidecar, _ = _paths(common['output'], task)
  return _finished(shard_path, sidecar, _fingerprint(task, common))


def run_task(task: dict, common: dict, bar=None) -> dict:
  """Converts and writes one shard unless its sidecar says it is done; returns the summary."""
  shard_path, sidecar, marker = _paths(common['output'], task)
  for folder in (os.path.dirname(shard_path), os.path.dirname(sidecar)):
    os.makedirs(folder, exist_ok=True)
  fingerprint = _fingerprint(task, common)
  summary = _finished(shard_path, sidecar, fingerprint)
  if summary is not None:
    if bar is not None:
      bar.update(len(task['items']))
    return summary
  module, name = common['convert'].split(':')
  convert = getattr(importlib.import_module(module), name)
  options = Options(**common['options'])
  crashed = set(task.get('crashed', ()))
  stats, rejects = _Stats(), []

  def payloads():
    for item in task['items']:
      with open(marker, 'w', encoding='utf-8') as f:
        f.write(item['key'])
      if item['key'] in crashed:
        rejects.append(
          [
            item['key'],
            'crash',
            'the worker process died converting it (a native reader crash on a damaged file?)',
          ]
        )
        continue
      out, bad = _convert_item(item, item['subject_hash'], convert, options, common['dataset'])
      if bad:
        rejects.append([item['key'], *bad])
      for data, record in out or ():
        stats.add(record)
        yield data
      if bar is not None:
        bar.update(1)

  entry = shards.write_shard(shard_path, payloads())
  if not entry['count']:
    # A shard whose items were all rejected holds nothing: readers would open an empty file, and a
    # split with no records at all would get a manifest of empty shards.
    os.remove(shard_path)
    entry = None
  summary = {'fingerprint': fingerprint, 'file': entry, 'rejects': rejects, **stats.as_dict()}
  tmp = f'{sidecar}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(summary, f, sort_keys=True)
  os.replace(tmp, sidecar)
  clear_current(common['output'], task)
  return summary


def merge(done: list[tuple[dict, dict]]) -> tuple[dict, dict]:
  """Per-modality manifest entries and split-wide statistics from the shard summaries."""
  modalities, stats = {}, {}
  for task, s in done:
    if s['file'] is None:
      continue
    m = modalities.setdefault(
      task['modality'], {'count': 0, 'files': [], 'shapes': {}, 'dtypes': {}, 'label_counts': {}}
    )
    m['count'] += s['file']['count']
    m['files'].append(s['file'])
    for key, shape in s['shapes'].items():
      m['shapes'][key] = shape if m['shapes'].get(key, shape) == shape else 'variable'
    m['dtypes'].update(s['dtypes'])
    for label, n in s['label_counts'].items():
      m['label_counts'][label] = m['label_counts'].get(label, 0) + n
    st = stats.setdefault(
      task['modality'], {'records': 0, 'spacing': None, 'hw': None, 'multi': None, 'target': None}
    )
    st['records'] += s['records']
    if s['spacing']:
      old = st['spacing'] or [[np.inf] * 3, [-np.inf] * 3, [0.0] * 3]
      st['spacing'] = [
        np.minimum(old[0], s['spacing'][0]).tolist(),
        np.maximum(old[1], s['spacing'][1]).tolist(),
        (np.asarray(old[2]) + s['spacing'][2]).tolist(),
      ]
      old = st['hw'] or [[np.inf] * 2, [-np.inf] * 2]
      st['hw'] = [np.minimum(old[0], s['hw'][0]).tolist(), np.maximum(old[1], s['hw'][1]).tolist()]
    if s['multi']:
      st['multi'] = (
        s['multi'] if st['multi'] is None else (np.asarray(st['multi']) + s['multi']).tolist()
      )
    if s['target']:
      t = st['target'] or [np.inf, -np.inf, 0.0, 0]
      st['target'] = [
        min(t[0], s['target'][0]),
        max(t[1], s['target'][1]),
        t[2] + s['target'][2],
        t[3] + s['target'][3],
      ]
  out = {}
  for modality, st in stats.items():
    m = modalities[modality]
    m['label_counts'] = m['label_counts'] or None
    n = st['records']
    row = {'records': n}
    if st['spacing']:
      row['spacing_mm'] = {
        'min': st['spacing'][0],
        'max': st['spacing'][1],
        'mean': [round(v / n, 4) for v in st['spacing'][2]],
      }
      row['image_hw'] = {'min': [int(v) for v in st['hw'][0]], 'max': [int(v) for v in st['hw'][1]]}
    if st['multi']:
      row['labels_positive'], row['labels_uncertain'] = st['multi']
    if st['target']:
      t = st['target']
      row['target'] = {'min': t[0], 'max': t[1], 'mean': round(t[2] / t[3], 4), 'count': t[3]}
    out[modality] = row
  return modalities, out
