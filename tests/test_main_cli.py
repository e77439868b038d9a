"""The entry point as a user runs it: bad input ends with one line naming the culprit."""

import os
import subprocess
import sys

import pytest

from aacp_jax.data import phantoms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, timeout=1800):
  env = dict(os.environ)  # conftest's XLA flags: 8 CPU devices.
  return subprocess.run(
    [sys.executable, '-m', 'aacp_jax.main', *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def last_line(proc):
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  return lines[-1] if lines else ''


@pytest.mark.parametrize(
  'args,expected',
  [
    (['--config=configs/pretrain.py:demo,nope'], "unknown variant 'nope'"),
    (['--config=configs/pretrain.py:demo', '--config.optim.nope=1'], 'optim.nope'),
    (
      ['--config=configs/pretrain.py:demo', '--config.batch_size=36'],
      'config.batch_size=36: the ct share (18) is not divisible by the 8 devices',
    ),
    (['--config=configs/pretrain.py:demo', '--config.model.depth=20'], 'config.model.depth=20'),
  ],
)
def test_bad_config_fails_in_one_line(tmp_path, args, expected):
  proc = run_main(*args, f'--workdir={tmp_path}')
  assert proc.returncode != 0
  assert expected in last_line(proc), proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr


def test_unwritable_workdir(tmp_path):
  locked = tmp_path / 'locked'
  locked.write_text('a file, not a directory')
  proc = run_main('--config=configs/pretrain.py:demo', f'--workdir={locked}/run')
  assert proc.returncode == 2
  assert f'--workdir={locked}/run: cannot be written' in last_line(proc)


def test_corrupt_shard_names_the_file(tmp_path):
  root = tmp_path / 'shards'
  counts = {'train': {'ct': 16, 'mri': 16, 'xray': 16}}
  phantoms.build(str(root), seed=0, image_size=32, counts=counts, progress=False)
  victim = sorted((root / 'train').glob('mri-*.array_record'))[0]
  data = bytearray(victim.read_bytes())
  victim.write_bytes(bytes(data[: len(data) // 2]))  # Truncated, as by a failed copy.
  proc = run_main(
    '--config=configs/pretrain.py:demo',
    f'--workdir={tmp_path}/run',
    f'--config.data.root={root}',
    '--config.data.image_size=32',
    '--config.batch_size=32',
  )
  assert proc.returncode == 2
  assert victim.name in last_line(proc), proc.stderr[-2000:]
