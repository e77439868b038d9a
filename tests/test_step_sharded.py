"""The train step of the full model over 8 fake CPU devices equals the same step on 1 device.

Under jit with the batch sharded over 'data', BatchNorm statistics, InfoNCE negatives (per level
too), triplet mining and the cross-modal candidates span the global batch; any per-device
computation would make these numbers differ.
"""
import functools

import jax
import numpy as np

from aacp_jax import sharding
from aacp_jax.data import phantoms, pipeline
from aacp_jax.models import encoders
from aacp_jax.train import state as state_lib
from aacp_jax.train.pretrain import create_state
from aacp_jax.train.step import train_step
from configs import pretrain


def tiny_config():
  c = pretrain.get_config('demo')  # the full model: every loss term on
  # Two modalities (the fewest the cross-modal term needs) keep the two compilations short; the
  # three-modality step runs end to end in test_train_e2e.
  c.modalities = ('mri', 'xray')
  # 64 pixels: at 32, c5 is 1x1 and ROI attention pooling is the identity (zero gradient).
  c.data.image_size = 64
  c.batch_size = 32
  c.model.width = 8
  c.model.projector = (32, 32, 16)
  return c


def run_on(devices, config, host_batch):
  mesh = sharding.make_mesh(devices)
  model = encoders.build_model(config.model, config.modalities)
  tx, schedule = state_lib.make_optimizer(config.optim, 100)
  state, shardings = create_state(config, model, tx, mesh, config.data.image_size)
  batch = jax.device_put(host_batch, sharding.batch_sharded(mesh))
  step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                                   config=config),
                 in_shardings=(shardings, sharding.batch_sharded(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  return jax.device_get(step(state, batch))


def phantom_batch(config, batches):
  """A host batch of real phantom records (realistic HU and intensity ranges)."""
  out = {}
  for m, b in batches.items():
    records = [pipeline._training_arrays(
        phantoms.make_record(m, i, seed=0, image_size=config.data.image_size, split='train'),
        config.data.image_size) for i in range(b)]
    out[m] = {k: np.stack([r[k] for r in records]) for k in pipeline.TRAIN_KEYS}
  return out


def assert_close(a, b, path, rtol=1e-5):
  """Relative in norm: |a - b| <= rtol |a| (float32 sums in another order differ this much)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.linalg.norm(a), 1e-6)
  assert np.linalg.norm(a - b) <= rtol * scale, (path, np.linalg.norm(a - b), scale)


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_eight_devices_equal_one():
  assert jax.device_count() == 8
  config = tiny_config()
  config.loss.gamma = 0.5  # Exercise the structure-aware weights across shards too.
  batches = sharding.per_modality_batch(config.batch_size, config.data.shares, config.modalities,
                                        8, 1)
  host = phantom_batch(config, batches)
  (state1, metrics1) = run_on(jax.devices()[:1], config, host)
  (state8, metrics8) = run_on(jax.devices(), config, host)
  assert np.isfinite(metrics1['loss']) and metrics1['loss'] > 0
  # Every term of the full loss is in the comparison, the cross-modal one at full weight.
  for term in ('contrast', 'multiscale', 'multiscale_p2', 'spatial', 'triplet'):
    assert all(f'{term}_{m}' in metrics1 for m in config.modalities), term
  assert metrics1['cross_weight'] == np.float32(0.3) and metrics1['cross'] > 0
  # The loss is the documented sum of the logged terms (equal batch shares of 1/2).
  lc, m1 = config.loss, metrics1
  want = 0.3 * m1['cross']
  for m in config.modalities:
    levels = [m1[f'multiscale_{p}_{m}'] for p in ('p2', 'p3', 'p4', 'p5')]
    np.testing.assert_allclose(m1[f'multiscale_{m}'], np.dot(lc.multiscale_weights, levels),
                               rtol=1e-5)
    want += 0.5 * (m1[f'contrast_{m}'] + m1[f'multiscale_{m}'] + lc.spatial_weight
                   * m1[f'spatial_{m}'] + lc.triplet_weight * m1[f'triplet_{m}'])
  np.testing.assert_allclose(m1['loss'], want, rtol=1e-5)
  for k in metrics1:
    assert_close(metrics1[k], metrics8[k], k)
  # BatchNorm running statistics, and Adam's first moment: after one step mu = (1 - b1) * grad,
  # so equal moments mean equal gradients.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state1.batch_stats),
                          jax.tree.leaves(state8.batch_stats)):
    assert_close(a, b, jax.tree_util.keystr(path))
  mu1, mu8 = state1.opt_state[-1][0].mu, state8.opt_state[-1][0].mu
  # Gradients pass through 18 BatchNorm layers whose sums XLA orders differently per device
  # count (measured here: 1.0e-5 relative for the whole gradient at width 8, 1.4e-5 at width 4),
  # so the whole gradient is held to 2e-5 and single small leaves (BN scales, sums with
  # cancellation) to 1e-4. Loss, metrics and BN statistics are held to 1e-5 above.
  assert_close(flat(mu1), flat(mu8), 'gradient', rtol=2e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(mu1), jax.tree.leaves(mu8)):
    assert_close(a, b, jax.tree_util.keystr(path), rtol=1e-4)
  assert metrics1['grad_norm'] > 1e-3  # Non-trivial gradients, or the check proves nothing.
  # Every optional module is trained by the loss (a zero gradient would make it decoration).
  for name in ('fpn_mri', 'levels_xray', 'roi_mri', 'landmarks_xray'):
    assert np.abs(flat(mu1[name])).max() > 0, name
