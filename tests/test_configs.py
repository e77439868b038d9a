"""configs/pretrain.py: the paper's defaults, variants, and one-line errors for bad values."""

import pytest

from aacp_jax.augment import config as augment_config
from aacp_jax.train import pretrain as pretrain_experiment
from configs import pretrain


def test_default_is_paper_settings():
  c = pretrain.get_config()
  # Paper Tables 1 and 3, section 3.5.1.
  assert (c.model.depth, c.model.width) == (50, 64)
  assert tuple(c.model.projector) == (2048, 2048, 512)
  assert c.loss.temperature == 0.07
  assert c.batch_size == 256
  assert c.num_epochs == 200
  assert (c.optim.lr, c.optim.weight_decay) == (1e-4, 1e-6)
  assert augment_config.ct_window(c.augment) == (-160.0, 240.0)
  assert c.data.image_size == 224
  assert c.model.dtype == 'bfloat16'
  # Paper 3.2.1: lambda_spatial 0.1, trained through the landmark head.
  assert c.loss.spatial_weight == 0.1 and c.model.landmark_head
  pretrain_experiment.check_config(c)


def test_demo_is_cpu_sized_and_composes():
  c = pretrain.get_config('demo')
  assert c.data.image_size == 64 and c.model.depth == 18 and c.total_steps <= 500
  both = pretrain.get_config('demo,simclr')
  assert both.data.image_size == 64 and not both.augment.anatomy_aware
  assert pretrain.get_config('demo').augment.anatomy_aware


def test_table6_variants():
  minimal = pretrain.get_config('minimal')
  assert minimal.augment.anatomy_aware and minimal.model.landmark_head
  assert minimal.loss.spatial_weight == 0.1
  for name in ('no_spatial', 'simclr', 'demo,simclr'):
    c = pretrain.get_config(name)
    assert c.loss.spatial_weight == 0 and not c.model.landmark_head, name
  assert not pretrain.get_config('simclr').augment.anatomy_aware
  assert pretrain.get_config('no_spatial').augment.anatomy_aware
  assert {'minimal', 'no_spatial', 'simclr', 'no_anatomy_aug', 'demo'} <= set(pretrain.sweep())


def modules(c):
  """Which of the paper's seven components (1.3.3) a config switches on."""
  return {
    'anatomy_aug': bool(c.augment.anatomy_aware),
    'spatial': c.loss.spatial_weight > 0 and c.model.landmark_head,
    'contrast': c.loss.temperature > 0,
    'multiscale': c.model.fpn and max(c.loss.multiscale_weights) > 0,
    'roi': bool(c.model.roi_attention),
    'triplet': c.loss.triplet_weight > 0,
    'cross_modal': c.loss.cross_weight > 0,
  }


def test_default_is_the_full_model_and_each_ablation_removes_one_module():
  full = modules(pretrain.get_config())
  assert all(full.values()) and modules(pretrain.get_config('full')) == full
  c = pretrain.get_config()
  assert tuple(c.model.fpn_channels) == (64, 128, 256, 512)
  assert (c.loss.cross_weight, c.loss.cross_delta, c.loss.cross_organ_weight) == (0.3, 0.15, 0.5)
  assert (c.loss.cross_start_epoch, c.loss.cross_end_epoch) == (50, 100)
  removed = {
    'no_spatial': 'spatial',
    'no_anatomy_aug': 'anatomy_aug',
    'no_multiscale': 'multiscale',
    'no_roi': 'roi',
    'no_triplet': 'triplet',
    'no_cross_modal': 'cross_modal',
  }
  for variant, module in removed.items():
    for arg in (variant, f'demo,{variant}'):
      assert modules(pretrain.get_config(arg)) == dict(full, **{module: False}), arg
  core = {'anatomy_aug', 'spatial', 'contrast'}
  assert {k for k, v in modules(pretrain.get_config('minimal')).items() if v} == core
  assert {k for k, v in modules(pretrain.get_config('demo,simclr')).items() if v} == {'contrast'}
  assert not pretrain.get_config('no_multiscale').model.fpn  # no pyramid parameters either
  assert set(pretrain.TABLE6) <= set(pretrain.sweep())


