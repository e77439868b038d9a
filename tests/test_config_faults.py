"""Config values no run can use end in one line naming the key, before anything compiles: NaN
and infinity (which pass a `<= 0` check), zero cadences, non-positive batch shares, and the
command line's unknown keys and stray arguments."""

import math
import os
import subprocess
import sys

import pytest

from aacp_jax import config_checks
from aacp_jax.train import landmarks as landmarks_experiment
from aacp_jax.train import pretrain as pretrain_experiment
from configs import landmarks, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN, INF = math.nan, math.inf


def with_value(config, key, value):
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  return config


def assert_one_line_naming(check, config, key):
  with pytest.raises(ValueError) as e:
    check(config)
  msg = str(e.value)
  assert '\n' not in msg
  assert msg.startswith(f'config.{key}='), msg


PRETRAIN_FAULTS = [
  # Non-finite values of every float the runs read: NaN slips through `<= 0` checks.
  *[
    (key, bad)
    for key in (
      'optim.lr',
      'optim.weight_decay',
      'optim.grad_clip',
      'loss.temperature',
      'loss.gamma',
      'loss.sigma',
      'loss.spatial_weight',
      'loss.triplet_weight',
      'loss.triplet_margin',
      'loss.cross_weight',
      'loss.cross_delta',
      'loss.cross_organ_weight',
      'loss.cross_start_epoch',
      'eval.l2',
      'augment.rotation.max_deg',
      'augment.noise.std',
    )
    for bad in (NAN, INF)
  ],
  ('optim.lr', -INF),
  ('optim.weight_decay', -1e-6),
  ('optim.grad_clip', -1.0),
  ('log_every_steps', 0),
  ('checkpoint_every_steps', 0),
  ('keep_checkpoints', 0),
  ('total_steps', -1),
  ('num_epochs', 0),
  ('batch_size', 0),
  ('seed', -1),
  ('optim.warmup_steps', -1),
  ('data.worker_count', -1),
  ('data.image_size', 16),
  ('data.phantoms.train', 0),
  ('data.shares.ct', -0.5),
  ('data.shares.mri', 0.0),
  ('data.shares.xray', NAN),
  ('model.width', 0),
  ('model.projector', (256, 0, 128)),
  ('model.fpn_channels', (16, 32, -1, 128)),
  ('model.roi_features', 0),
  ('loss.sigma', 0.0),
  ('loss.multiscale_weights', (0.25, NAN, 0.25, 0.25)),
  ('loss.cross_min_common', 0),
  ('eval.batch_size', 0),
  ('eval.bootstrap', 0),
  ('augment.rotation.p', 1.5),
  ('augment.crop.area', (0.0, 1.0)),
  ('augment.elastic.grid', 1),
  ('augment.cutout.size', -0.1),
]


def _key_in_message(key, value):
  # A NaN inside a tuple is named by its index, e.g. config.loss.multiscale_weights[1]=nan.
  if isinstance(value, tuple) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
    return f'{key}['
  return key


@pytest.mark.parametrize('key,value', PRETRAIN_FAULTS)
def test_pretrain_values_fail_in_one_line_naming_the_key(key, value):
  config = with_value(pretrain.get_config('demo'), key, value)
  with pytest.raises(ValueError) as e:
    pretrain_experiment.check_config(config)
  msg = str(e.value)
  assert '\n' not in msg
  assert msg.startswith(f'config.{_key_in_message(key, value)}'), msg


@pytest.mark.parametrize(
  'key,value',
  [
    ('optim.lr', NAN),
    ('optim.grad_clip', INF),
    ('loss.heatmap_sigma', NAN),
    ('loss.heatmap_sigma', 0.0),
    ('loss.coord_weight', INF),
    ('loss.visible_weight', -1.0),
    ('eval.visible_threshold', NAN),
    ('eval.detect_radius', 0.0),
    ('model.levels', 0),
    ('total_steps', 0),
    ('log_every_steps', 0),
    ('keep_checkpoints', 0),
    ('data.shares.ct', -0.5),
  ],
)
def test_landmark_values_fail_in_one_line_naming_the_key(key, value):
  config = with_value(landmarks.get_config('demo'), key, value)
  assert_one_line_naming(landmarks_experiment.check_config, config, key)


def test_every_shipped_config_passes():
  for name in pretrain.sweep():
    pretrain_experiment.check_config(pretrain.get_config(name))
    pretrain_experiment.check_config(pretrain.get_config(f'demo,{name}'))
  for arg in (None, 'demo'):
    landmarks_experiment.check_config(landmarks.get_config(arg))


def test_rules_describe_their_range():
  c = pretrain.get_config('demo')
  with pytest.raises(ValueError, match=r'^config.optim.lr=0.0: must be a finite number > 0$'):
    config_checks.check(with_value(c, 'optim.lr', 0.0), [('optim.lr', config_checks.POSITIVE)])
  with pytest.raises(ValueError, match=r'in \[0, 1\]$'):
    config_checks.check(
      with_value(c, 'augment.flip.p', 2.0), [('augment.flip.p', config_checks.UNIT)]
    )
  with pytest.raises(KeyError, match='config.optim.nope'):  # a renamed key cannot go unchecked
    config_checks.check(c, [('optim.nope', config_checks.POSITIVE)])


def run_main(*args):
  # These fail while the flags are parsed: no JAX is imported, each takes well under a second.
  return subprocess.run(
    [sys.executable, '-m', 'aacp_jax.main', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=1800,
  )


def test_an_unknown_override_names_only_itself(tmp_path):
  proc = run_main(
    '--config=configs/pretrain.py:demo',
    f'--workdir={tmp_path}',
    '--config.optim.lr=1e-3',
    '--config.log_every_steps=5',
    '--config.optim.nope=1',
    '--config.batch_size=32',
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
    'error: --config.optim.nope: not a key of the config configs/pretrain.py:demo'
  ]


def test_an_extra_positional_argument_is_one_line(tmp_path):
  proc = run_main('--config=configs/pretrain.py:demo', f'--workdir={tmp_path}', 'extra')
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
    "error: unexpected argument(s) 'extra'; every option is a --flag=value (see --help)"
  ]
