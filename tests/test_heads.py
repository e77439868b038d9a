"""Projector: layer layout, output dims/dtypes, normalisation, BatchNorm state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aacp_jax.models.heads import Projector, l2_normalize


def key(seed=0):
  return jax.random.key(seed, impl='unsafe_rbg')  # fast to compile on CPU


def test_default_projector_shapes_and_param_count():
  proj = Projector()
  x = jax.ShapeDtypeStruct((4, 2048), jnp.float32)
  variables = jax.eval_shape(lambda x: proj.init(key(), x, train=False), x)
  shapes = jax.tree_util.tree_map(lambda a: a.shape, variables['params'])
  assert shapes == {
    'dense0': {'kernel': (2048, 2048)},
    'bn0': {'scale': (2048,), 'bias': (2048,)},
    'dense1': {'kernel': (2048, 2048)},
    'bn1': {'scale': (2048,), 'bias': (2048,)},
    'dense2': {'kernel': (2048, 512), 'bias': (512,)},
  }
  assert set(variables['batch_stats']) == {'bn0', 'bn1'}
  out = jax.eval_shape(lambda v, x: proj.apply(v, x, train=False), variables, x)
  assert out.shape == (4, 512) and out.dtype == jnp.float32


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_projector_unit_norm_float32(dtype):
  proj = Projector(features=(32, 32, 16), dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (8, 24)) * 3.0
  variables = proj.init(key(), x, train=False)
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables))
  z, updates = proj.apply(variables, x, train=True, mutable=['batch_stats'])
  assert z.shape == (8, 16) and z.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
  # Train mode moved the running statistics; eval mode then depends on them.
  assert not np.allclose(updates['batch_stats']['bn0']['mean'], 0.0)
  before = proj.apply(variables, x, train=False)
  after = proj.apply({**variables, **updates}, x, train=False)
  assert not np.allclose(before, after)


def test_l2_normalize_is_safe_at_zero():
  z = l2_normalize(jnp.zeros((2, 4)))
  assert np.all(np.isfinite(z)) and np.all(z == 0)
  grad = jax.grad(lambda v: l2_normalize(v).sum())(jnp.zeros((2, 4)))
  assert np.all(np.isfinite(grad))
  v = jnp.array([[3.0, 4.0]], jnp.bfloat16)
  np.testing.assert_allclose(l2_normalize(v), [[0.6, 0.8]], rtol=1e-6)
  assert l2_normalize(v).dtype == jnp.float32
