"""The train step of the full model over 4 fake CPU devices equals the same step on 1 device,
in float64, to 1e-9 for every leaf.

Under jit with the batch sharded over 'data', BatchNorm statistics, InfoNCE negatives (per level
too), triplet mining and the cross-modal candidates span the global batch; any per-device
computation would make these numbers differ by far more than float64's summation-order residue
(~1e-12). In float32 that residue is ~1e-5 and a tolerance would have to be tuned to it, so the
step runs in float64 (`jax_enable_x64`, model.dtype 'float64'), in a subprocess so that x64 does
not leak into the other tests.
"""

import functools
import os

from tests.devices import run_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-9
# Four, not eight: two samples per modality per device already split every global-batch
# statistic across devices, and XLA:CPU's SPMD compile grows with the device count (the tiny
# float32 step: 74 s on 1 device, 131 s on 8).
DEVICES = 4


def tiny_config():
  from configs import pretrain

  c = pretrain.get_config('demo')  # the full model: every loss term on, all three modalities
  # 64 pixels: at 32, c5 is 1x1 and ROI attention pooling is the identity (zero gradient).
  c.data.image_size = 64
  c.batch_size = 24  # 8 per modality: 2 per device, so every statistic spans devices
  c.data.shares = {'ct': 1 / 3, 'mri': 1 / 3, 'xray': 1 / 3}
  c.model.width = 4
  c.model.projector = (32, 32, 16)
  c.model.dtype = 'float64'
  c.loss.gamma = 0.5  # exercise the structure-aware weights across shards too
  # The cross-modal term at full weight from the first step.
  c.loss.cross_start_epoch = c.loss.cross_end_epoch = 0.0
  return c


def phantom_batch(config, batches):
  """A host batch of real phantom records (realistic HU and intensity ranges)."""
  import numpy as np

  from aacp_jax.data import phantoms, pipeline

  out = {}
  for m, b in batches.items():
    records = [
      pipeline._training_arrays(  # pylint: disable=protected-access
        phantoms.make_record(m, i, seed=0, image_size=config.data.image_size, split='train'),
        config.data.image_size,
      )
      for i in range(b)
    ]
    out[m] = {k: np.stack([r[k] for r in records]) for k in pipeline.TRAIN_KEYS}
  return out


def run_on(devices, config, host_batch):
  import jax

  from aacp_jax import methods, sharding
  from aacp_jax.methods.base import RunInfo
  from aacp_jax.models import inputs
  from aacp_jax.train import state as state_lib
  from aacp_jax.train.step import train_step

  mesh = sharding.make_mesh(devices)
  method = methods.get(config.method)
  model = method.build_model(config)
  tx, schedule = state_lib.make_optimizer(config.optim, 100)
  state, shardings = state_lib.create_state(
    model, tx, mesh, inputs.dummy_inputs(config.modalities, config.data.image_size), config.seed
  )
  run = RunInfo(steps_per_epoch=1, total_steps=1)
  batch = jax.device_put(host_batch, sharding.batch_sharded(mesh))
  step = jax.jit(
    functools.partial(
      train_step,
      loss_fn=method.make_loss(config, model, run),
      tx=tx,
      schedule=schedule,
      seed=config.seed,
      schedules=method.make_schedules(config, run),
    ),
    in_shardings=(shardings, sharding.batch_sharded(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
  )
  return jax.device_get(step(state, batch))


def check():
  """Runs in the subprocess: x64 on, one step on 1 and on 4 devices, every leaf compared."""
  import jax

  jax.config.update('jax_enable_x64', True)
  import numpy as np

  from aacp_jax import sharding

  assert jax.device_count() == DEVICES
  config = tiny_config()
  batches = sharding.per_modality_batch(
    config.batch_size, config.data.shares, config.modalities, DEVICES, 1
  )
  host = phantom_batch(config, batches)
  state1, metrics1 = run_on(jax.devices()[:1], config, host)
  state_n, metrics_n = run_on(jax.devices(), config, host)
  leaves = jax.tree.leaves(state1.params)
  assert all(x.dtype == np.float64 for x in leaves), {x.dtype for x in leaves}
  assert np.isfinite(metrics1['loss']) and metrics1['loss'] > 0
  # Every term of the full loss is in the comparison, the cross-modal one at full weight.
  for term in ('contrast', 'multiscale', 'multiscale_p2', 'spatial', 'triplet'):
    assert all(f'{term}_{m}' in metrics1 for m in config.modalities), term
  assert metrics1['cross_weight'] == 0.3 and metrics1['cross'] > 0
  # The loss is the documented sum of the logged terms, weighted by the batch shares.
  lc, m1 = config.loss, metrics1
  shares = {m: b / config.batch_size for m, b in batches.items()}
  want = 0.3 * m1['cross']  # (every share is 1/3)
  for m in config.modalities:
    levels = [m1[f'multiscale_{p}_{m}'] for p in ('p2', 'p3', 'p4', 'p5')]
    np.testing.assert_allclose(
      m1[f'multiscale_{m}'], np.dot(lc.multiscale_weights, levels), rtol=1e-12
    )
    want += shares[m] * (
      m1[f'contrast_{m}']
      + m1[f'multiscale_{m}']
      + lc.spatial_weight * m1[f'spatial_{m}']
      + lc.triplet_weight * m1[f'triplet_{m}']
    )
  np.testing.assert_allclose(m1['loss'], want, rtol=1e-12)

  bad = []

  def norm(tree):
    return np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)))

  def compare(name, a, b, whole=0.0):
    """|a - b| <= RTOL |a| + 1e-15 |whole|: relative per leaf, with a floor at float64 round-off
    of the whole tree for leaves whose exact value is 0 (the landmark heatmaps' biases: the
    soft-argmax is shift-invariant, so their gradient is pure round-off, ~1e-17)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff, scale = np.linalg.norm(a - b), np.linalg.norm(a)
    if not diff <= RTOL * scale + 1e-15 * whole:
      bad.append(f'{name}: |a - b| = {diff:.3g}, |a| = {scale:.3g}')

  for k in metrics1:
    compare(f'metrics[{k!r}]', metrics1[k], metrics_n[k])
  # Parameters after the update, BatchNorm running statistics and both Adam moments: every leaf.
  for part in ('params', 'batch_stats', 'opt_state'):
    whole = norm(getattr(state1, part))
    for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(getattr(state1, part)),
      jax.tree.leaves(getattr(state_n, part)),
    ):
      compare(f'{part}{jax.tree_util.keystr(path)}', a, b, whole)
  assert not bad, '\n'.join(bad[:20]) + f'\n({len(bad)} leaves differ beyond {RTOL})'
  mu1 = state1.opt_state[-1][0].mu
  assert metrics1['grad_norm'] > 1e-3  # Non-trivial gradients, or the check proves nothing.
  # Every optional module is trained by the loss (a zero gradient would make it decoration).
  for name in ('fpn_ct', 'levels_xray', 'roi_mri', 'landmarks_ct', 'encoder_xray'):
    assert max(np.abs(x).max() for x in jax.tree.leaves(mu1[name])) > 0, name
  print(f'OK: {len(jax.tree.leaves(state1.params))} parameter leaves within {RTOL}')


def test_four_devices_equal_one_in_float64():
  assert 'OK:' in run_check('from tests.test_step_sharded import check; check()', DEVICES)
