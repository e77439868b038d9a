"""MoCo-v2 (`aacp_jax/methods/moco_v2.py`): the queue loss, FIFO queue and EMA against NumPy,
equal query and key encoders, the config checks, 4 devices equal 1 in float64, and a resume
that continues the queue exactly."""

import functools
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from aacp_jax import methods
from aacp_jax.methods import moco_v2
from aacp_jax.models import inputs
from aacp_jax.train import loop
from aacp_jax.train import pretrain as pretrain_experiment
from aacp_jax.train import state as state_lib
from configs import pretrain
from tests.devices import run_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4
RTOL = 1e-9


def tiny_config(**overrides):
  """One modality, ResNet-18 width 4, 32 px, batch 8, a queue of two batches."""
  c = pretrain.get_config('demo,moco_v2')
  c.modalities = ('xray',)
  c.data.image_size = 32
  c.data.shares = ml_collections.ConfigDict({'xray': 1.0})
  c.data.phantoms = ml_collections.ConfigDict({'train': 16})
  c.batch_size = 8
  c.model.width = 4
  c.moco.queue_size = 16
  c.moco.bn_groups = 2
  c.moco.mlp_hidden = 16
  c.moco.dim = 8
  c.total_steps = 6
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  for k, v in overrides.items():
    *parents, leaf = k.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_queue_loss_matches_numpy():
  rng = np.random.default_rng(0)
  q, k, queue = unit(rng, 6, 5), unit(rng, 6, 5), unit(rng, 12, 5)
  tau = 0.2
  loss, acc = moco_v2.moco_info_nce(jnp.float32(q), jnp.float32(k), jnp.float32(queue), tau)
  pos = np.exp(np.sum(q * k, 1) / tau)
  neg = np.exp(q @ queue.T / tau).sum(1)
  want = np.mean(-np.log(pos / (pos + neg)))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  best_neg = (q @ queue.T).max(1)
  np.testing.assert_allclose(acc, np.mean(np.sum(q * k, 1) > best_neg), rtol=1e-6)
  # Asymmetric: swapping query and key changes the loss (the queue is only the keys').
  swapped, _ = moco_v2.moco_info_nce(jnp.float32(k), jnp.float32(q), jnp.float32(queue), tau)
  assert abs(float(swapped) - float(loss)) > 1e-4


def test_enqueue_is_fifo_and_wraps():
  size, b, d = 12, 4, 3
  queue, ptr = jnp.full((size, d), -1.0), jnp.zeros((), jnp.int32)
  ref, ref_ptr, age = np.full((size, d), -1.0), 0, np.full(size, -1)
  for step in range(7):
    keys = np.full((b, d), float(step)) + np.arange(b)[:, None] / 10
    # The oldest entries are replaced first: the slots of the step 3 steps back (K / B = 3).
    oldest = np.flatnonzero(age == age.min())[:b]
    queue, ptr = moco_v2.enqueue(queue, ptr, jnp.asarray(keys, jnp.float32))
    ref[ref_ptr : ref_ptr + b] = keys
    np.testing.assert_array_equal(np.arange(ref_ptr, ref_ptr + b), oldest)
    age[ref_ptr : ref_ptr + b] = step
    ref_ptr = (ref_ptr + b) % size
    np.testing.assert_allclose(np.asarray(queue), ref, rtol=1e-7)
    assert int(ptr) == ref_ptr
  assert int(ptr) == (7 * b) % size == 4  # wrapped twice


def test_ema_after_update_matches_numpy():
  rng = np.random.default_rng(1)
  params = {'a': rng.normal(size=(3, 2)).astype(np.float32), 'b': {'c': np.float32([1.5, -2])}}
  key = jax.tree.map(lambda x: (x + rng.normal(size=x.shape)).astype(np.float32), params)
  m = np.float32(0.99)
  state = state_lib.TrainState(
    step=jnp.int32(1),
    params=params,
    batch_stats={},
    opt_state=(),
    extra={'key_params': key, 'momentum': jnp.float32(m), 'queue': {}},
    nonfinite=jnp.int32(0),
    nonfinite_last=jnp.int32(0),
  )
  new = moco_v2.after_update(state)
  for got, k, q in zip(
    jax.tree.leaves(new.extra['key_params']), jax.tree.leaves(key), jax.tree.leaves(params)
  ):
    np.testing.assert_allclose(got, m * k + (1 - m) * q, rtol=1e-6)
  # The query parameters are not touched.
  np.testing.assert_array_equal(new.params['a'], params['a'])


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_query_and_key_encoders_have_equal_parameter_counts():
  config = pretrain.get_config('moco_v2')  # the paper's sizes: ResNet-50, 2048 -> 128 heads
  method = methods.get('moco_v2')
  model = method.build_model(config)

  def init():
    variables = model.init(
      jax.random.key(0), inputs.dummy_inputs(config.modalities, 64), train=False
    )
    return variables, method.init_extra(config, variables)

  variables, extra = jax.eval_shape(init)
  params, key_params = variables['params'], extra['key_params']
  assert jax.tree.structure(params) == jax.tree.structure(key_params)
  for m in config.modalities:
    assert count(params[f'encoder_{m}']) == count(key_params[f'encoder_{m}']) > 23_000_000
    assert params[f'head_{m}']['dense0']['kernel'].shape == (2048, 2048)
    assert params[f'head_{m}']['dense1']['kernel'].shape == (2048, 128)
  assert count(variables['batch_stats']) == count(extra['key_batch_stats'])
  assert extra['queue']['ct'].shape == (65536, 128) and extra['momentum'].shape == ()


