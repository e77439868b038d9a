"""What one cell does: a pretraining run, or one fine-tuning run through the harness a single
`python -m aacp_jax.main --config=configs/finetune.py...` uses, in this process (compiled
programs are reused from cell to cell).

A fine-tuning row carries the bootstrap replicates of its primary metric over
`bootstrap.resample_indices(test size, subjects, n=eval.bootstrap, seed=0)`: every cell of a
task scores the same test patients, so these are the same resamples in every cell, and the
seed-mean CI (Table 5) and the paired CI of a difference (Table 6) are computed from the rows
alone, each replicate pairing the same patients.
"""

from __future__ import annotations

import copy
import hashlib
import os

import numpy as np

from aacp_jax import experiments, task_specs
from aacp_jax.eval import bootstrap
from aacp_jax.study import runner
from aacp_jax.train import finetune
from aacp_jax.train import label_efficiency as le


def pretrain(cell, workdir: str) -> dict:
  path = cell.path(workdir)
  os.makedirs(path, exist_ok=True)
  results = experiments.get('pretrain').module().train_and_evaluate(cell.config, path)
  if 'stopped_at' in results:
    raise runner.Stopped(f'{cell.name} stopped at step {results["stopped_at"]}')
  out = {'dir': os.path.relpath(path, workdir), 'steps': int(results.get('steps', 0))}
  if 'probe' in results:
    out['probe'] = results['probe']
  return out


def replicates(task, scores, truth, subjects, n: int) -> list:
  """The primary metric on each patient resample (None where undefined)."""
  fn = le.metric_fn(task)
  values = []
  for idx in bootstrap.resample_indices(len(truth), subjects, n=n, seed=0):
    v = float(fn(truth[idx], scores[idx]))
    values.append(v if np.isfinite(v) else None)
  return values


def test_id(subjects) -> str:
  """The test set's identity: a hash of its subjects in order (pairing needs the same)."""
  return hashlib.sha256('\0'.join(map(str, subjects)).encode()).hexdigest()[:16]


def finetune_cell(cell, workdir: str) -> dict:
  config = copy.deepcopy(cell.config)
  if cell.needs is not None:
    pre_row = runner.read_row(workdir, cell.needs)
    config.init = os.path.join(workdir, pre_row['dir'])
  config.data.root = le.shared_root(config, os.path.join(workdir, 'finetune'))
  path = cell.path(workdir)
  os.makedirs(path, exist_ok=True)
  out = finetune.run(config, path)
  if isinstance(out, dict):
    raise runner.Stopped(f'{cell.name} stopped at step {out["stopped_at"]}')
  task = task_specs.get(config.task)
  scores, truth, subjects = finetune.load_test_arrays(path)
  metric = le.PRIMARY[task.kind]
  results = out.results
  return {
    'dir': os.path.relpath(path, workdir),
    'metric': metric,
    'estimate': results['metrics'][metric]['estimate'],
    'metrics': results['metrics'],
    'replicates': replicates(task, scores, truth, subjects, int(config.eval.bootstrap)),
    'test_id': test_id(subjects),
    'test_examples': results['test_examples'],
    'fit_examples': results['fit_examples'],
    'fit_patients': results['fit_patients'],
    'steps': results['steps'],
  }


def execute(cell, workdir: str) -> dict:
  return pretrain(cell, workdir) if cell.kind == 'pretrain' else finetune_cell(cell, workdir)
