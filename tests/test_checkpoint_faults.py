"""Damaged checkpoints, non-finite updates and metric rows after a resume, on toy states (no
model is compiled): checksums written at save and verified at restore, the fallback to the newest
step that verifies (named in one line), rejected steps moved aside, pruning only behind a
verified step, the finite-update rule, and metrics.jsonl / TensorBoard after a resume."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aacp_jax import checkpoint as ckpt_lib
from aacp_jax.metrics import MetricWriter, read_jsonl, truncate_jsonl
from aacp_jax.train import state as state_lib


def toy_state(step):
  # Big enough that the optimiser-like leaf has a data file of its own in OCDBT.
  return {
    'step': jnp.asarray(step, jnp.int32),
    'w': jnp.full((64, 64), float(step), jnp.float32),
    'mu': jnp.arange(4096, dtype=jnp.float32) * step,
  }


def abstract():
  return jax.eval_shape(lambda: toy_state(0))


def saved_dir(tmp_path, steps=(4, 8, 12), keep=5, async_save=True):
  directory = str(tmp_path / 'checkpoints')
  ckpt = ckpt_lib.Checkpointer(directory, every_steps=4, keep=keep, async_save=async_save)
  for s in steps:
    assert ckpt.save(s, toy_state(s))
  ckpt.close()
  return directory


def data_files(step_dir):
  files = [p for p in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)]
  return sorted(files, key=os.path.getsize)


def test_every_saved_step_has_a_manifest_that_verifies(tmp_path):
  directory = saved_dir(tmp_path)
  for s in (4, 8, 12):
    assert ckpt_lib.verify(os.path.join(directory, str(s))) is None
    manifest = json.load(open(os.path.join(directory, str(s), ckpt_lib.MANIFEST)))
    assert any(rel.startswith('state' + os.sep) for rel in manifest['files'])


def _delete(step_dir):
  os.remove(data_files(step_dir)[-1])


def _truncate(step_dir):
  path = data_files(step_dir)[-1]
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(size // 2)


def _flip(step_dir):
  path = data_files(step_dir)[-1]
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    b = f.read(8)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(x ^ 0xFF for x in b))


def _garbage_metadata(step_dir):
  with open(os.path.join(step_dir, 'state', '_METADATA'), 'w') as f:
    f.write('{garbage')


def _no_state(step_dir):
  import shutil

  shutil.rmtree(os.path.join(step_dir, 'state'))


@pytest.mark.parametrize(
  'damage,why',
  [
    (_delete, r'missing'),
    (_truncate, r'has \d+ of \d+ bytes'),
    (_flip, r'does not match its checksum'),
    (_garbage_metadata, r'state/_METADATA (has|does not match)'),
    (_no_state, r'state/ missing'),
  ],
)
def test_a_damaged_newest_step_falls_back_to_the_newest_that_verifies(tmp_path, damage, why):
  directory = saved_dir(tmp_path)
  damage(os.path.join(directory, '12'))
  ckpt = ckpt_lib.Checkpointer(directory, every_steps=4, keep=5)
  state = ckpt.restore(abstract())
  assert int(state['step']) == 8
  np.testing.assert_array_equal(state['mu'], np.asarray(toy_state(8)['mu']))
  assert '\n' not in ckpt.note
  assert ckpt.note.startswith(f'{directory}: restored step 8; skipped newer step(s) 12 (')
  assert __import__('re').search(why, ckpt.note), ckpt.note
  # Moved aside, not deleted, and no longer in the way: step 12 is saved again.
  assert os.path.isdir(os.path.join(directory, ckpt_lib.REJECTED, '12'))
  assert ckpt.steps() == [4, 8]
  assert ckpt.save(12, toy_state(12))
  ckpt.close()
  assert sorted(int(n) for n in os.listdir(directory) if n.isdigit()) == [4, 8, 12]


def test_an_empty_or_unreadable_step_without_manifest_neither_blocks_nor_wins(tmp_path):
  directory = saved_dir(tmp_path, steps=(4, 8))
  os.makedirs(os.path.join(directory, '28'))  # what a kill at the wrong moment left once
  ckpt = ckpt_lib.Checkpointer(directory, every_steps=4, keep=5)
  assert int(ckpt.restore(abstract())['step']) == 8
  assert '28 (empty step folder)' in ckpt.note
  assert ckpt.steps() == [4, 8]
  ckpt.close()


def test_a_step_without_manifest_is_restored_unverified_and_orbax_errors_fall_back(tmp_path):
  directory = saved_dir(tmp_path, steps=(4, 8, 12))
  os.remove(os.path.join(directory, '8', ckpt_lib.MANIFEST))  # as written before checksums
  os.remove(os.path.join(directory, '12', ckpt_lib.MANIFEST))
  _garbage_metadata(os.path.join(directory, '12'))  # unverifiable: orbax's own error decides
  ckpt = ckpt_lib.Checkpointer(directory, every_steps=4, keep=5)
  assert int(ckpt.restore(abstract())['step']) == 8
  assert 'restored step 8 (unverified' in ckpt.note and '12 (orbax: ' in ckpt.note
  ckpt.close()


def test_restore_variables_falls_back_read_only(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  ckpt = ckpt_lib.Checkpointer(directory, every_steps=1, keep=5, async_save=False)
  for s in (1, 2):
    ckpt.save(s, {'params': {'w': jnp.full((64, 64), float(s))}, 'batch_stats': {}})
  ckpt.close()
  _flip(os.path.join(directory, '2'))
  ckpt = ckpt_lib.Checkpointer(directory, every_steps=1, keep=5, async_save=False)
  abstract_vars = {'params': {'w': jax.ShapeDtypeStruct((64, 64), jnp.float32)}}
  variables, step = ckpt.restore_variables(abstract_vars)
  assert step == 1 and float(variables['params']['w'][0, 0]) == 1.0
  with pytest.raises(ValueError, match=r'/2: .*does not match its checksum'):
    ckpt.restore_variables(abstract_vars, step=2)
  ckpt.close()
  assert os.path.isdir(os.path.join(directory, '2'))  # a notebook moves nothing


def test_pruning_keeps_the_newest_verified_steps_and_a_failed_run_prunes_nothing(tmp_path):
  directory = saved_dir(tmp_path, steps=(4, 8, 12), keep=2)
  assert sorted(int(n) for n in os.listdir(directory) if n.isdigit()) == [8, 12]
  ckpt = ckpt_lib.Checkpointer(directory, every_steps=4, keep=2)
  ckpt.restore(abstract())
  ckpt.save(16, toy_state(16), force=True, prune=False)
  ckpt.close(prune=False)
  assert ckpt_lib.verify(os.path.join(directory, '16')) is None
  assert sorted(int(n) for n in os.listdir(directory) if n.isdigit()) == [8, 12, 16]


def _toy_train_state(params, tx):
  return state_lib.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats={},
    opt_state=tx.init(params),
    extra={},
    nonfinite=jnp.zeros((), jnp.int32),
    nonfinite_last=jnp.zeros((), jnp.int32),
  )


@pytest.mark.parametrize('lr', [float('nan'), 1e30])
def test_a_nonfinite_update_or_new_parameter_is_skipped(lr):
  tx = optax.adam(lr)
  params = {'w': jnp.linspace(-1.0, 1.0, 8), 'b': jnp.ones((3,))}
  state = _toy_train_state(params, tx)
  grads = jax.tree.map(lambda p: p + 0.5, params)
  new, finite, grad_norm, _ = jax.jit(
    lambda s, g: state_lib.apply_if_finite(s, g, {}, {}, jnp.float32(1.0), tx)
  )(state, grads)
  assert np.isfinite(grad_norm) and not bool(finite)  # loss and gradient were fine
  assert int(new.step) == 1 and int(new.nonfinite) == 1 and int(new.nonfinite_last) == 1
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_a_finite_update_is_exactly_optax_s():
  tx = optax.adam(1e-2)
  params = {'w': jnp.linspace(-1.0, 1.0, 8)}
  state = _toy_train_state(params, tx)
  grads = {'w': jnp.linspace(0.3, -0.7, 8)}
  new, finite, _, _ = jax.jit(
    lambda s, g: state_lib.apply_if_finite(s, g, {}, {}, jnp.float32(1.0), tx)
  )(state, grads)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert bool(finite)
  np.testing.assert_array_equal(new.params['w'], optax.apply_updates(params, updates)['w'])


def test_metric_rows_after_the_resume_step_are_dropped_and_tensorboard_purged(tmp_path):
  writer = MetricWriter(str(tmp_path), resume_step=0)
  for s in range(1, 11):
    writer.write(s, {'loss': float(s)})
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 11, "lo')  # a row cut off by kill -9
  writer = MetricWriter(str(tmp_path), resume_step=8)
  writer.write(9, {'loss': 9.5})
  writer.close()
  assert [r['step'] for r in read_jsonl(str(tmp_path / 'metrics.jsonl'))] == list(range(1, 10))
  assert truncate_jsonl(str(tmp_path / 'metrics.jsonl'), 9) == 0
  # TensorBoard hides the killed run's events from the resumed step on (purge_step = 9).
  from tensorboardX.proto import event_pb2

  purges = [
    e.step
    for path in glob.glob(str(tmp_path / 'tensorboard' / 'events.*'))
    for e in _events(path, event_pb2)
    if e.HasField('file_version') and e.step
  ]
  # Two event files (one per writer), whose glob order is not their creation order when both
  # were created in the same second: the first writer's purge step is 1, the resumed one's 9.
  assert purges and max(purges) == 9, purges


def _events(path, event_pb2):
  # TFRecord framing: u64 length, u32 crc, payload, u32 crc.
  with open(path, 'rb') as f:
    while header := f.read(12):
      payload = f.read(int.from_bytes(header[:8], 'little'))
      f.read(4)
      event = event_pb2.Event()
      event.ParseFromString(payload)
      yield event
