"""The shared loop with a tiny model: config.json, the non-finite policy on steps between log
steps, resume, and parameters-only restore of the workdir."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from aacp_jax import checkpoint as ckpt_lib
from aacp_jax import workdir as workdir_lib
from aacp_jax.metrics import read_jsonl
from aacp_jax.models import inputs
from aacp_jax.train import loop
from aacp_jax.train import state as state_lib
from configs import pretrain


class Tiny(nn.Module):
  """Mean-pooled image -> one Dense with BatchNorm: parameters and statistics, compiles fast."""

  @nn.compact
  def __call__(self, images, train):
    x = jnp.mean(images['xray'].astype(jnp.float32), axis=(1, 2))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(2)(x)


def saved_variables(workdir):
  """(params and batch_stats, step) of the newest good checkpoint of a `Tiny` run."""
  ckpt = ckpt_lib.Checkpointer(
    os.path.join(workdir, 'checkpoints'), every_steps=1, keep=1, async_save=False
  )
  try:
    return ckpt.restore_variables(
      jax.eval_shape(
        lambda: Tiny().init(jax.random.key(0), inputs.dummy_inputs(('xray',), 32), train=False)
      )
    )
  finally:
    ckpt.close()


def tiny_config(**overrides):
  c = pretrain.get_config('demo')
  c.modalities = ('xray',)
  c.data.image_size = 32
  c.data.shares = ml_collections.ConfigDict({'xray': 1.0})
  c.data.phantoms = ml_collections.ConfigDict({'train': 16})
  c.batch_size = 8
  c.total_steps = 12
  c.log_every_steps = 5
  c.checkpoint_every_steps = 4
  for k, v in overrides.items():
    c[k] = v
  return c


def make_task_with_nan_at(bad_step):
  """A task whose loss is NaN at 0-based step `bad_step` (None: never)."""

  def make_task(config, data):
    model = Tiny()
    tx, schedule = state_lib.make_optimizer(config.optim, config.total_steps)

    def loss_fn(params, batch_stats, extra, batch, key, scheduled):
      del key
      out, new = model.apply(
        {'params': params, 'batch_stats': batch_stats},
        {'xray': batch['xray']['image']},
        train=True,
        mutable=['batch_stats'],
      )
      value = jnp.mean(out**2)
      if bad_step is not None:
        value = jnp.where(scheduled['step'] == bad_step, jnp.nan, value)
      return value, (new['batch_stats'], extra, {'loss': value})

    return loop.Task(
      model=model,
      dummy_inputs=inputs.dummy_inputs(('xray',), 32),
      tx=tx,
      schedule=schedule,
      loss_fn=loss_fn,
      total_steps=config.total_steps,
      schedules=lambda step: {'step': step},
    )

  return make_task


def test_nonfinite_step_between_log_steps_stops_the_run_naming_it(tmp_path):
  config = tiny_config()
  # Step 7 (0-based 6) is not a log step (5, 10): the counter in the state still sees it.
  with pytest.raises(
    FloatingPointError,
    match=r'^steps 6\.\.10: 1 step\(s\) skipped .*'
    r'not finite \(the last at step 7\); the state without them is saved in',
  ):
    loop.train(config, str(tmp_path), make_task_with_nan_at(6))
  rows = {r['step']: r for r in read_jsonl(os.path.join(tmp_path, 'metrics.jsonl'))}
  assert sorted(rows) == [5, 10] and rows[10]['nonfinite_steps'] == 1
  assert rows[10]['finite'] == 1.0  # step 10 itself was fine: only the counter tells
  assert os.path.isdir(os.path.join(tmp_path, 'checkpoints', '10'))
  # The saved state holds no update from the skipped step: all its parameters are finite.
  variables, step = saved_variables(str(tmp_path))
  assert step == 10
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_a_finite_run_writes_its_config_resumes_and_restores(tmp_path):
  config = tiny_config(total_steps=8)
  trained = loop.train(config, str(tmp_path), make_task_with_nan_at(None))
  assert trained.stopped_at is None and int(trained.state.step) == 8
  assert int(trained.state.nonfinite) == 0
  saved = workdir_lib.read_config(str(tmp_path))
  assert saved.data.image_size == 32 and list(saved.modalities) == ['xray']
  assert json.load(open(os.path.join(tmp_path, 'config.json')))['total_steps'] == 8
  # The same command again finds the run finished: it resumes at 8 and trains nothing.
  again = loop.train(config, str(tmp_path), make_task_with_nan_at(None))
  assert int(again.state.step) == 8
  np.testing.assert_array_equal(
    jax.device_get(again.state.params['Dense_0']['kernel']),
    jax.device_get(trained.state.params['Dense_0']['kernel']),
  )
  rows = read_jsonl(os.path.join(tmp_path, 'metrics.jsonl'))
  assert [r['step'] for r in rows] == [5, 8]


def test_read_config_names_a_missing_or_bad_file(tmp_path):
  with pytest.raises(ValueError, match=r'no config.json'):
    workdir_lib.read_config(str(tmp_path))
  (tmp_path / 'config.json').write_text('{not json')
  with pytest.raises(ValueError, match=r'config.json: unreadable'):
    workdir_lib.read_config(str(tmp_path))
