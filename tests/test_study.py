"""The study's plan and runner: stable cell keys, skip/resume/retry, failures recorded, checks
before training; most tests inject a cheap fake cell runner, one runs a real tiny cell."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from aacp_jax.eval import bootstrap
from aacp_jax.study import cells as cells_lib
from aacp_jax.study import runner
from configs import pretrain as pretrain_config
from configs import study as study_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_study(**overrides):
  c = study_config.get_config('demo')
  c.methods = ('random', 'full', 'simclr')
  c.tasks = ('phantom_ct_cls',)
  c.seeds = (0, 1)
  c.fractions = (100.0,)
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def keys(study):
  return {c.name: c.key for c in cells_lib.plan(study)}


def test_table6_rows_match_the_pretrain_config():
  assert study_config.TABLE6 == pretrain_config.TABLE6
  # Table 6 rows are the Table 6 variants among the methods, not the other baselines.
  paper = study_config.get_config()
  with pytest.raises(ValueError, match="config.task_roots: task 'lidc'"):
    cells_lib.check_study(paper)  # the paper's tasks need their shards
  assert cells_lib.table6_rows(paper) == list(pretrain_config.TABLE6)
  assert cells_lib.methods_of(paper)[:3] == ['random', 'moco_v2', 'mae']  # no ImageNet file


def test_keys_are_stable_across_configs_and_processes():
  first = keys(small_study())
  assert len(set(first.values())) == len(first)  # every cell its own key
  assert keys(small_study()) == first  # a re-built config: the same keys
  code = textwrap.dedent(
    """
    import json
    from aacp_jax.study import cells
    from tests import test_study
    print(json.dumps(test_study.keys(test_study.small_study())))
    """
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  assert json.loads(out.stdout.strip().splitlines()[-1]) == first
  # The demo plan: pretraining first, then 4 inits x (cls: 10, 100 %, 5-shot; seg: 10, 100 %).
  demo = cells_lib.plan(study_config.get_config('demo'))
  assert [c.kind for c in demo[:3]] == ['pretrain'] * 3 and len(demo) == 3 + 4 * 5 * 3


def test_any_config_change_changes_the_keys_it_reaches():
  base = keys(small_study())
  # A fine-tuning value: every downstream cell changes, no pretraining.
  ft = keys(small_study(finetune='demo,optim.lr=3e-4'))
  for name, key in base.items():
    assert (ft[name] == key) == name.startswith('pretrain')
  # A pretraining value: that pretraining and its method's downstream cells; random's stay.
  pre = keys(small_study(pretrain='demo,total_steps=119'))
  for name, key in base.items():
    assert (pre[name] == key) == name.startswith('random'), name
  # The spelling of a config is not the config: `demo,full` is `demo`.
  assert keys(small_study(pretrain=study_config.get_config('demo').pretrain + ',full')) == base
  # A seed is its own cell.
  more = keys(small_study(seeds=(0, 1, 2)))
  assert (
    all(more[n] == k for n, k in base.items()) and len(more) == len(base) + 6
  )  # 3 methods x (100 %, 5-shot)


@pytest.mark.parametrize(
  'key,value,message',
  [
    ('methods', ('random', 'full', 'nope'), "config.methods: unknown method 'nope'"),
    ('tasks', ('phantom_ct_nope',), "config.tasks: unknown task 'phantom_ct_nope'"),
    ('fractions', (0.0, 100.0), 'config.fractions: 0.0'),
    ('seeds', (-1,), 'config.seeds: -1'),
    ('reference', 'no_roi', "config.reference='no_roi'"),
    ('imagenet_weights', '/nonexistent.npz', 'config.imagenet_weights=/nonexistent.npz'),
    ('finetune', 'demo,optim.head_lr=-1', 'optim.head_lr'),
    ('tasks', ('phantom_ct_cls', 'lits'), "config.task_roots: task 'lits' reads prepared shards"),
    ('task_roots', 'phantom_ct_cls=/nonexistent', 'phantom_ct_cls=/nonexistent: no such'),
  ],
)
def test_a_bad_value_stops_before_anything_trains(key, value, message):
  study = small_study(**{key: value})
  with pytest.raises(ValueError, match=message.replace('.', r'\.').replace('(', r'\(')):
    cells_lib.check_cells(cells_lib.plan(study))


def test_the_command_reports_a_bad_key_in_one_line(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'aacp_jax.study',
      '--config=configs/study.py:demo',
      f'--workdir={tmp_path}',
      "--config.methods=('random','nope')",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert out.returncode != 0
  assert (
    out.stderr.strip().splitlines()[-1].startswith("study: config.methods: unknown method 'nope'")
  )
  assert not os.listdir(tmp_path)


def fake_cells(n=5):
  """A pretraining cell and n-1 downstream cells that need it (no configs: the runner alone)."""
  pre = cells_lib.Cell('pretrain', 'full', None, None, 0, 0, None, 'pre0', 'h')
  out = [pre]
  for i in range(n - 1):
    out.append(
      cells_lib.Cell('finetune', 'full', 'phantom_ct_cls', 100.0, 0, i, None, f'ft{i}', 'h', 'pre0')
    )
  return out


class Recorder:
  def __init__(self, fail=(), interrupt=None):
    self.ran, self.fail, self.interrupt = [], set(fail), interrupt

  def __call__(self, cell, workdir):
    if cell.key == self.interrupt:
      raise KeyboardInterrupt
    self.ran.append(cell.key)
    if cell.key in self.fail:
      raise ValueError('bad thing\nwith a second line')
    return {'estimate': 0.5, 'seen': cell.key}


def test_finished_cells_are_skipped_and_an_interrupted_study_resumes(tmp_path):
  cells, wd = fake_cells(), str(tmp_path)
  first = Recorder(interrupt='ft2')
  with pytest.raises(KeyboardInterrupt):
    runner.run_cells(cells, wd, first, log=lambda *a, **k: None)
  assert first.ran == ['pre0', 'ft0', 'ft1']
  assert runner.read_row(wd, 'ft2') is None  # an interrupted cell leaves no row
  assert [r['key'] for r in runner.read_results(os.path.join(wd, 'results.jsonl'))] == first.ran
  second = Recorder()
  counts = runner.run_cells(cells, wd, second, log=lambda *a, **k: None)
  assert second.ran == ['ft2', 'ft3'] and counts == {'done': 3, 'ran': 2, 'failed': 0, 'skipped': 0}
  rows = runner.read_results(os.path.join(wd, 'results.jsonl'))
  assert [r['key'] for r in rows] == [c.key for c in cells]
  assert all(r['status'] == 'ok' and r['wall_s'] >= 0 for r in rows)
  assert {'code_version', 'config_hash', 'date', 'commit', 'method', 'seed'} <= set(rows[0])
  third = Recorder()
  runner.run_cells(cells, wd, third, log=lambda *a, **k: None)
  assert third.ran == []


def test_a_failed_cell_is_recorded_the_rest_run_and_a_rerun_retries_it(tmp_path):
  cells, wd = fake_cells(), str(tmp_path)
  rec = Recorder(fail={'ft1'})
  counts = runner.run_cells(cells, wd, rec, log=lambda *a, **k: None)
  assert counts['failed'] == 1 and counts['ran'] == 4
  row = runner.read_row(wd, 'ft1')
  assert row['status'] == 'failed' and row['error'] == 'ValueError: bad thing with a second line'
  again = Recorder()
  runner.run_cells(cells, wd, again, log=lambda *a, **k: None)
  assert again.ran == ['ft1'] and runner.read_row(wd, 'ft1')['status'] == 'ok'


def test_a_failed_pretraining_skips_its_cells(tmp_path):
  cells, wd = fake_cells(3), str(tmp_path)
  counts = runner.run_cells(cells, wd, Recorder(fail={'pre0'}), log=lambda *a, **k: None)
  assert counts == {'done': 0, 'ran': 0, 'failed': 1, 'skipped': 2}
  rec = Recorder()
  runner.run_cells(cells, wd, rec, log=lambda *a, **k: None)
  assert rec.ran == ['pre0', 'ft0', 'ft1']


KILLED = textwrap.dedent(
  """
  import sys, time
  from aacp_jax.study import runner
  from tests import test_study

  def slow(cell, workdir):
    if cell.key == 'ft2':
      time.sleep(60)  # killed here
    return {'estimate': 0.5}

  runner.run_cells(test_study.fake_cells(), sys.argv[1], slow, log=lambda *a, **k: None)
  """
)


def test_a_study_killed_mid_cell_completes_only_the_missing_cells(tmp_path):
  wd = str(tmp_path)
  proc = subprocess.Popen([sys.executable, '-c', KILLED, wd], cwd=ROOT)
  deadline = time.time() + 60
  while runner.read_row(wd, 'ft1') is None and time.time() < deadline and proc.poll() is None:
    time.sleep(0.1)
  time.sleep(0.2)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert runner.read_row(wd, 'ft1') is not None and runner.read_row(wd, 'ft2') is None
  rec = Recorder()
  runner.run_cells(fake_cells(), wd, rec, log=lambda *a, **k: None)
  assert rec.ran == ['ft2', 'ft3']


def test_one_real_cell_end_to_end(tmp_path):
  """The real command on one random-init cell at toy size: its row and the replicates that
  Table 5's CI is computed from match the cell's own test arrays."""
  from aacp_jax.train import finetune
  from aacp_jax.train import label_efficiency as le

  wd = str(tmp_path / 'study')
  args = [
    sys.executable,
    '-m',
    'aacp_jax.study',
    '--config=configs/study.py:demo',
    f'--workdir={wd}',
    '--config.finetune=demo,total_steps=2,data.image_size=32,data.phantoms.train=16,'
    'data.phantoms.test=16,batch_size=8,eval.bootstrap=40,model.width=4',
    "--config.methods=('random',)",
    '--config.reference=random',
    "--config.tasks=('phantom_ct_cls',)",
    '--config.seeds=(0,)',
    '--config.fractions=(100.0,)',
    '--config.shots=0',
  ]
  # The SLURM path: exactly one cell (no tables), then --collect.
  out = subprocess.run(
    args + ['--stage=finetune', '--cell_index=0'], cwd=ROOT, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert not os.path.exists(os.path.join(wd, 'table5.md'))
  out = subprocess.run(args + ['--collect'], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  (row,) = runner.read_results(os.path.join(wd, 'results.jsonl'))
  assert row['status'] == 'ok' and row['metric'] == 'auroc' and len(row['replicates']) == 40
  scores, truth, subjects = finetune.load_test_arrays(os.path.join(wd, row['dir']))
  metric = le.metric_fn(__import__('aacp_jax.task_specs').task_specs.get('phantom_ct_cls'))
  ref = bootstrap.seed_mean_ci(metric, truth, [scores], groups=subjects, n=40)
  reps = np.array([np.nan if v is None else v for v in row['replicates']])
  lo, hi = np.quantile(reps[np.isfinite(reps)], [0.025, 0.975])
  assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-12)
  assert row['estimate'] == pytest.approx(ref.estimate, abs=1e-6)
  for name in ('table5.md', 'table6.md', 'data_needed.md', 'plan.json'):
    assert os.path.getsize(os.path.join(wd, name)) > 0
  assert 'commit' in open(os.path.join(wd, 'table5.md')).read()
  # A re-run reads the row: nothing trains.
  again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
  assert again.returncode == 0 and "'done': 1, 'ran': 0" in again.stdout


def test_the_slurm_script_submits_pretraining_then_downstream_then_collect(tmp_path):
  """launch/slurm_study.sbatch with a stand-in `sbatch` that records its arguments."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  log = tmp_path / 'sbatch.log'
  fake = bin_dir / 'sbatch'
  fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho $(wc -l < {log})\n')
  fake.chmod(0o755)
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'PYTHON': sys.executable}
  out = subprocess.run(
    ['bash', 'launch/slurm_study.sbatch', 'configs/study.py:demo', str(tmp_path / 'study')],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'study: 3 pretraining cells, 60 fine-tuning cells' in out.stdout
  pre, ft, col = log.read_text().splitlines()
  assert '--array=0-2' in pre and 'STAGE=pretrain' in pre
  assert '--dependency=afterok:1' in ft and '--array=0-59' in ft and 'STAGE=finetune' in ft
  assert '--dependency=afterany:2' in col and 'STAGE=collect' in col
