"""Metric logging without TensorFlow: `metrics.jsonl` rows plus TensorBoard event files.

Only process 0 writes; other processes get a writer that does nothing, so callers need no checks.
`clu.metric_writers` is avoided on purpose: it imports TensorFlow.
"""

import json
import math
import os

import jax
import numpy as np


class MetricWriter:
  """resume_step: the step a run (re)starts from. Rows a killed run logged after it are logged
  again by this run, so they are dropped from metrics.jsonl first, and TensorBoard is told to
  hide its events from resume_step + 1 on (an event file's `purge_step`): each step appears
  once. None (a writer outside the training loop) keeps everything."""

  def __init__(
    self,
    workdir: str,
    *,
    enabled: bool | None = None,
    tensorboard: bool = True,
    resume_step: int | None = None,
  ):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'metrics.jsonl')
    if resume_step is not None:
      truncate_jsonl(path, resume_step)
    # Append: a resumed run continues the same file; rows carry their step.
    self._jsonl = open(path, 'a', encoding='utf-8')
    if tensorboard:
      from tensorboardX import SummaryWriter  # TF-free event writer.

      purge = None if resume_step is None else int(resume_step) + 1
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=purge)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {'step': int(step)}
    for k, v in metrics.items():
      v = np.asarray(v).item() if np.ndim(v) == 0 else v
      row[k] = v if not isinstance(v, float) or math.isfinite(v) else str(v)
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != 'step' and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def truncate_jsonl(path: str, step: int) -> int:
  """Drops rows with a step after `step`, and a line cut off by a kill; returns how many.

  Rewritten atomically (a kill during the rewrite leaves the old file)."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path, encoding='utf-8') as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row_step = int(json.loads(line)['step'])
      except (ValueError, KeyError, TypeError):
        dropped += 1  # the torn last line of a killed writer
        continue
      if row_step > step:
        dropped += 1
      else:
        kept.append(line if line.endswith('\n') else line + '\n')
  if dropped:
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