@pytest.mark.parametrize(
  'key,value,match',
  [
    ('moco.queue_size', 1000, r'^config.moco.queue_size=1000: must be a multiple .*ct 32'),
    ('moco.bn_groups', 16, r'^config.moco.bn_groups=16: must split'),
    ('moco.momentum', 1.5, r'^config.moco.momentum=1.5: must be'),
    ('moco.temperature', 0.0, r'^config.moco.temperature=0.0: must be'),
    ('moco.augment', 'simclr', r"^config.moco.augment='simclr': expected one of"),
    ('moco.crop_area', (0.9, 0.2), r'^config.moco.crop_area=\(0.9, 0.2\): expected'),
  ],
)
def test_bad_moco_values_fail_in_one_line_naming_the_key(key, value, match):
  config = pretrain.get_config('demo,moco_v2')
  *_, leaf = key.split('.')
  config.moco[leaf] = value
  with pytest.raises(ValueError, match=match) as e:
    pretrain_experiment.check_config(config)
  assert '\n' not in str(e.value)


def test_augmentation_is_moco_v2s():
  config = pretrain.get_config('demo,method=moco_v2')
  aug = moco_v2.augment_config(config)
  assert not aug.anatomy_aware and tuple(aug.simclr.area) == (0.2, 1.0)
  assert aug.simclr.flip_p == 0.5 and aug.brightness.p == aug.contrast.p == 0.8
  assert aug.noise.p == 0 and aug.cutout.p == 0
  config.moco.augment = 'config'
  assert moco_v2.augment_config(config) is config.augment
  # Blur: a normalised kernel (a constant image stays constant), identity when it does not fire.
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 32, 32, 1)), jnp.float32)
  key = jax.random.key(0)
  np.testing.assert_allclose(moco_v2.blur(key, jnp.ones_like(x), 1.0, (1.0, 2.0), 32), 1, 1e-6)
  np.testing.assert_array_equal(moco_v2.blur(key, x, 0.0, (1.0, 2.0), 32), x)
  blurred = moco_v2.blur(key, x, 1.0, (1.0, 2.0), 32)
  assert float(jnp.std(blurred)) < 0.8 * float(jnp.std(x))


# --- 4 devices equal 1, float64, in a subprocess (x64 must not leak into other tests) ---------


