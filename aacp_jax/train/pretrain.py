"""Pretraining: data, state on the mesh, the loop with checkpoints and resume, then probes."""
import functools
import json
import os
import signal
import time

from absl import logging
import jax
import jax.numpy as jnp

from aacp_jax import checkpoint as ckpt_lib
from aacp_jax import sharding
from aacp_jax.data import phantoms, pipeline, shards
from aacp_jax.metrics import MetricWriter
from aacp_jax.models import encoders
from aacp_jax.train import state as state_lib
from aacp_jax.train.step import train_step


def check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ValueError(f'--workdir={workdir}: cannot be written ({e.strerror or e})') from None


def prepare_data(config, workdir: str) -> str:
  """The shard root: config.data.root, or phantoms built (once, cached) inside the workdir."""
  if config.data.root:
    if not os.path.isdir(config.data.root):
      raise ValueError(f'config.data.root={config.data.root}: no such directory')
    return config.data.root
  counts = {split: {m: int(n) for m in config.modalities}
            for split, n in config.data.phantoms.items()}
  root = phantoms.default_root(workdir, config.seed, config.data.image_size, counts)
  # Every process writes the same deterministic files; only process 0 does, the rest wait.
  if jax.process_index() == 0:
    phantoms.build(root, seed=config.seed, image_size=config.data.image_size, counts=counts)
  _sync('phantoms')
  return root


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def steps_per_epoch(root, split, modalities, global_batches) -> int:
  manifest = shards.read_manifest(root, split)
  return max(1, min(manifest['modalities'][m]['count'] // global_batches[m] for m in modalities))


def create_state(config, model, tx, mesh, image_size):
  """Parameters initialised by a jitted init that places them, replicated, on the mesh."""
  def init(key):
    dummy = {m: jnp.zeros((2, image_size, image_size, state_lib.IN_CHANNELS[m]), jnp.float32)
             for m in config.modalities}
    variables = model.init(key, dummy, train=False)
    params = variables['params']
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))

  key = jax.random.key(config.seed)
  abstract = jax.eval_shape(init, key)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  state = jax.jit(init, out_shardings=shardings)(key)
  return state, shardings


def make_cross_schedule(config, epoch_steps: int, total_steps: int):
  """lambda_cross by step; the curriculum's epochs scale with the run when total_steps sets it.

  The configured epochs (50 -> 100 of 200) describe a num_epochs-long run. A run cut to
  total_steps (the demo: 300 steps = 37.5 epochs) keeps the same fractions of its length, so the
  term is actually trained; otherwise it would never switch on.
  """
  if config.loss.get('cross_weight', 0) > 0 and len(config.modalities) < 2:
    logging.warning('config.loss.cross_weight=%s but only %s is enabled: no cross-modal pairs, '
                    'the term is off.', config.loss.cross_weight, tuple(config.modalities))
  scale = 1.0
  if config.total_steps:
    scale = total_steps / (epoch_steps * config.num_epochs)
  return state_lib.cross_modal_schedule(config.loss, epoch_steps, scale)


def open_data(config, workdir: str, mesh):
  """(shard root, global batch per modality, this process's checkpointable host-batch iterator)."""
  batches = sharding.per_modality_batch(
      config.batch_size, config.data.shares, config.modalities,
      num_devices=mesh.size, num_processes=jax.process_count())
  root = prepare_data(config, workdir)
  per_host = {m: b // jax.process_count() for m, b in batches.items()}
  data_iter = pipeline.pretrain_loader(
      root, config.data.split, per_host, seed=config.seed, image_size=config.data.image_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=config.data.worker_count)
  return root, batches, data_iter


def resume(ckpt, state, shardings, data_iter):
  """The latest checkpoint's state (data_iter restored in place), or `state` when there is none."""
  restored = ckpt.restore(ckpt_lib.abstract_like(state, shardings), data_iter)
  if restored is None:
    return state
  logging.info('Resumed from step %d in %s', int(restored.step), ckpt.directory)
  return restored


class _StopFlag:
  """SIGINT/SIGTERM ask the loop to checkpoint and exit; a second SIGINT interrupts at once."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning('Signal %d: checkpointing and stopping after this step.', signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def train_and_evaluate(config, workdir: str) -> dict:
  state_lib.check_config(config)
  check_workdir(workdir)
  mesh = sharding.make_mesh()
  root, batches, data_iter = open_data(config, workdir, mesh)

  epoch_steps = steps_per_epoch(root, config.data.split, config.modalities, batches)
  total_steps = config.total_steps or config.num_epochs * epoch_steps
  model = encoders.build_model(config.model, config.modalities)
  tx, schedule = state_lib.make_optimizer(config.optim, total_steps)
  state, state_shardings = create_state(config, model, tx, mesh, config.data.image_size)
  cross_schedule = make_cross_schedule(config, epoch_steps, total_steps)

  ckpt = ckpt_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), every_steps=config.checkpoint_every_steps,
      keep=config.keep_checkpoints)
  state = resume(ckpt, state, state_shardings, data_iter)
  start = int(state.step)

  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config,
                        cross_schedule=cross_schedule),
      in_shardings=(state_shardings, sharding.batch_sharded(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0)
  writer = MetricWriter(workdir)
  logging.info('Training steps %d..%d (%d per epoch), batches %s on %d devices.',
               start, total_steps, epoch_steps, batches, mesh.size)

  t_last, n_last = time.perf_counter(), start
  with _StopFlag() as stop:
    for step in range(start, total_steps):
      batch = sharding.to_global(next(data_iter), mesh)
      state, metrics = step_fn(state, batch)
      done = step + 1
      if done % config.log_every_steps == 0 or done == total_steps or stop.requested:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        # The first interval holds compilation; it is reported but not steady-state speed.
        metrics['images_per_sec'] = (done - n_last) * config.batch_size / (now - t_last)
        metrics['epoch'] = done / epoch_steps
        t_last, n_last = now, done
        writer.write(done, metrics)
        logging.info('step %d loss %.4f (%.1f img/s)', done, metrics['loss'],
                     metrics['images_per_sec'])
        if not metrics['finite']:
          ckpt.save(done, state, data_iter, force=True)
          ckpt.close()
          raise FloatingPointError(
              f'step {done}: loss or gradient norm is not finite; state before it is saved '
              f'in {ckpt.directory}')
      ckpt.save(done, state, data_iter, force=stop.requested or done == total_steps)
      if stop.requested:
        ckpt.close()
        writer.close()
        logging.warning('Stopped at step %d; run the same command to resume.', done)
        return {'stopped_at': done}
  ckpt.close()
  writer.close()

  results = {'steps': total_steps}
  if config.eval.probe:
    from aacp_jax.eval import probe
    results['probe'] = probe.evaluate_pretrained(config, model, state, root)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, 'eval.json'), 'w', encoding='utf-8') as f:
        json.dump(results, f, indent=2)
  return results
