"""Preemption drill and faults of whole runs, with the tiny model of test_loop: SIGTERM (what
SLURM's `--signal=TERM@300` sends) during a checkpoint save and during the first step, a resume
on 4 devices of a run started on 8 (same global batch, same data order), a kill after the last
checkpoint (each step logged once), a corrupt newest checkpoint, and lr = NaN."""

import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aacp_jax import checkpoint as ckpt_lib
from aacp_jax.metrics import read_jsonl
from aacp_jax.models import inputs
from aacp_jax.train import loop
from aacp_jax.train import state as state_lib
from tests.test_loop import Tiny, saved_variables, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 8


def config():
  return tiny_config(total_steps=TOTAL, log_every_steps=1, keep_checkpoints=3)


def make_task(*, sigterm_when_traced=False, lr=None):
  """The tiny task; its loss also reports the batch's pixel sum (exact: uint8 summed as int32),
  which identifies the data order. sigterm_when_traced: SIGTERM to this process while the first
  step is being compiled. lr: the optimiser's learning rate, bypassing the config's checks."""

  def make(cfg, data):
    del data
    model = Tiny()
    optim = cfg.optim.copy_and_resolve_references()
    if lr is not None:
      optim.lr = lr
    tx, schedule = state_lib.make_optimizer(optim, cfg.total_steps)

    def loss_fn(params, batch_stats, extra, batch, key, scheduled):
      del key, scheduled
      if sigterm_when_traced:
        os.kill(os.getpid(), signal.SIGTERM)
      image = batch['xray']['image']
      out, new = model.apply(
        {'params': params, 'batch_stats': batch_stats},
        {'xray': image},
        train=True,
        mutable=['batch_stats'],
      )
      value = jnp.mean(out**2)
      pixels = jnp.sum(image.astype(jnp.int32))
      return value, (new['batch_stats'], extra, {'loss': value, 'pixels': pixels})

    return loop.Task(
      model=model,
      dummy_inputs=inputs.dummy_inputs(('xray',), 32),
      tx=tx,
      schedule=schedule,
      loss_fn=loss_fn,
      total_steps=cfg.total_steps,
    )

  return make


def rows(workdir):
  return read_jsonl(os.path.join(workdir, 'metrics.jsonl'))


def steps_on_disk(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def kernel(trained):
  return np.asarray(jax.device_get(trained.state.params['Dense_0']['kernel']))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('reference'))
  trained = loop.train(config(), workdir, make_task())
  assert trained.resumed_from is None and trained.stopped_at is None
  return workdir, {r['step']: r for r in rows(workdir)}, kernel(trained)


def assert_continues(workdir, reference, rtol):
  got = rows(workdir)
  assert [r['step'] for r in got] == list(range(1, TOTAL + 1)), 'a step logged twice or never'
  want = reference[1]
  # The same batches in the same order, and the same losses.
  assert [r['pixels'] for r in got] == [want[s]['pixels'] for s in range(1, TOTAL + 1)]
  np.testing.assert_allclose(
    [r['loss'] for r in got], [want[s]['loss'] for s in range(1, TOTAL + 1)], rtol=rtol
  )


def child(workdir):
  """The resume in a process with 4 CPU devices (`python -c` from the test below)."""
  assert jax.device_count() == 4, jax.devices()
  trained = loop.train(config(), workdir, make_task())
  print('RESUMED_FROM', trained.resumed_from, int(trained.state.step), flush=True)


