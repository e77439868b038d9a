"""End to end with a tiny ResNet on tiny phantoms: train, checkpoint, interrupt, resume, probe."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from aacp_jax.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    '--config=configs/pretrain.py:demo',
    '--config.data.image_size=32',
    '--config.data.phantoms.train=32',
    '--config.data.phantoms.test=16',
    '--config.batch_size=32',
    '--config.model.width=4',
    '--config.model.projector=(32,32,16)',
    '--config.total_steps=8',
    '--config.log_every_steps=1',
    '--config.checkpoint_every_steps=2',
    '--config.eval.bootstrap=50',
]


def start(workdir, *extra):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, '-m', 'aacp_jax.main', *TINY, *extra,
                           f'--workdir={workdir}'], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return out


def losses(workdir):
  rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return {r['step']: r['loss'] for r in rows}


def test_interrupt_and_resume_continues_exactly(tmp_path):
  ref_dir, run_dir = str(tmp_path / 'ref'), str(tmp_path / 'run')
  ref = start(ref_dir)
  # Interrupt the second run with SIGINT as soon as it has logged step 3.
  run = start(run_dir)
  deadline = time.time() + 300
  while time.time() < deadline and run.poll() is None:
    if 3 in losses(run_dir) if os.path.exists(os.path.join(run_dir, 'metrics.jsonl')) else False:
      run.send_signal(signal.SIGINT)
      break
    time.sleep(0.2)
  finish(run)
  stopped_at = max(losses(run_dir))
  assert 3 <= stopped_at < 8, 'the run was not interrupted mid-way'
  assert os.path.isdir(os.path.join(run_dir, 'checkpoints', str(stopped_at)))
  out = finish(start(run_dir))  # The same command again resumes.
  ref_out = finish(ref)
  got, want = losses(run_dir), losses(ref_dir)
  assert sorted(want) == list(range(1, 9))
  assert sorted(got) == list(range(1, 9)), 'a step was repeated or skipped'
  # Same params, same data order, same augmentation keys: the same losses after the resume.
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)],
                             rtol=1e-6)
  # The loss falls, and the run ends with linear probes on held-out phantoms.
  assert want[8] < want[1]
  for d, text in ((run_dir, out), (ref_dir, ref_out)):
    results = json.load(open(os.path.join(d, 'eval.json')))
    for m in ('ct', 'mri', 'xray'):
      for enc in ('pretrained', 'random_init'):
        r = results['probe'][m][enc]
        assert 0.0 <= r['auroc'] <= 1.0 and r['n_test'] == 16
    assert 'Linear probes' in text and 'pretrained' in text