def test_every_variant_builds():
  for name in pretrain.sweep():
    c = pretrain.get_config(name)
    pretrain_experiment.check_config(c)
    assert c.variant == name


def test_unknown_variant_names_the_culprit():
  with pytest.raises(ValueError, match=r"unknown variant 'nope'.*demo"):
    pretrain.get_config('demo,nope')


@pytest.mark.parametrize(
  'key,value,match',
  [
    ('modalities', ('ct', 'pet'), r"config.modalities: unknown modality 'pet'"),
    ('batch_size', 0, r'config.batch_size=0'),
    ('loss.temperature', 0.0, r'config.loss.temperature'),
    ('model.depth', 20, r'config.model.depth=20'),
    ('model.dtype', 'float16', r'config.model.dtype'),
    ('model.landmark_head', False, r'config.model.landmark_head'),
    ('loss.spatial_weight', -0.1, r'config.loss.spatial_weight'),
    ('optim.lr', -1.0, r'config.optim.lr'),
    ('loss.multiscale_weights', (1.0, 1.0), r'config.loss.multiscale_weights'),
    ('model.fpn', False, r'config.model.fpn=True'),
    ('model.fpn_channels', (8, 8, 8), r'config.model.fpn_channels'),
    ('loss.triplet_mining', 'easy', r"config.loss.triplet_mining='easy'"),
    ('loss.triplet_margin', -1.0, r'config.loss.triplet_margin=-1.0'),
    ('loss.cross_delta', 0.0, r'config.loss.cross_delta'),
    ('loss.cross_start_epoch', 120.0, r'config.loss.cross_start_epoch=120.0'),
    ('loss.cross_landmarks', ('carina',), r'config.loss.cross_landmarks: unknown landmark'),
    ('loss.cross_organ_weight', 2.0, r'config.loss.cross_organ_weight'),
  ],
)
def test_bad_values_fail_before_compilation(key, value, match):
  c = pretrain.get_config('demo')
  node = c
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=match) as e:
    pretrain_experiment.check_config(c)
  assert '\n' not in str(e.value)


def test_key_value_items_set_values_by_their_type():
  c = pretrain.get_config(
    'demo,method=aacp,optim.lr=3e-4,model.projector=(32,32,16),eval.probe=False,no_roi'
  )
  assert c.method == 'aacp' and c.optim.lr == 3e-4 and isinstance(c.optim.lr, float)
  assert c.model.projector == (32, 32, 16) and c.eval.probe is False
  assert not c.model.roi_attention  # a named variant after the settings still applies
  assert (
    c.variant == 'demo,method=aacp,optim.lr=3e-4,model.projector=(32,32,16),eval.probe=False,no_roi'
  )


@pytest.mark.parametrize(
  'arg,match',
  [
    ('demo,optim.lr=fast', r'optim.lr=fast: expected a float'),
    ('demo,optim.nope=1', r"config has no key 'optim.nope'"),
    ('demo,eval.probe=1', r'eval.probe=1: expected a bool'),
    ('demo,batch_size=(1,2)', r'batch_size=\(1,2\): expected a int'),
  ],
)
def test_bad_key_value_items_name_the_key(arg, match):
  with pytest.raises(ValueError, match=match) as e:
    pretrain.get_config(arg)
  assert '\n' not in str(e.value)


def test_unknown_method_names_the_registry():
  c = pretrain.get_config('demo,method=byol')
  with pytest.raises(ValueError, match=r"config.method='byol': expected one of aacp"):
    pretrain_experiment.check_config(c)


def test_method_variants_equal_their_method_items():
  # `mae` / `moco_v2` as named variants (bench step --variants=...) are the `method=` items.
  for name in ('mae', 'moco_v2'):
    for prefix in ('', 'demo,'):
      named = pretrain.get_config(prefix + name).to_dict()
      item = pretrain.get_config(f'{prefix}method={name}').to_dict()
      named.pop('variant'), item.pop('variant')
      assert named == item, name
      pretrain_experiment.check_config(pretrain.get_config(prefix + name))
