r"""Label efficiency: fine-tune each init on each task at each label fraction and seed, then one
table of mean ± std over seeds with the 95 % patient-bootstrap CI of the seed mean.

  python -m aacp_jax.train.label_efficiency --config=configs/finetune.py:demo \
      --inits=pretrained=/tmp/aacp_demo,random=random --tasks=phantom_ct_cls,phantom_ct_seg \
      --fractions=10,100 --seeds=0,1,2 --workdir=/tmp/aacp_label_eff

Each cell (init, task, fraction, seed) is one fine-tuning run in `WORKDIR/<init>/<task>/
f<fraction>/s<seed>`, all in this process (compiled programs are reused); a cell with an
`eval.json` is read, not rerun, so an interrupted sweep resumes where it stopped. Writes
`WORKDIR/rows.jsonl` (one row per cell and metric) and `WORKDIR/table.md`.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from aacp_jax import task_specs
from aacp_jax.eval import bootstrap, metrics
from aacp_jax.train import finetune, inputs

# The metric a table row reports for each task kind.
PRIMARY = {
  'binary': 'auroc',
  'multiclass': 'auroc',
  'multilabel': 'auroc',
  'regression': 'mae',
  'segmentation': 'dice',
}


def cell_dir(workdir, init_name, task, fraction, seed) -> str:
  return os.path.join(workdir, init_name, task, f'f{fraction:g}', f's{seed}')


def run_cell(base, workdir, init_name, init, task, fraction, seed) -> dict:
  """eval.json's body for one cell, training it when it has none yet."""
  path = cell_dir(workdir, init_name, task, fraction, seed)
  done = os.path.join(path, 'eval.json')
  if os.path.exists(done):
    with open(done, encoding='utf-8') as f:
      return json.load(f)
  config = copy.deepcopy(base)
  config.task, config.init, config.seed = task, init, int(seed)
  config.data.fraction = float(fraction)
  config.data.root = shared_root(config, workdir)
  os.makedirs(path, exist_ok=True)
  return finetune.run(config, path).results


def shared_root(config, workdir) -> str:
  """config.data.root, or one phantom set in the sweep's workdir for every cell of a modality:
  cells differ in the draw and the init, not in the data, and building 256 phantoms per cell
  dominates a CPU cell (the study shares it the same way)."""
  if config.data.root:
    return config.data.root
  resolved = finetune.resolve(config)
  return inputs.prepare_data(resolved, workdir, seed=resolved.data.phantom_seed)


def check_cells(base, inits: dict, tasks, fractions) -> None:
  """Every (task, init, fraction) resolves and passes the run's checks, before the first cell
  trains: a typo in the last task must not surface hours into a sweep."""
  for task in tasks:
    for init in inits.values():
      for fraction in fractions:
        config = copy.deepcopy(base)
        config.task, config.init, config.data.fraction = task, init, float(fraction)
        finetune.check_config(finetune.resolve(config))


def metric_fn(task):
  """metric(truth, test scores) of the task's primary metric (`PRIMARY`), as eval.json's."""
  if task.kind == 'segmentation':
    dice_of = finetune.mean_foreground_dice(task)
    return lambda y, s: dice_of(s, y)
  if task.kind == 'regression':
    return metrics.mae
  if task.kind == 'binary':
    return lambda y, s: metrics.auroc(y, s[:, 1])
  if task.kind == 'multiclass':
    return metrics.auroc_ovr
  return metrics.auroc_multilabel


def summarise(workdir, init_name, task_name, fraction, seeds, n_bootstrap=1000) -> dict:
  """Mean ± std over seeds of the primary metric, and `bootstrap.seed_mean_ci` of that mean
  (every seed scores the same test patients)."""
  task = task_specs.get(task_name)
  per_seed, scores, truth, groups = [], [], None, None
  for s in seeds:
    path = cell_dir(workdir, init_name, task_name, fraction, s)
    with open(os.path.join(path, 'eval.json'), encoding='utf-8') as f:
      per_seed.append(json.load(f)['metrics'][PRIMARY[task.kind]]['estimate'])
    sc, truth, groups = finetune.load_test_arrays(path)
    scores.append(sc)
  ci = bootstrap.seed_mean_ci(metric_fn(task), truth, scores, groups=groups, n=n_bootstrap)
  return {
    'init': init_name,
    'task': task_name,
    'fraction': float(fraction),
    'metric': PRIMARY[task.kind],
    'mean': float(np.mean(per_seed)),
    'std': float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float('nan'),
    'low': ci.low,
    'high': ci.high,
    'seeds': list(seeds),
    'per_seed': per_seed,
  }


