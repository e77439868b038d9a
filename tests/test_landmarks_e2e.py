"""Detector end to end: train a tiny one on phantoms, eval.json, then annotate_landmarks on new shards."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from aacp_jax.data import landmarks as lm
from aacp_jax.data import shards
from configs import landmarks as cfg_lib
from data_prep import annotate_landmarks as ann

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  c = cfg_lib.get_config('demo')
  c.modalities = ('ct', 'xray')
  c.data.image_size = 32
  c.data.shares = {'ct': 0.5, 'xray': 0.5}
  c.data.phantoms = {'train': 32, 'test': 16}
  c.batch_size = 16
  c.total_steps = 40
  c.model.width = 4
  c.model.levels = 2
  c.optim.warmup_steps = 5
  c.log_every_steps = 10
  c.checkpoint_every_steps = 40
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  from aacp_jax.train import landmarks as lmk

  workdir = str(tmp_path_factory.mktemp('det'))
  results = lmk.train_and_evaluate(tiny_config(), workdir)
  return workdir, results


def test_training_writes_eval_and_learns(trained):
  workdir, results = trained
  with open(os.path.join(workdir, 'eval.json')) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(results))
  for m in ('ct', 'xray'):
    row = saved['modalities'][m]
    for part in ('held_out', 'held_out_transformed'):
      assert 0 <= row[part]['detection_rate'] <= 1
      assert row[part]['mre_percent'] == pytest.approx(row[part]['mre_px'] / 32 * 100)
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert rows[-1]['step'] == 40
  # 40 steps of a 4-channel U-Net: not accurate yet, but clearly learning to localise.
  mre = lambda row: row['mre_px_ct'] + row['mre_px_xray']
  assert mre(rows[-1]) < 0.8 * mre(rows[0])
  info = json.load(open(os.path.join(workdir, 'detector.json')))
  atlas = np.asarray(info['canonical_atlas'])
  assert atlas.shape == (len(lm.LANDMARKS), 2) and ((atlas >= 0) & (atlas <= 1)).all()


def test_annotate_landmarks_writes_detections(trained, tmp_path):
  workdir, _ = trained
  src = [d for d in os.listdir(workdir) if d.startswith('phantoms-')][0]
  src = os.path.join(workdir, src)
  out = str(tmp_path / 'annotated')
  counts = ann.run(workdir, src, out, splits=['test'], batch_size=8)
  assert counts == {'test': {'ct': 16, 'xray': 16}}
  before, after = shards.read_manifest(src, 'test'), shards.read_manifest(out, 'test')
  assert after['meta']['landmarks']['threshold'] == 0.5
  for m in ('ct', 'xray'):
    assert len(after['modalities'][m]['files']) == len(before['modalities'][m]['files'])
    a, b = shards.open_source(src, 'test', m), shards.open_source(out, 'test', m)
    for i in range(len(a)):
      r0, r1 = a[i], b[i]
      np.testing.assert_array_equal(r0['image'], r1['image'])
      assert r0['label'] == r1['label'] and r0['subject'] == r1['subject']
      np.testing.assert_array_equal(r1['landmark_visible'], r1['landmark_confidence'] > 0.5)
      assert (r1['landmarks'][~r1['landmark_visible']] == 0).all()
  # Re-running skips the finished split; the same output root is refused as input.
  assert ann.run(workdir, src, out, splits=['test']) == {}
  with pytest.raises(ValueError, match='must differ'):
    ann.run(workdir, src, src)


def test_annotate_cli_bad_checkpoint_is_one_line(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'data_prep.annotate_landmarks',
      f'--checkpoint={tmp_path}',
      f'--input={tmp_path}',
      f'--output={tmp_path}/o',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: --checkpoint=')
  assert 'Traceback' not in proc.stderr
