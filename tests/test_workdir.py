"""One run per workdir, and a resume only of the same run: the lock (its holder named, a dead
holder's lock recovered), the comparison with the workdir's config.json, and the phantom cache
built atomically. Nothing here compiles: every check runs before the model is built."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from aacp_jax import workdir as workdir_lib
from aacp_jax.data import phantoms as ph
from aacp_jax.data import shards
from aacp_jax.train import loop
from configs import pretrain
from tests import workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides):
  c = pretrain.get_config('demo')
  c.data.image_size = 32
  c.batch_size = 32
  return workdirs.override(c, **overrides)


def old_run(tmp_path, **overrides):
  """A workdir as a run of `small_config(**overrides)` leaves it: config.json, a checkpoint."""
  workdir = str(tmp_path / 'run')
  os.makedirs(os.path.join(workdir, 'checkpoints', '4'))
  workdir_lib.write_config(small_config(**overrides), workdir)
  return workdir


def test_a_resume_with_another_model_or_data_names_the_keys(tmp_path):
  workdir = old_run(tmp_path)
  before = open(os.path.join(workdir, 'config.json')).read()
  new = small_config(**{'data.image_size': 64, 'batch_size': 64, 'model.projector': (8, 8, 4)})
  with pytest.raises(ValueError) as e:
    # Through the loop: the check comes before the mesh, the data or the model (make_task=None).
    loop.train(new, workdir, make_task=None)
  msg = str(e.value)
  assert '\n' not in msg
  assert 'data.image_size: 32 in the workdir, 64 now' in msg
  assert 'batch_size: 32 in the workdir, 64 now' in msg
  assert 'model.projector: [256, 256, 128] in the workdir, [8, 8, 4] now' in msg
  assert f'--workdir={workdir}' in msg and 'use a new --workdir' in msg
  assert 'total_steps' not in msg  # only the differing keys
  # config.json is written only after the check passes.
  assert open(os.path.join(workdir, 'config.json')).read() == before


@pytest.mark.parametrize(
  'key,value',
  [
    ('model.depth', 34),
    ('model.width', 32),
    ('model.dtype', 'bfloat16'),
    ('modalities', ('ct', 'mri')),
    ('data.shares.ct', 0.25),
    ('seed', 1),
    ('method', 'simclr'),
    ('data.root', '/data/shards'),
    ('data.phantoms.train', 512),
    ('optim.lr', 3e-4),
    ('loss.temperature', 0.2),
  ],
)
def test_changes_a_resume_cannot_take_are_refused(tmp_path, key, value):
  workdir = old_run(tmp_path)
  with pytest.raises(ValueError, match=rf'another config: {key}: .* in the workdir, .* now'):
    workdir_lib.check_resume(small_config(**{key: value}), workdir)


def test_changes_a_resume_can_take_are_allowed_and_recorded(tmp_path):
  workdir = old_run(tmp_path)
  new = small_config(
    total_steps=400, log_every_steps=5, checkpoint_every_steps=20, keep_checkpoints=5
  )
  new.eval.bootstrap = 100
  changes = workdir_lib.check_resume(new, workdir)
  assert changes == {
    'total_steps': (300, 400),
    'log_every_steps': (10, 5),
    'checkpoint_every_steps': (50, 20),
    'keep_checkpoints': (3, 5),
    'eval.bootstrap': (1000, 100),
  }
  workdir_lib.record_changes(workdir, changes)
  (row,) = [json.loads(line) for line in open(os.path.join(workdir, 'config_changes.jsonl'))]
  assert row['changes']['total_steps'] == {'workdir': 300, 'now': 400}


def test_nothing_is_compared_without_a_checkpoint(tmp_path):
  # A run that failed before its first checkpoint left nothing to resume: a fixed config
  # (another data root, say) just replaces its config.json.
  workdir = old_run(tmp_path)
  os.rmdir(os.path.join(workdir, 'checkpoints', '4'))
  assert workdir_lib.check_resume(small_config(**{'data.image_size': 64}), workdir) == {}
  assert workdir_lib.check_resume(small_config(), str(tmp_path / 'fresh')) == {}


def test_a_second_run_in_a_workdir_names_the_holder(tmp_path):
  workdir = str(tmp_path)
  with workdir_lib.lock(workdir):
    with pytest.raises(ValueError) as e:
      with workdir_lib.lock(workdir):
        pass
  msg = str(e.value)
  assert f'--workdir={workdir}: in use by pid {os.getpid()} on host {socket.gethostname()}' in msg
  assert '\n' not in msg
  with workdir_lib.lock(workdir):  # released at the end of the block
    pass


def test_a_dead_holders_lock_is_recovered(tmp_path):
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import sys, time\n'
      'from aacp_jax import workdir\n'
      'with workdir.lock(sys.argv[1]):\n'
      '  print("locked", flush=True)\n'
      '  time.sleep(600)\n',
      str(tmp_path),
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(ValueError, match=rf'in use by pid {holder.pid} '):
      with workdir_lib.lock(str(tmp_path)):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel drops the lock
    holder.wait(timeout=1800)
  with workdir_lib.lock(str(tmp_path)):
    pass


def test_a_second_process_gets_the_lock_message_and_exit_status(tmp_path):
  # The first run is this test holding the lock; the second is the real command line.
  workdir = str(tmp_path)
  with workdir_lib.lock(workdir):
    proc = subprocess.run(
      [sys.executable, '-m', 'aacp_jax.main', '--config=configs/pretrain.py:demo']
      + [f'--workdir={workdir}'],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=1800,
    )
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: --workdir={workdir}: in use by pid {os.getpid()} on host ')
  assert 'Traceback' not in proc.stderr


COUNTS = {'train': {'xray': 2}}


def test_phantoms_are_built_aside_and_renamed_into_place(tmp_path, monkeypatch):
  root = str(tmp_path / 'ph')
  real = ph.make_record

  def fail_on_second(modality, index, **kw):
    if index == 1:
      raise RuntimeError('killed mid-build')
    return real(modality, index, **kw)

  monkeypatch.setattr(ph, 'make_record', fail_on_second)
  with pytest.raises(RuntimeError):
    ph.build(root, seed=0, image_size=16, counts=COUNTS, progress=False)
  # Nothing half-built where a reader (or the next builder) would look.
  assert os.listdir(root) == []
  monkeypatch.setattr(ph, 'make_record', real)
  ph.build(root, seed=0, image_size=16, counts=COUNTS, progress=False)
  assert sorted(os.listdir(root)) == ['train']
  assert shards.read_manifest(root, 'train')['modalities']['xray']['count'] == 2


def test_a_builder_finding_the_cache_done_uses_it(tmp_path, monkeypatch):
  root = str(tmp_path / 'ph')
  ph.build(root, seed=0, image_size=16, counts=COUNTS, progress=False)
  manifest = os.path.join(root, 'train', 'manifest.json')
  first = os.stat(manifest).st_mtime_ns
  # A second builder that started before the first finished: it found no cache, built its own
  # copy, and now publishes it onto the finished one.
  real_complete = ph._complete
  calls = []

  def stale_first(*args):
    calls.append(args)
    return len(calls) > 1 and real_complete(*args)

  monkeypatch.setattr(ph, '_complete', stale_first)
  ph.build(root, seed=0, image_size=16, counts=COUNTS, progress=False)
  assert os.stat(manifest).st_mtime_ns == first  # the finished split was kept
  assert sorted(os.listdir(root)) == ['train']  # and the second copy discarded


def test_an_old_split_is_replaced_whole(tmp_path):
  root = str(tmp_path / 'ph')
  ph.build(root, seed=0, image_size=16, counts={'train': {'xray': 2, 'mri': 2}}, progress=False)
  ph.build(root, seed=1, image_size=16, counts=COUNTS, progress=False)
  assert sorted(os.listdir(root)) == ['train']
  # No shard of the old split's other modality is left beside the new manifest.
  assert not [n for n in os.listdir(os.path.join(root, 'train')) if n.startswith('mri-')]
  assert shards.read_manifest(root, 'train')['meta']['seed'] == 1
