"""ResNet: torchvision parameter counts, stage shapes/strides, dtypes, BatchNorm behaviour."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aacp_jax.models.resnet import ResNet


def key(seed=0):
  # unsafe_rbg: XLA compiles threefry-based init of a whole ResNet in ~10 s on 2 CPU cores, rbg in ~2.
  return jax.random.key(seed, impl='unsafe_rbg')


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _shapes(model, shape, dtype=jnp.float32):
  """(variables, outputs) as ShapeDtypeStructs: nothing the size of a ResNet-50 is allocated."""
  x = jax.ShapeDtypeStruct(shape, dtype)
  variables = jax.eval_shape(lambda x: model.init(key(), x, train=False), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return variables, out


# Reference numbers are torchvision's sum(p.numel() for p in model.parameters()); 23,508,032 is
# resnet50 minus its 2048 * 1000 + 1000 fc.
@pytest.mark.parametrize(
  'depth, num_classes, channels, expected',
  [
    (50, None, 3, 23_508_032),
    (50, 1000, 3, 25_557_032),
    (50, None, 64, 23_508_032 + 64 * 64 * 49 - 3 * 64 * 49),
    (18, 1000, 3, 11_689_512),
    (34, 1000, 3, 21_797_672),
    (101, 1000, 3, 44_549_160),
  ],
)
def test_param_count_matches_torchvision(depth, num_classes, channels, expected):
  variables, _ = _shapes(ResNet(depth=depth, num_classes=num_classes), (1, 224, 224, channels))
  assert _count(variables['params']) == expected
  # Running statistics are state, not parameters, and are kept apart.
  assert set(variables) == {'params', 'batch_stats'}


def test_ct_conv1_growth_is_exact():
  rgb, _ = _shapes(ResNet(depth=50), (1, 64, 64, 3))
  ct, _ = _shapes(ResNet(depth=50), (1, 64, 64, 64))
  assert _count(ct['params']) - _count(rgb['params']) == 191_296


@pytest.mark.parametrize('size', [64, 224])
@pytest.mark.parametrize('depth, expansion', [(18, 1), (50, 4)])
def test_stage_shapes_and_strides(size, depth, expansion):
  _, out = _shapes(ResNet(depth=depth, num_classes=7), (2, size, size, 1))
  for level, stride in zip(range(2, 6), (4, 8, 16, 32)):
    channels = 64 * 2 ** (level - 2) * expansion
    assert out[f'c{level}'].shape == (2, size // stride, size // stride, channels)
  assert out['pooled'].shape == (2, 512 * expansion)
  assert out['logits'].shape == (2, 7)
  assert ResNet(depth=depth).num_features == 512 * expansion


def test_width_scales_every_stage():
  _, out = _shapes(ResNet(depth=50, width=16), (1, 64, 64, 3))
  assert [out[f'c{i}'].shape[-1] for i in range(2, 6)] == [64, 128, 256, 512]
  assert 'logits' not in out


def test_bfloat16_compute_float32_params():
  variables, out = _shapes(ResNet(depth=50, dtype=jnp.bfloat16, num_classes=10), (2, 64, 64, 3))
  assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  for level in range(2, 6):
    assert out[f'c{level}'].dtype == jnp.bfloat16
  assert out['pooled'].dtype == jnp.float32
  assert out['logits'].dtype == jnp.float32


def test_bad_depth_and_channel_check():
  with pytest.raises(ValueError, match='depth'):
    _shapes(ResNet(depth=20), (1, 32, 32, 3))
  with pytest.raises(ValueError, match='channels'):
    _shapes(ResNet(depth=18, in_channels=64), (1, 32, 32, 3))


@pytest.fixture(scope='module')
def tiny():
  model = ResNet(depth=18, width=8, num_classes=5)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * 2.0 + 1.0
  variables = jax.jit(lambda x: model.init(key(), x, train=False))(x)
  return model, variables, x


def test_conv_init_is_kaiming_fan_out(tiny):
  _, variables, _ = tiny
  kernel = variables['params']['layer3_0']['conv2']['kernel']  # 3x3, 32 -> 32
  expected_std = np.sqrt(2.0 / (3 * 3 * kernel.shape[-1]))
  assert np.std(kernel) == pytest.approx(expected_std, rel=0.05)
  # No bias on any conv (BN follows each one), torchvision's layout.
  assert set(variables['params']['conv1']) == {'kernel'}
  assert set(variables['params']['layer1_0']['conv1']) == {'kernel'}


def test_batchnorm_train_updates_and_eval_uses_stats(tiny):
  model, variables, x = tiny
  train_fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  eval_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  out, updates = train_fn(variables, x)
  old = variables['batch_stats']['bn1']
  new = updates['batch_stats']['bn1']
  # torch momentum 0.1 == flax 0.9: one step moves the mean 10% of the way to the batch mean.
  conv1 = jax.lax.conv_general_dilated(
    x,
    variables['params']['conv1']['kernel'],
    (2, 2),
    ((3, 3), (3, 3)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  np.testing.assert_allclose(
    new['mean'], 0.9 * old['mean'] + 0.1 * conv1.mean((0, 1, 2)), rtol=1e-4, atol=1e-5
  )
  assert not np.allclose(new['var'], old['var'])
  # Eval output depends on the stored statistics, not on the batch.
  fresh = eval_fn(variables, x)['logits']
  updated = eval_fn({**variables, **updates}, x)['logits']
  assert not np.allclose(fresh, updated)
  # Same shapes throughout, so nothing recompiles: change the last two examples only.
  other = x.at[2:].set(x[2:] * 3.0 - 2.0)
  np.testing.assert_allclose(
    eval_fn(variables, other)['logits'][:2], fresh[:2], rtol=1e-5, atol=1e-5
  )
  # Train mode uses batch statistics: an example's output depends on its batch mates.
  mates, _ = train_fn(variables, other)
  assert not np.allclose(mates['logits'][:2], out['logits'][:2])


def test_zero_init_residual_zeroes_last_bn():
  model = ResNet(depth=18, width=8, zero_init_residual=True)
  params = jax.jit(lambda x: model.init(key(), x, train=False))(jnp.zeros((1, 32, 32, 3)))['params']
  assert np.all(params['layer2_1']['bn2']['scale'] == 0)
  assert np.all(params['layer2_1']['bn1']['scale'] == 1)
  assert np.all(params['bn1']['scale'] == 1)


_SHARDED_SCRIPT = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
from aacp_jax.models.resnet import ResNet
assert len(jax.devices()) == 2, jax.devices()
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
# float64: summation order across devices then moves results by ~1e-15, so the check can be 1e-10
# (in float32 that residue is ~1e-6 and a tolerance would be tuned to it).
model = ResNet(depth=18, width=4, dtype=jnp.float64)
# The two halves of the batch have very different statistics: per-device BN would show it.
noise = jax.random.normal(jax.random.key(1), (2, 16, 16, 3), jnp.float64)
x = jnp.concatenate([jnp.zeros((2, 16, 16, 3), jnp.float64), 5 + noise])
v = jax.jit(lambda x: model.init(jax.random.key(0, impl="unsafe_rbg"), x, train=False))(x)
assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(v)), jax.tree.map(lambda a: a.dtype, v)
fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
(out_s, st_s), (out_p, st_p) = fn(v, jax.device_put(x, batch)), fn(v, x)
# Per-device statistics would differ by O(1); every running statistic is compared.
np.testing.assert_allclose(out_s["pooled"], out_p["pooled"], rtol=1e-10, atol=1e-12)
for a, b in zip(jax.tree.leaves(st_s), jax.tree.leaves(st_p)):
  np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
print("OK")
"""


def test_global_batch_statistics_under_sharding():
  # BatchNorm statistics must be over the global batch when the batch is sharded over devices.
  # Two CPU devices need XLA_FLAGS before jax starts, hence a subprocess.
  env = {
    **os.environ,
    'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
    'JAX_PLATFORMS': 'cpu',
  }
  proc = subprocess.run(
    [sys.executable, '-c', _SHARDED_SCRIPT],
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-2000:]
