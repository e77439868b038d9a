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
  def __init__(self, workdir: str, *, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # Append: a resumed run continues the same file; rows carry their step.
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    if tensorboard:
      from tensorboardX import SummaryWriter  # TF-free event writer.

      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

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


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
