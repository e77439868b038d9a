"""The pretraining experiment: `config.method` (methods registry) on the shared loop, then
linear probes of the encoders on held-out labels."""

import json
import os

import jax

from aacp_jax import methods
from aacp_jax.methods.base import RunInfo
from aacp_jax.models import inputs as model_inputs
from aacp_jax.train import loop
from aacp_jax.train import state as state_lib


def check_config(config) -> None:
  """One-line errors naming the config key, before any data is read or anything compiles."""
  state_lib.check_common(config)
  methods.get(config.method).check_config(config)


def make_task(config, data) -> loop.Task:
  method = methods.get(config.method)
  total_steps = config.total_steps or config.num_epochs * data.steps_per_epoch
  model = method.build_model(config)
  tx, schedule = state_lib.make_optimizer(config.optim, total_steps)
  run = RunInfo(steps_per_epoch=data.steps_per_epoch, total_steps=total_steps)
  return loop.Task(
    model=model,
    dummy_inputs=model_inputs.dummy_inputs(config.modalities, config.data.image_size),
    tx=tx,
    schedule=schedule,
    loss_fn=method.make_loss(config, model, run),
    total_steps=total_steps,
    schedules=method.make_schedules(config, run),
    init_extra=lambda variables: method.init_extra(config, variables),
    after_update=method.after_update,
  )


def train_and_evaluate(config, workdir: str) -> dict:
  check_config(config)
  trained = loop.train(config, workdir, make_task)
  if trained.stopped_at is not None:
    return {'stopped_at': trained.stopped_at}
  results = {'steps': trained.task.total_steps}
  if config.eval.probe:
    from aacp_jax.eval import probe  # pylint: disable=g-import-not-at-top

    results['probe'] = probe.evaluate_pretrained(
      config, trained.task.model, trained.state, trained.data.root
    )
    if jax.process_index() == 0:
      with open(os.path.join(workdir, 'eval.json'), 'w', encoding='utf-8') as f:
        json.dump(results, f, indent=2)
  return results


def format_results(results: dict, workdir: str) -> str:
  if 'probe' not in results:
    return ''
  from aacp_jax.eval.probe import format_table  # pylint: disable=g-import-not-at-top

  return (
    '\nLinear probes on held-out phantom labels (test split):\n'
    f'{format_table(results["probe"])}\nDetails: {os.path.join(workdir, "eval.json")}'
  )
