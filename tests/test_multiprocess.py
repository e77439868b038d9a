"""Two JAX processes on localhost (CPU devices, gloo collectives): the multi-host code path.

Each process reads its own half of the shards and contributes its half of every global batch;
the step, checkpoints and probes run over the 4 devices of both processes together.
"""

import json
import os
import socket
import subprocess
import sys

from aacp_jax.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_together(tmp_path):
  port = free_port()
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS='--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0',
  )
  # One modality keeps compilation short; the multi-host path does not depend on how many.
  # `minimal`: the heads of the full model only lengthen compilation here.
  args = [
    '--config=configs/pretrain.py:demo,minimal',
    '--config.data.image_size=32',
    "--config.modalities=('xray',)",
    '--config.data.phantoms.train=32',
    '--config.data.phantoms.test=16',
    '--config.batch_size=32',
    '--config.model.width=4',
    '--config.model.projector=(16,16,8)',
    '--config.total_steps=4',
    '--config.log_every_steps=1',
    '--config.checkpoint_every_steps=2',
    '--config.eval.bootstrap=20',
    '--config.eval.l2=0.01',
    f'--workdir={tmp_path}',
    f'--coordinator_address=127.0.0.1:{port}',
    '--num_processes=2',
  ]
  procs = [
    subprocess.Popen(
      [sys.executable, '-m', 'aacp_jax.main', *args, f'--process_id={i}'],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=1800) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  rows = read_jsonl(os.path.join(tmp_path, 'metrics.jsonl'))
  # Only process 0 writes metrics, once per step.
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  assert all(r['finite'] == 1.0 for r in rows)
  assert 'Process 1/2' in outs[1][1] or 'Process 1/2' in outs[1][0]
  assert os.path.isdir(os.path.join(tmp_path, 'checkpoints', '4'))
  results = json.load(open(os.path.join(tmp_path, 'eval.json')))
  assert set(results['probe']) == {'xray'}
