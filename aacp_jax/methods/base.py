"""What a pretraining method supplies to the shared loop (`aacp_jax.train.loop`).

A method is one module in this package defining `METHOD = Method(...)`; `config.method` names it.
The loop, the checkpoints, resume, the non-finite policy and logging are the same for every method:
a method only says how its model is built, what extra state it carries and what its loss is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

# loss_fn(params, batch_stats, extra, batch, key, scheduled) -> (loss, (batch_stats, extra,
# metrics)): a pure function of global arrays, differentiated with respect to `params` only.
# `extra` is the method's own state (a momentum encoder, a queue of keys); return it updated, or
# as it came. `scheduled` is the dict `make_schedules(...)(step)` gives (curriculum weights): values
# of the step alone, computed outside the differentiated function.
LossFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What a loss may need to know about the run: its length and the data's epoch."""

  steps_per_epoch: int
  total_steps: int


def no_schedules(step):
  del step
  return {}


@dataclasses.dataclass(frozen=True)
class Method:
  """A pretraining method by name.

  check_config(config): one-line ValueErrors naming the config key, before anything compiles.
  build_model(config) -> flax Module whose `init(key, images, train=False)` takes
    {modality: (B, H, W, C)} (`aacp_jax.models.inputs.dummy_inputs`).
  make_loss(config, model, run: RunInfo) -> LossFn.
  make_schedules(config, run) -> (step -> dict of scalars): what the loss reads as `scheduled`
    (default: nothing).
  init_extra(config, variables) -> pytree of arrays: the method's extra train state, created
    with the parameters (default: none).
  after_update(state) -> state: runs on device after the optimiser update, e.g. a momentum
    encoder's EMA (default: none). Kept, like the update, only when the step is finite.
  """

  name: str
  check_config: Callable[[Any], None]
  build_model: Callable[[Any], Any]
  make_loss: Callable[[Any, Any, RunInfo], LossFn]
  make_schedules: Callable[[Any, RunInfo], Callable] = lambda config, run: no_schedules
  init_extra: Callable[[Any, Any], Any] = lambda config, variables: {}
  after_update: Callable[[Any], Any] | None = None