def table(summaries) -> str:
  lines = [
    '| task | init | labels | metric | mean ± std (seeds) | 95 % CI of the mean |',
    '|---|---|---|---|---|---|',
  ]
  for r in summaries:
    lines.append(
      f'| {r["task"]} | {r["init"]} | {r["fraction"]:g} % | {r["metric"]} | '
      f'{r["mean"]:.3f} ± {r["std"]:.3f} ({len(r["seeds"])}) | '
      f'[{r["low"]:.3f}, {r["high"]:.3f}] |'
    )
  return '\n'.join(lines)


def plot(summaries, path: str, note: str = '') -> None:
  """Fig. 3's layout: per task, the primary metric against the fraction (log x), one line per
  init, the band the 95 % patient-bootstrap CI of the seed mean. Needs matplotlib (`.[eval]`)."""
  from aacp_jax.eval import plots

  rows = [
    {
      'method': r['init'],
      'task': r['task'],
      'fraction': r['fraction'],
      'metric': r['metric'],
      'value': r['mean'],
      'low': r['low'],
      'high': r['high'],
    }
    for r in summaries
  ]
  for metric in dict.fromkeys(r['metric'] for r in rows):
    name = path if len({r['metric'] for r in rows}) == 1 else path.replace('.png', f'_{metric}.png')
    plots.label_efficiency(rows, path=name, metric=metric, note=note)


def _commit() -> str:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
      ['git', 'describe', '--always', '--dirty', '--abbrev=7'],
      cwd=here,
      capture_output=True,
      text=True,
      check=True,
    )
    return out.stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def define_flags():
  """The command's flags, defined only when it runs as one (`__main__`): importing the module
  (tests, notebooks) must not claim `--config` in absl's global registry."""
  config_flags.DEFINE_config_file('config', 'configs/finetune.py:demo', 'Base config.')
  flags.DEFINE_string('workdir', None, 'Output folder.', required=True)
  flags.DEFINE_list('inits', ['random=random'], 'name=init pairs.')
  flags.DEFINE_list('tasks', ['phantom_ct_cls'], 'Task names.')
  flags.DEFINE_list('fractions', ['10', '100'], 'Label percents.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  bad = [item for item in f.inits if '=' not in item]
  if bad:
    raise app.UsageError(f'--inits: expected name=INIT pairs, got {bad}')
  inits = dict(item.split('=', 1) for item in f.inits)
  fractions = [float(x) for x in f.fractions]
  seeds = [int(x) for x in f.seeds]
  workdir, base, t0 = f.workdir, f.config, time.perf_counter()
  try:
    check_cells(base, inits, f.tasks, fractions)
  except ValueError as e:  # bad input: one line, no traceback
    raise SystemExit(f'label_efficiency: {e}') from None
  summaries = []
  for task in f.tasks:
    for name, init in inits.items():
      for fraction in fractions:
        for seed in seeds:
          run_cell(base, workdir, name, init, task, fraction, seed)
        summaries.append(summarise(workdir, name, task, fraction, seeds, base.eval.bootstrap))
  with open(os.path.join(workdir, 'rows.jsonl'), 'w', encoding='utf-8') as out:
    for r in summaries:
      out.write(json.dumps(r) + '\n')
  stamp, commit = datetime.date.today().isoformat(), _commit()
  footer = (
    f'\n\n{stamp}, commit {commit}, {time.perf_counter() - t0:.0f} s in this invocation '
    '(cells already done are read, not rerun).'
  )
  text = table(summaries) + footer
  with open(os.path.join(workdir, 'table.md'), 'w', encoding='utf-8') as out:
    out.write(text + '\n')
  print(text)
  try:
    plot(summaries, os.path.join(workdir, 'label_efficiency.png'), note=f'{stamp}, commit {commit}')
  except ImportError as e:  # matplotlib is the `eval` extra; the table is the result
    print(f'label_efficiency.png not drawn ({e}); pip install -e .[eval] for the figure')


if __name__ == '__main__':
  define_flags()
  app.run(main)
