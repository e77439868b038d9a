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
  after_update: a method's extra state and its post-update hook (`methods.base.Method`);
  initial_variables: fresh {'params', 'batch_stats'} (host arrays) -> the ones to start from
  (a fine-tuning run's pretrained encoder), applied only when no checkpoint is resumed.
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
  initial_variables: Callable | None = None


@dataclasses.dataclass
class Trained:
  """What `train` returns: the final (or stopped-at) state, the task and data it used,
  `stopped_at`, the step a signal stopped the run at (None when it ran to the end), and
  `resumed_from`, the checkpoint step it started from (None: from scratch)."""

  state: Any
  task: Task
  data: inputs.Data
  stopped_at: int | None
  resumed_from: int | None = None


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
    f'{steps}: {skipped} step(s) skipped because the loss, gradient norm, update norm or new '
    f'parameters were not finite (the last at step {last_bad})'
  )


def train(
  config, workdir: str, make_task: Callable[[Any, inputs.Data], Task], *, open_data=inputs.open_data
) -> Trained:
  """Runs (or resumes) training of `make_task(config, data)` in `workdir` and returns `Trained`.

  Non-finite policy: a step whose loss, gradient norm, update norm or new parameters are not
  finite changes nothing but the step and the state's `nonfinite` counter
  (`state.apply_if_finite`); the loop reads the counter after the first step and at every log
  step and, if any step since was skipped, saves the state (which holds no update from a
  skipped step) unless the last checkpoint already holds the same parameters, and raises
  FloatingPointError naming the steps. A failing run prunes no checkpoint.
  """
  workdir_lib.check_writable(workdir, jax.process_index())
  # One run per workdir, and a resume only of the same run: both settled before anything there
  # is read or written. The lock is held until training ends (the kernel drops it on death).
  with workdir_lib.lock(workdir, jax.process_index()):
    changes = workdir_lib.check_resume(config, workdir)
    if jax.process_index() == 0:
      workdir_lib.record_changes(workdir, changes)
      workdir_lib.write_config(config, workdir)
    return _train(config, workdir, make_task, open_data)


def _train(config, workdir: str, make_task, open_data) -> Trained:
  """`train` in a locked workdir whose config.json is this run's."""
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
  # The newest checkpoint that verifies; damaged newer ones are moved aside, in one log line.
  restored = ckpt.restore(ckpt_lib.abstract_like(state, shardings), data.iterator)
  resumed_from = None
  if restored is not None:
    state = restored
    resumed_from = int(state.step)
    logging.info('Resumed from step %d in %s', resumed_from, ckpt.directory)
  elif task.initial_variables is not None:
    # Outside the jitted init: pretrained weights as jit constants would be compiled into it.
    # Adam's moments start at zero whatever the parameters, so the optimiser state stays valid.
    variables = task.initial_variables(jax.device_get(state.variables))
    state = state.replace(
      params=jax.device_put(variables['params'], shardings.params),
      batch_stats=jax.device_put(variables['batch_stats'], shardings.batch_stats),
    )
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
  # Rows a killed run logged after `start` are logged again below: dropped, so each step is once.
  writer = MetricWriter(workdir, resume_step=start)
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
  # The step and skip counter of the newest checkpoint: if every step since was skipped, that
  # checkpoint already holds this state's parameters (None: there is none).
  saved = (start, seen_nonfinite) if restored is not None else None
  stopped_at, failed = None, True
  try:
    with StopFlag() as stop:
      for step in range(start, total):
        batch = inputs.next_batch(data.iterator, mesh)
        if step == start:
          # Compiled ahead, then a barrier: every process starts its first step together, as
          # the CPU collectives give late peers only 30 s (`sharding.barrier`).
          step_fn = step_fn.lower(state, batch).compile()
          sharding.barrier('compiled')
        state, metrics = step_fn(state, batch)
        done = step + 1
        # Read once per step: a signal that arrives later (during the save below) is acted on
        # after the next step, which is then logged, saved and stopped at as one.
        stopping = stop.requested
        # After the first step one read of the counter (one host sync) stops a run that skips
        # every step (lr = NaN) at once rather than at the first log step.
        first_bad = done == start + 1 and int(state.nonfinite) != seen_nonfinite
        if done % config.log_every_steps == 0 or done == total or stopping or first_bad:
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
          nonfinite = int(metrics['nonfinite_steps'])
          skipped = nonfinite - seen_nonfinite
          if skipped:
            message = nonfinite_message(n_last + 1, done, skipped, int(state.nonfinite_last))
            if saved is not None and done - saved[0] == nonfinite - saved[1]:
              # Saving again would only push good checkpoints out (reruns used to, each time).
              where = f'the checkpoint of step {saved[0]} holds the state without them'
            else:
              ckpt.save(done, state, data.iterator, force=True, prune=False)
              where = f'the state without them is saved in {ckpt.directory} (step {done})'
            raise FloatingPointError(f'{message}; {where}')
          t_last, n_last = now, done
        if ckpt.save(done, state, data.iterator, force=stopping or done == total):
          saved = (done, int(state.nonfinite))
        if stopping:
          logging.warning('Stopped at step %d; run the same command to resume.', done)
          stopped_at = done
          break
    failed = False
  finally:
    ckpt.close(prune=not failed)
    writer.close()
  return Trained(
    state=state, task=task, data=data, stopped_at=stopped_at, resumed_from=resumed_from
  )
