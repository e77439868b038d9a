"""The spatial-consistency loss in pretraining: landmark head, step metrics, gradient path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aacp_jax.data import landmarks as lm
from aacp_jax.methods import aacp, terms
from aacp_jax.methods.aacp import loss_fn, make_views
from aacp_jax.modalities import IN_CHANNELS
from aacp_jax.models import inputs
from aacp_jax.models.heads import LandmarkHead, spatial_soft_argmax
from aacp_jax.train import pretrain as pretrain_experiment
from configs import pretrain

K = len(lm.LANDMARKS)


def tiny_config(variant='demo,minimal', modalities=('mri', 'xray')):
  c = pretrain.get_config(variant)
  c.modalities = modalities
  c.data.image_size = 32
  c.batch_size = 16
  c.model.width = 4
  c.model.projector = (16, 16, 8)
  return c


def host_batch(config, n=8, seed=0):
  rng = np.random.default_rng(seed)
  s = config.data.image_size
  raw = {'ct': (np.int16, 200.0), 'mri': (np.float16, 1.0), 'xray': (np.uint8, 60.0)}
  out = {}
  for m in config.modalities:
    dtype, scale = raw[m]
    image = rng.normal(0, scale, (n, s, s, IN_CHANNELS[m]))
    if m == 'xray':
      image = np.clip(image + 128, 0, 255)
    visible = rng.uniform(size=(n, K)) < 0.7
    lms = rng.uniform(0.3, 0.7, (n, K, 2)).astype(np.float32) * visible[..., None]
    out[m] = {
      'image': image.astype(dtype),
      'landmarks': lms,
      'landmark_visible': visible,
      'landmarks_canonical': lms.copy(),
      'organs': (rng.uniform(size=(n, len(lm.ORGANS))) < 0.5).astype(np.uint8),
    }
  return out


def init(config):
  model = aacp.build_model(config)
  dummy = inputs.dummy_inputs(config.modalities, config.data.image_size)
  return model, model.init(jax.random.key(0), dummy, train=False)


def test_soft_argmax_finds_the_peak():
  h, w = 6, 8
  peaks = [(0, 0), (5, 7), (2, 3)]
  maps = np.zeros((1, h, w, len(peaks)), np.float32)
  for k, (i, j) in enumerate(peaks):
    maps[0, i, j, k] = 60.0  # exp(-60) elsewhere: a one-hot after softmax
  out = np.asarray(spatial_soft_argmax(jnp.asarray(maps)))
  assert out.shape == (1, len(peaks), 2) and out.dtype == np.float32
  want = [((i + 0.5) / h, (j + 0.5) / w) for i, j in peaks]
  np.testing.assert_allclose(out[0], want, atol=1e-6)
  # Flat maps give the image centre.
  np.testing.assert_allclose(spatial_soft_argmax(jnp.zeros((2, h, w, 3))), 0.5, atol=1e-6)


def test_landmark_head_output_contract():
  head = LandmarkHead(num_landmarks=5, features=8)
  x = jnp.ones((3, 4, 4, 16), jnp.bfloat16)
  v = head.init(jax.random.key(0), x, train=False)
  y = head.apply(v, x, train=False)
  assert y.shape == (3, 5, 2) and y.dtype == jnp.float32
  assert bool(jnp.all((y > 0) & (y < 1)))


def test_model_adds_landmarks_only_when_asked():
  config = tiny_config()
  model, variables = init(config)
  assert {'landmarks_mri', 'landmarks_xray'} <= set(variables['params'])
  x = {m: jnp.zeros((2, 32, 32, IN_CHANNELS[m])) for m in config.modalities}
  out = model.apply(variables, x, train=False)
  assert out['mri']['landmarks'].shape == (2, K, 2)
  config.model.landmark_head = False
  model_off, variables_off = init(config)
  assert not any(k.startswith('landmarks_') for k in variables_off['params'])
  assert 'landmarks' not in model_off.apply(variables_off, x, train=False)['mri']


def test_spatial_gradient_reaches_the_encoder():
  config = tiny_config(modalities=('mri',))
  model, v = init(config)
  batch = jax.tree.map(jnp.asarray, host_batch(config))
  views = make_views(jax.random.key(2), batch, config)

  def spatial_only(params):
    out, _ = model.apply(
      {'params': params, 'batch_stats': v['batch_stats']},
      {'mri': views['mri']['image']},
      train=True,
      mutable=['batch_stats'],
    )
    ctx = terms.Context(out=out, views=views, batch=batch, config=config, neg_weights={})
    return terms.spatial_term(ctx, 'mri')[0]

  grads = jax.jit(jax.grad(spatial_only))(v['params'])
  assert float(jnp.max(jnp.abs(grads['encoder_mri']['conv1']['kernel']))) > 0
  assert float(jnp.max(jnp.abs(grads['landmarks_mri']['heatmap']['kernel']))) > 0
  # The projector does not take part in the spatial term.
  assert float(jnp.max(jnp.abs(grads['projector']['dense0']['kernel']))) == 0


def test_no_spatial_has_no_spatial_metrics():
  config = tiny_config('demo,minimal,no_spatial', modalities=('mri',))
  pretrain_experiment.check_config(config)
  model, v = init(config)
  assert not any(k.startswith('landmarks_') for k in v['params'])
  batch = jax.tree.map(jnp.asarray, host_batch(config))
  _, (_, metrics) = jax.jit(functools.partial(loss_fn, model=model, config=config))(
    v['params'], v['batch_stats'], batch, jax.random.key(1)
  )
  assert not any(k.startswith('spatial') for k in metrics)
  assert 'contrast_mri' in metrics


def test_spatial_weight_needs_the_head():
  config = tiny_config()
  config.model.landmark_head = False
  with pytest.raises(ValueError, match=r'config.model.landmark_head'):
    pretrain_experiment.check_config(config)
