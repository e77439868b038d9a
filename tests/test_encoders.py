"""AACPModel: per-modality encoders, one shared projector, output contract, dtypes, build_model."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from aacp_jax.models.encoders import AACPModel, build_model

CHANNELS = {'ct': 64, 'mri': 3, 'xray': 1}
TINY = dict(
  depth=18, width=8, projector=(32, 32, 16), dtype='float32', modalities=('ct', 'mri', 'xray')
)


def key(seed=0):
  return jax.random.key(seed, impl='unsafe_rbg')  # fast to compile on CPU


def _images(batch=(2, 3, 2), size=32):
  return {
    m: jax.random.normal(jax.random.key(i), (b, size, size, CHANNELS[m]))
    for i, (m, b) in enumerate(zip(CHANNELS, batch))
  }


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _fill(shapes, seed=0):
  """Concrete variables for `shapes` from NumPy: compiling the RNG-heavy init of three ResNets
  costs ~7 s on 2 CPU cores, and init itself is covered by eval_shape and tests/test_resnet.py."""
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    name = path[-1].key
    if name == 'kernel':
      return jnp.asarray(
        rng.standard_normal(a.shape) * np.sqrt(2.0 / np.prod(a.shape[:-1])), a.dtype
      )
    return jnp.full(a.shape, 1.0 if name in ('scale', 'var') else 0.0, a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope='module')
def tiny():
  model = build_model(TINY)
  images = _images()
  variables = _fill(jax.eval_shape(lambda x: model.init(key(), x, train=False), images))
  return model, variables, images


@pytest.fixture(scope='module')
def apply_eval(tiny):
  model = tiny[0]
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


def test_variable_layout(tiny):
  _, variables, _ = tiny
  assert set(variables) == {'params', 'batch_stats'}
  assert set(variables['params']) == {'encoder_ct', 'encoder_mri', 'encoder_xray', 'projector'}
  for m, c in CHANNELS.items():
    assert variables['params'][f'encoder_{m}']['conv1']['kernel'].shape == (7, 7, c, 8)
  # One projector whose input is the pooled width of every encoder (64 = 8 * 8 for ResNet-18).
  assert variables['params']['projector']['dense0']['kernel'].shape == (64, 32)


def test_outputs_contract(tiny, apply_eval):
  _, variables, images = tiny
  out = apply_eval(variables, images)
  assert set(out) == set(CHANNELS)
  for m, x in images.items():
    assert out[m]['features'].shape == (x.shape[0], 64)
    assert out[m]['z'].shape == (x.shape[0], 16)
    assert out[m]['features'].dtype == out[m]['z'].dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(out[m]['z'], axis=-1), 1.0, rtol=1e-5)


def test_subset_and_embed_agree_in_eval(tiny, apply_eval):
  model, variables, images = tiny
  full = apply_eval(variables, images)
  only_ct = apply_eval(variables, {'ct': images['ct']})
  assert set(only_ct) == {'ct'}
  emb = jax.jit(lambda v, x: model.apply(v, x, 'mri', method=AACPModel.embed))(
    variables, images['mri']
  )
  for a, b in [(full['ct'], only_ct['ct']), (full['mri'], emb)]:
    np.testing.assert_allclose(a['features'], b['features'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a['z'], b['z'], rtol=1e-5, atol=1e-6)
  maps = model.apply(variables, images['xray'], 'xray', method=AACPModel.backbone)
  assert maps['c3'].shape == (2, 4, 4, 16) and maps['c5'].shape == (2, 1, 1, 64)


def test_projector_is_shared(tiny, apply_eval):
  _, variables, images = tiny
  # One projector: the parameter tree holds a single copy (checked in test_variable_layout), and
  # changing it moves every modality's z while leaving the backbone features alone.
  before = apply_eval(variables, images)
  params = jax.tree_util.tree_map(lambda a: a, variables['params'])
  params['projector'] = {
    **params['projector'],
    'dense2': {
      **params['projector']['dense2'],
      'bias': params['projector']['dense2']['bias'] + 1.0,
    },
  }
  after = apply_eval({**variables, 'params': params}, images)
  for m in CHANNELS:
    assert not np.allclose(before[m]['z'], after[m]['z'])
    np.testing.assert_array_equal(before[m]['features'], after[m]['features'])


def test_train_mode_updates_every_batch_stat(tiny):
  model, variables, images = tiny
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
    variables, images
  )
  changed = jax.tree_util.tree_map(
    lambda a, b: not np.allclose(a, b), variables['batch_stats'], updates['batch_stats']
  )
  for name in ('encoder_ct', 'encoder_mri', 'encoder_xray', 'projector'):
    assert all(jax.tree_util.tree_leaves(changed[name])), name


def test_full_size_bf16_shapes_dtypes_and_count():
  cfg = ml_collections.ConfigDict(
    dict(
      depth=50,
      width=64,
      projector=(2048, 2048, 512),
      dtype='bfloat16',
      modalities=('ct', 'mri', 'xray'),
    )
  )
  model = build_model(cfg)
  images = {m: jax.ShapeDtypeStruct((2, 64, 64, c), jnp.float32) for m, c in CHANNELS.items()}
  variables = jax.eval_shape(lambda x: model.init(key(), x, train=False), images)
  assert {a.dtype for a in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  backbone = 23_508_032  # torchvision resnet50 without fc, 3 input channels
  projector = 2 * 2048 * 2048 + 2 * 2 * 2048 + 2048 * 512 + 512
  conv1 = lambda c: (c - 3) * 64 * 49
  expected = 3 * backbone + conv1(64) + conv1(1) + projector
  assert _count(variables['params']) == expected
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  for m in CHANNELS:
    assert out[m]['features'].shape == (2, 2048) and out[m]['features'].dtype == jnp.float32
    assert out[m]['z'].shape == (2, 512) and out[m]['z'].dtype == jnp.float32
  maps = jax.eval_shape(
    lambda v, x: model.apply(v, x, 'ct', method=AACPModel.backbone), variables, images['ct']
  )
  assert all(maps[f'c{i}'].dtype == jnp.bfloat16 for i in range(2, 6))
  assert model.num_features == 2048


def test_errors():
  model = build_model({**TINY, 'in_channels': {'ct': 64}})
  with pytest.raises(ValueError, match='channels'):
    jax.eval_shape(
      lambda x: model.init(key(), x, train=False),
      {'ct': jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)},
    )
  with pytest.raises(ValueError, match='subset'):
    jax.eval_shape(
      lambda x: model.init(key(), x, train=False),
      {'pet': jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)},
    )
  with pytest.raises(ValueError, match='dtype'):
    build_model({**TINY, 'dtype': 'float16'})
  with pytest.raises(ValueError, match='depth'):
    build_model({**TINY, 'depth': 20})
