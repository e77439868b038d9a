"""Feature pyramid shapes per level, ROI attention maps and pooling, model wiring of the heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aacp_jax.models import encoders
from aacp_jax.models.encoders import AACPModel
from aacp_jax.models.fpn import FPN, LEVELS
from aacp_jax.models.roi import attention_pool
from configs import pretrain

STRIDES = (4, 8, 16, 32)


@pytest.mark.parametrize('size', [64, 224])
def test_fpn_levels_have_paper_strides_and_widths(size):
  # The paper's model (ResNet-50, FPN widths 64/128/256/512), shapes only (nothing materialised).
  c = pretrain.get_config()
  model = encoders.build_model(c.model, ('ct',), num_landmarks=20)
  x = jax.ShapeDtypeStruct((2, size, size, 64), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), {'ct': x}, train=False), x)
  levels = jax.eval_shape(
    lambda v, x: model.apply(v, x, 'ct', method=AACPModel.pyramid), variables, x
  )
  assert tuple(levels) == LEVELS
  for name, stride, width in zip(LEVELS, STRIDES, (64, 128, 256, 512)):
    assert levels[name].shape == (2, size // stride, size // stride, width), name
  out = jax.eval_shape(lambda v, x: model.apply(v, {'ct': x}, train=False), variables, x)['ct']
  assert {k: v.shape for k, v in out['levels'].items()} == {n: (2, 128) for n in LEVELS}
  assert out['attention'].shape == (2, size // 16, size // 16)
  assert out['z'].shape == (2, 512) and out['features'].shape == (2, 2048)


def test_fpn_top_down_path_mixes_coarse_levels_into_fine_ones():
  stages = {f'c{i}': jnp.ones((1, 32 // 2**i, 32 // 2**i, 4 * i)) for i in (2, 3, 4, 5)}
  fpn = FPN(channels=(8, 8, 8, 8))
  v = fpn.init(jax.random.key(0), stages, train=False)
  base = fpn.apply(v, stages, train=False)
  # Changing only c5 changes every level (through the top-down path), changing c2 only p2.
  c5 = dict(stages, c5=stages['c5'] * 3.0)
  c2 = dict(stages, c2=stages['c2'] * 3.0)
  moved5 = fpn.apply(v, c5, train=False)
  moved2 = fpn.apply(v, c2, train=False)
  for name in LEVELS:
    assert not np.allclose(base[name], moved5[name]), name
  assert not np.allclose(base['p2'], moved2['p2'])
  for name in LEVELS[1:]:
    np.testing.assert_array_equal(base[name], moved2[name])


def np_attention_pool(fmap, att):
  return np.einsum('bhw,bhwc->bc', att, fmap) / (att.sum(axis=(1, 2))[:, None] + 1e-6)


def test_attention_pool_matches_numpy_and_uniform_is_average():
  rng = np.random.default_rng(0)
  fmap = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
  att = rng.uniform(size=(3, 4, 5)).astype(np.float32)
  np.testing.assert_allclose(attention_pool(fmap, att), np_attention_pool(fmap, att), rtol=1e-5)
  uniform = np.full((3, 4, 5), 0.5, np.float32)
  np.testing.assert_allclose(attention_pool(fmap, uniform), fmap.mean(axis=(1, 2)), atol=1e-5)
  # A map twice the feature grid (c4 on c5) is block-averaged: a one-hot block picks that cell.
  big = np.zeros((1, 8, 10), np.float32)
  big[0, 2:4, 6:8] = 1.0
  pooled = np.asarray(attention_pool(fmap[:1], big))
  np.testing.assert_allclose(pooled[0], fmap[0, 1, 3], rtol=1e-4)


def tiny_model(**heads):
  model = AACPModel(
    modalities=('xray',),
    depth=18,
    width=4,
    projector=(16, 8),
    fpn_channels=(4, 8, 8, 8),
    level_projector=(8, 4),
    roi_features=4,
    **heads,
  )
  x = {'xray': jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 64, 1)), jnp.float32)}
  return model, model.init(jax.random.key(0), x, train=False), x


def test_roi_maps_for_plotting_and_features_use_them():
  model, v, x = tiny_model(roi_attention=True)
  maps = model.apply(v, x['xray'], 'xray', method=AACPModel.attention_maps)
  assert maps.shape == (2, 64, 64) and maps.dtype == jnp.float32
  assert bool(jnp.all((maps > 0) & (maps < 1)))
  out = model.apply(v, x, train=False)['xray']
  stages = model.apply(v, x['xray'], 'xray', method=AACPModel.backbone)
  # 'features' are c5 attention-pooled with the stride-16 map, not its plain average.
  np.testing.assert_allclose(
    out['features'],
    np_attention_pool(
      np.asarray(stages['c5'], np.float32),
      np.asarray(out['attention']).reshape(2, 2, 2, 2, 2).mean(axis=(2, 4)),
    ),
    rtol=1e-4,
    atol=1e-6,
  )
  emb = model.apply(v, x['xray'], 'xray', method=AACPModel.embed)
  np.testing.assert_allclose(emb['features'], out['features'], rtol=1e-5)


def test_heads_off_means_no_parameters_and_clear_errors():
  model, v, x = tiny_model()
  assert not any(k.split('_')[0] in ('fpn', 'levels', 'roi') for k in v['params'])
  out = model.apply(v, x, train=False)['xray']
  assert 'levels' not in out and 'attention' not in out
  np.testing.assert_allclose(
    out['features'], model.apply(v, x['xray'], 'xray', method=AACPModel.backbone)['pooled']
  )
  with pytest.raises(ValueError, match='roi_attention'):
    model.apply(v, x['xray'], 'xray', method=AACPModel.attention_maps)
  with pytest.raises(ValueError, match='fpn'):
    model.apply(v, x['xray'], 'xray', method=AACPModel.pyramid)