def run_steps(devices, config, host_batches):
  from aacp_jax import sharding
  from aacp_jax.methods.base import RunInfo
  from aacp_jax.train.step import train_step

  mesh = sharding.make_mesh(devices)
  method = methods.get(config.method)
  model = method.build_model(config)
  tx, schedule = state_lib.make_optimizer(config.optim, 100)
  state, shardings = state_lib.create_state(
    model,
    tx,
    mesh,
    inputs.dummy_inputs(config.modalities, config.data.image_size),
    config.seed,
    lambda v: method.init_extra(config, v),
  )
  run = RunInfo(steps_per_epoch=1, total_steps=len(host_batches))
  step = jax.jit(
    functools.partial(
      train_step,
      loss_fn=method.make_loss(config, model, run),
      tx=tx,
      schedule=schedule,
      seed=config.seed,
      schedules=method.make_schedules(config, run),
      after_update=method.after_update,
    ),
    in_shardings=(shardings, sharding.batch_sharded(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
  )
  states, all_metrics = [jax.device_get(state)], []
  for host in host_batches:
    state, metrics = step(state, jax.device_put(host, sharding.batch_sharded(mesh)))
    states.append(jax.device_get(state))
    all_metrics.append(jax.device_get(metrics))
  return states, all_metrics


def check_sharded():
  """Runs in the subprocess: two steps (the second reads keys the first enqueued) on 1 and 4
  devices in float64, every leaf of the state (extra included) and every metric compared."""
  jax.config.update('jax_enable_x64', True)
  from tests.test_step_sharded import phantom_batch

  assert jax.device_count() == DEVICES
  config = tiny_config(**{'model.dtype': 'float64'})
  host = phantom_batch(config, {'xray': 16})
  batches = [jax.tree.map(lambda x: x[:8], host), jax.tree.map(lambda x: x[8:], host)]
  states1, metrics1 = run_steps(jax.devices()[:1], config, batches)
  states_n, metrics_n = run_steps(jax.devices(), config, batches)
  s0, s1 = states1[0], states1[-1]
  assert all(x.dtype == np.float64 for x in jax.tree.leaves(s1.params))
  assert all(np.isfinite(m['loss']) and m['loss'] > 0 for m in metrics1)
  # The documented loss: one modality, share 1.
  np.testing.assert_allclose(metrics1[0]['loss'], metrics1[0]['moco_xray'], rtol=1e-12)
  # FIFO across the two steps: pointer 8 then 0; step 2 overwrote slots 8..15 only.
  assert int(states1[1].extra['queue_ptr']['xray']) == 8 and int(s1.extra['queue_ptr']['xray']) == 0
  q0, q1, q2 = (s.extra['queue']['xray'] for s in states1)
  np.testing.assert_array_equal(q1[8:], q0[8:])
  np.testing.assert_array_equal(q2[:8], q1[:8])
  assert np.abs(q1[:8] - q0[:8]).max() > 1e-3 and np.abs(q2[8:] - q1[8:]).max() > 1e-3
  np.testing.assert_allclose(np.linalg.norm(q2, axis=1), 1.0, rtol=1e-12)
  # EMA against NumPy: key_t = m key_{t-1} + (1 - m) params_t, the key starting as the query.
  m = float(config.moco.momentum)
  for k0, p0 in zip(jax.tree.leaves(s0.extra['key_params']), jax.tree.leaves(s0.params)):
    np.testing.assert_array_equal(k0, p0)
  want = jax.tree.leaves(s0.params)
  for s in states1[1:]:
    want = [m * k + (1 - m) * p for k, p in zip(want, jax.tree.leaves(s.params))]
  for got, w in zip(jax.tree.leaves(s1.extra['key_params']), want):
    np.testing.assert_allclose(got, w, rtol=1e-12, atol=1e-15)
  bad = []

  def compare(name, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff, scale = np.linalg.norm(a - b), np.linalg.norm(a)
    if not diff <= RTOL * scale + 1e-15:
      bad.append(f'{name}: |a - b| = {diff:.3g}, |a| = {scale:.3g}')

  for i, (ma, mb) in enumerate(zip(metrics1, metrics_n)):
    for k in ma:
      compare(f'step {i + 1} metrics[{k!r}]', ma[k], mb[k])
  for part in ('params', 'batch_stats', 'opt_state', 'extra'):
    for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(getattr(s1, part)),
      jax.tree.leaves(getattr(states_n[-1], part)),
    ):
      compare(f'{part}{jax.tree_util.keystr(path)}', a, b)
  assert not bad, '\n'.join(bad[:20]) + f'\n({len(bad)} leaves differ beyond {RTOL})'
  assert metrics1[-1]['grad_norm'] > 1e-3
  print(f'OK: {len(jax.tree.leaves(s1))} state leaves within {RTOL}')


def test_four_devices_equal_one_in_float64():
  assert 'OK:' in run_check('from tests.test_moco import check_sharded; check_sharded()', DEVICES)


# --- resume: the queue and its pointer are in the checkpoint ----------------------------------


def test_stop_and_resume_continues_the_queue_exactly(tmp_path, monkeypatch):
  config = tiny_config()
  ref = loop.train(config, str(tmp_path / 'ref'), pretrain_experiment.make_task)
  assert int(ref.state.step) == 6

  # SIGTERM while the third batch is read: the loop finishes step 3, checkpoints and stops.
  real_next = loop.inputs.next_batch
  calls = []

  def next_batch(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_next(*args, **kwargs)

  run_dir = str(tmp_path / 'run')
  with monkeypatch.context() as patch:
    patch.setattr(loop.inputs, 'next_batch', next_batch)
    first = loop.train(config, run_dir, pretrain_experiment.make_task)
  assert first.stopped_at == 3
  assert int(jax.device_get(first.state.extra['queue_ptr']['xray'])) == 3 * 8 % 16
  resumed = loop.train(config, run_dir, pretrain_experiment.make_task)
  assert resumed.resumed_from == 3 and int(resumed.state.step) == 6
  got, want = jax.device_get(resumed.state), jax.device_get(ref.state)
  assert int(got.extra['queue_ptr']['xray']) == int(want.extra['queue_ptr']['xray']) == 0
  for part in ('params', 'batch_stats', 'extra'):
    for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(getattr(want, part)),
      jax.tree.leaves(getattr(got, part)),
    ):
      np.testing.assert_allclose(
        b, a, rtol=1e-5, atol=1e-6, err_msg=f'{part}{jax.tree_util.keystr(path)}'
      )
  # Every slot now holds a key of this run (48 keys through 16 slots), not its random start.
  init_queue = moco_v2.init_extra(config, {'params': {}})['queue']['xray']
  changed = np.abs(np.asarray(got.extra['queue']['xray']) - np.asarray(init_queue)).max(axis=1)
  assert changed.min() > 1e-3
