"""The one training loop: every experiment (pretraining with any method, the landmark detector,
fine-tuning) runs on it and supplies only its model, optimiser, loss and data.

The loop owns what must be the same for all of them: workdir checks, `config.json`, the state
on the mesh, resume from the latest checkpoint (train state and data iterator together),
SIGINT/SIGTERM stop with a checkpoint, the non-finite policy, checkpointing, metrics.jsonl and
TensorBoard.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable

from absl import logging
import jax

from aacp_jax import checkpoint as ckpt_lib
from aacp_jax import sharding
from aacp_jax import workdir as workdir_lib
from aacp_jax.metrics import MetricWriter
from aacp_jax.train import inputs
from aacp_jax.train import state as state_lib
from aacp_jax.train.step import train_step


@dataclasses.dataclass(frozen=True)
class Task:
  """What an experiment supplies to `train`.

  model: a flax Module; dummy_inputs: its `init` images ({m: (B, H, W, C)}); tx, schedule: the
  optimiser and its learning rate by step (logged); loss_fn: `methods.base.LossFn`;
  total_steps: the run's length; schedules: step -> the loss's `scheduled` dict; init_extra,
  after_update: a method's extra state and its post-update hook (`methods.base.Method`).
  """

  model: Any
  dummy_inputs: dict
  tx: Any
  schedule: Callable
  loss_fn: Callable
  total_steps: int
  schedules: Callable | None = None
  init_extra: Callable | None = None
  after_update: Callable | None = None


@dataclasses.dataclass
class Trained:
  """What `train` returns: the final (or stopped-at) state, the task and data it used, and
  `stopped_at`, the step a signal stopped the run at (None when it ran to the end)."""

  state: Any
  task: Task
  data: inputs.Data
  stopped_at: int | None


class StopFlag:
  """SIGINT/SIGTERM ask the loop to checkpoint and exit; a second SIGINT interrupts at once."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning('Signal %d: checkpointing and stopping after this step.', signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def nonfinite_message(first: int, last: int, skipped: int, last_bad: int) -> str:
  """The one line the non-finite policy ends a run with."""
  steps = f'step {last}' if first == last else f'steps {first}..{last}'
  return (
    f'{steps}: {skipped} step(s) skipped because the loss or gradient norm was not finite '
    f'(the last at step {last_bad})'
  )


def train(
  config, workdir: str, make_task: Callable[[Any, inputs.Data], Task], *, open_data=inputs.open_data
) -> Trained:
  """Runs (or resumes) training of `make_task(config, data)` in `workdir` and returns `Trained`.

  Non-finite policy: a step whose loss or gradient norm is not finite changes nothing but the
  step and the state's `nonfinite` counter (`state.apply_if_finite`); the loop reads the
  counter at every log step and, if any step since the last log was skipped, saves the state
  (which holds no update from a skipped step) and raises FloatingPointError naming the steps.
  """
  workdir_lib.check_writable(workdir, jax.process_index())
  if jax.process_index() == 0:
    workdir_lib.write_config(config, workdir)
  mesh = sharding.make_mesh()
  data = open_data(config, workdir, mesh)
  task = make_task(config, data)
  state, shardings = state_lib.create_state(
    task.model, task.tx, mesh, task.dummy_inputs, config.seed, task.init_extra
  )
  ckpt = ckpt_lib.Checkpointer(
    os.path.join(workdir, 'checkpoints'),
    every_steps=config.checkpoint_every_steps,
    keep=config.keep_checkpoints,
  )
  restored = ckpt.restore(ckpt_lib.abstract_like(state, shardings), data.iterator)
  if restored is not None:
    state = restored
    logging.info('Resumed from step %d in %s', int(state.step), ckpt.directory)
  start, total = int(state.step), task.total_steps

  step_fn = jax.jit(
    functools.partial(
      train_step,
      loss_fn=task.loss_fn,
      tx=task.tx,
      schedule=task.schedule,
      seed=config.seed,
      schedules=task.schedules,
      after_update=task.after_update,
    ),
    in_shardings=(shardings, sharding.batch_sharded(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  writer = MetricWriter(workdir)
  logging.info(
    'Training steps %d..%d (%d per epoch), batches %s on %d devices.',
    start,
    total,
    data.steps_per_epoch,
    data.batches,
    mesh.size,
  )

  t_start = t_last = time.perf_counter()
  n_last, seen_nonfinite = start, int(state.nonfinite)
  stopped_at = None
  try:
    with StopFlag() as stop:
      for step in range(start, total):
        batch = sharding.to_global(next(data.iterator), mesh)
        state, metrics = step_fn(state, batch)
        done = step + 1
        if done % config.log_every_steps == 0 or done == total or stop.requested:
          metrics = jax.device_get(metrics)
          now = time.perf_counter()
          # The first interval holds compilation; it is reported but not steady-state speed.
          metrics['images_per_sec'] = (done - n_last) * config.batch_size / (now - t_last)
          metrics['epoch'] = done / data.steps_per_epoch
          metrics['elapsed_s'] = now - t_start
          writer.write(done, metrics)
          logging.info(
            'step %d loss %.4f (%.1f img/s)', done, metrics['loss'], metrics['images_per_sec']
          )
          skipped = int(metrics['nonfinite_steps']) - seen_nonfinite
          if skipped:
            ckpt.save(done, state, data.iterator, force=True)
            raise FloatingPointError(
              f'{nonfinite_message(n_last + 1, done, skipped, int(state.nonfinite_last))}; '
              f'the state without them is saved in {ckpt.directory}'
            )
          t_last, n_last = now, done
        ckpt.save(done, state, data.iterator, force=stop.requested or done == total)
        if stop.requested:
          logging.warning('Stopped at step %d; run the same command to resume.', done)
          stopped_at = done
          break
  finally:
    ckpt.close()
    writer.close()
  return Trained(state=state, task=task, data=data, stopped_at=stopped_at)