def test_sigterm_during_a_save_stops_after_it_and_resumes_on_4_devices(
  tmp_path, reference, monkeypatch
):
  workdir = str(tmp_path / 'run')
  save = ckpt_lib.Checkpointer.save

  def save_with_sigterm(self, step, *args, **kwargs):
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 4 is being written
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ckpt_lib.Checkpointer, 'save', save_with_sigterm)
  trained = loop.train(config(), workdir, make_task())
  monkeypatch.undo()
  # The signal is acted on after the next step: logged, saved and stopped at as one. (orbax
  # always saves the first step too.)
  assert trained.stopped_at == 5
  assert steps_on_disk(workdir) == [1, 4, 5]
  for s in (4, 5):
    assert ckpt_lib.verify(os.path.join(workdir, 'checkpoints', str(s))) is None
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0'
  out = subprocess.run(
    [sys.executable, '-c', f'from tests import test_preemption as t; t.child({workdir!r})'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'RESUMED_FROM 5 {TOTAL}' in out.stdout
  # 4 devices sum BatchNorm statistics in another order than 8: float32 rounding, which the
  # updates carry on (1.4e-5 relative by step 7, measured).
  assert_continues(workdir, reference, rtol=1e-4)


def test_sigterm_in_the_first_step_then_a_kill_after_a_checkpoint_logs_each_step_once(
  tmp_path, reference, monkeypatch
):
  workdir = str(tmp_path / 'run')
  first = loop.train(config(), workdir, make_task(sigterm_when_traced=True))
  assert first.stopped_at == 1 and steps_on_disk(workdir) == [1]
  # A kill after step 6 (the last checkpoint: 4): the metric row of step 6 is written, nothing
  # after it runs. The resume logs steps 5 and 6 again; they must not appear twice.
  write = loop.MetricWriter.write

  def write_then_die(self, step, metrics):
    write(self, step, metrics)
    if step == 6:
      raise KeyboardInterrupt('killed')

  monkeypatch.setattr(loop.MetricWriter, 'write', write_then_die)
  with pytest.raises(KeyboardInterrupt):
    loop.train(config(), workdir, make_task())
  monkeypatch.undo()
  assert [r['step'] for r in rows(workdir)] == list(range(1, 7))
  assert steps_on_disk(workdir) == [1, 4]  # the failed run pruned nothing
  resumed = loop.train(config(), workdir, make_task())
  assert resumed.resumed_from == 4 and int(resumed.state.step) == TOTAL
  assert_continues(workdir, reference, rtol=1e-6)
  np.testing.assert_allclose(kernel(resumed), reference[2], rtol=1e-6)


def test_a_flipped_newest_checkpoint_resumes_from_the_one_before(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  assert steps_on_disk(workdir) == [1, 4, 8]
  step_dir = os.path.join(workdir, 'checkpoints', str(TOTAL))
  biggest = max(
    (os.path.join(r, n) for r, _, names in os.walk(os.path.join(step_dir, 'state')) for n in names),
    key=os.path.getsize,
  )
  with open(biggest, 'r+b') as f:
    f.seek(os.path.getsize(biggest) // 2)
    f.write(b'\xff\xfe\xfd\xfc')
  resumed = loop.train(config(), workdir, make_task())
  assert resumed.resumed_from == 4 and int(resumed.state.step) == TOTAL
  assert steps_on_disk(workdir) == [1, 4, 8]  # 8 trained again; 1 and 4 kept
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', ckpt_lib.REJECTED, str(TOTAL)))
  assert_continues(workdir, reference, rtol=1e-6)


def test_lr_nan_stops_at_step_1_with_finite_parameters_and_reruns_keep_them(tmp_path):
  workdir = str(tmp_path / 'run')
  with pytest.raises(
    FloatingPointError, match=r'^step 1: 1 step\(s\) skipped .* is saved in .* \(step 1\)$'
  ):
    loop.train(config(), workdir, make_task(lr=float('nan')))
  assert steps_on_disk(workdir) == [1]
  # A rerun skips step 2 the same way and keeps step 1 (it used to save and prune each time).
  with pytest.raises(FloatingPointError, match=r'^step 2: .*the checkpoint of step 1 holds'):
    loop.train(config(), workdir, make_task(lr=float('nan')))
  assert steps_on_disk(workdir) == [1]
  variables, step = saved_variables(workdir)
  assert step == 1 and all(np.isfinite(x).all() for x in jax.tree.leaves(variables))
