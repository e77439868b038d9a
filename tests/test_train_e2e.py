"""End to end with a tiny ResNet on tiny phantoms: train, checkpoint, interrupt, resume, probe."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from aacp_jax import restore
from aacp_jax.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
  '--config=configs/pretrain.py:demo',  # the full model, CT, MRI and X-ray in every step
  '--config.data.image_size=32',
  '--config.data.phantoms.train=32',
  '--config.data.phantoms.test=16',
  '--config.batch_size=32',
  '--config.model.width=4',
  '--config.model.projector=(32,32,16)',
  '--config.total_steps=24',
  '--config.log_every_steps=1',
  '--config.checkpoint_every_steps=8',
  '--config.eval.bootstrap=50',
  '--config.eval.l2=0.01',
]


def start(workdir, *extra):
  # Two CPU devices, not conftest's eight: the batch is still sharded (8 devices equal 1 is
  # test_step_sharded's job), and the full 3-modality step compiles in ~80 s instead of ~130 s.
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
    ' '.join(f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f)
    + ' --xla_force_host_platform_device_count=2'
  )
  return subprocess.Popen(
    [sys.executable, '-m', 'aacp_jax.main', *TINY, *extra, f'--workdir={workdir}'],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def finish(proc, timeout=1800):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return out


def losses(workdir):
  rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return {r['step']: r['loss'] for r in rows}


def wait_for_step(workdir, proc, step, timeout=1800):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(os.path.join(workdir, 'metrics.jsonl')) and step in losses(workdir):
      return True
    time.sleep(0.2)
  return False


def test_interrupt_and_resume_continues_exactly(tmp_path):
  ref_dir, run_dir = str(tmp_path / 'ref'), str(tmp_path / 'run')
  run = start(run_dir)
  # The reference starts once the first run has compiled (and cached) the step.
  assert wait_for_step(run_dir, run, 1)
  ref = start(ref_dir, '--config.eval.probe=False')
  # Interrupt the first run with SIGINT as soon as it has logged step 3.
  if wait_for_step(run_dir, run, 3):
    run.send_signal(signal.SIGINT)
  finish(run)
  stopped_at = max(losses(run_dir))
  assert 3 <= stopped_at < 24, 'the run was not interrupted mid-way'
  assert os.path.isdir(os.path.join(run_dir, 'checkpoints', str(stopped_at)))
  out = finish(start(run_dir))  # The same command again resumes.
  ref_out = finish(ref)
  got, want = losses(run_dir), losses(ref_dir)
  assert sorted(want) == list(range(1, 25))
  assert sorted(got) == list(range(1, 25)), 'a step was repeated or skipped'
  # Same params, same data order, same augmentation keys: the same losses after the resume.
  np.testing.assert_allclose(
    [got[s] for s in range(1, 25)], [want[s] for s in range(1, 25)], rtol=1e-6
  )
  # The full model (the demo default) logs every term of its loss, per modality, on every row;
  # the cross-modal curriculum, scaled to this 24-step run (2 steps per epoch: epochs 50..100 of
  # 200 become 3..6), ramps from 0 over steps 6..12 to 0.3. Row s holds the weight of step s - 1.
  rows = {r['step']: r for r in read_jsonl(os.path.join(ref_dir, 'metrics.jsonl'))}
  for m in ('ct', 'mri', 'xray'):
    for term in ('contrast', 'multiscale', 'multiscale_p2', 'multiscale_p5', 'spatial', 'triplet'):
      assert all(np.isfinite(r[f'{term}_{m}']) for r in rows.values()), (term, m)
  assert all(np.isfinite(r['cross']) and r['cross'] > 0 for r in rows.values())
  weights = [rows[s]['cross_weight'] for s in (1, 7, 10, 13, 24)]
  np.testing.assert_allclose(weights, [0, 0, 0.15, 0.3, 0.3], atol=1e-6)
  # The loss falls, and the run ends with linear probes on held-out phantoms.
  # (Without the cross-modal term, which the curriculum adds from step 7 on.)
  within = {s: want[s] - rows[s]['cross_weight'] * rows[s]['cross'] for s in want}
  # Single steps are noisy at batch 32 (measured: 9.8, 10.6, 11.5, ... 9.3, 8.1, 9.2): compare means.
  assert np.mean([within[s] for s in range(17, 25)]) < np.mean([within[s] for s in range(1, 9)])
  del ref_out
  results = json.load(open(os.path.join(run_dir, 'eval.json')))
  for m in ('ct', 'mri', 'xray'):
    for enc in ('pretrained', 'random_init'):
      r = results['probe'][m][enc]
      assert 0.0 <= r['auroc'] <= 1.0 and r['n_test'] == 16 and r['l2'] == 0.01
  assert 'Linear probes' in out and 'pretrained' in out
  # The workdir alone rebuilds the model: config.json and a parameters-only restore of the
  # final checkpoint, whose encoder applied alone gives the model's own backbone features.
  restored = restore.load_variables(run_dir)
  assert restored.step == 24 and restored.config.model.width == 4
  assert tuple(restored.config.model.projector) == (32, 32, 16)
  encoder, enc_vars = restore.encoder_variables(restored, 'mri')
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  alone = encoder.apply(enc_vars, x, train=False)['c5']
  inside = restored.model.apply(restored.variables, x, 'mri', method='backbone')['c5']
  np.testing.assert_array_equal(np.asarray(alone), np.asarray(inside))
