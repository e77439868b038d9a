"""Experiments by name: `config.experiment` picks one, `main.py` runs it, `restore` rebuilds its
model from a workdir's config.json.

An experiment module (`train_module`) defines
  train_and_evaluate(config, workdir) -> results (dict; JSON-able),
  format_results(results, workdir) -> str, the table the command prints (may be '').
The model builder lives below the training code (methods, models), so that restoring a workdir
for inference or fine-tuning never imports a training loop.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from aacp_jax import methods, task_specs
from aacp_jax.data import landmarks as landmarks_lib
from aacp_jax.models import detector, finetune, inputs


@dataclasses.dataclass(frozen=True)
class Experiment:
  """make_dummy(config): the model's `init` input (default: a dict of every modality's zeros)."""

  name: str
  train_module: str
  build_model: Callable[[Any], Any]
  make_dummy: Callable[[Any], Any] | None = None

  def module(self):
    return importlib.import_module(self.train_module)

  def dummy_inputs(self, config):
    if self.make_dummy is not None:
      return self.make_dummy(config)
    return inputs.dummy_inputs(config.modalities, config.data.image_size)


def _pretrain_model(config):
  return methods.get(config.get('method', 'aacp')).build_model(config)


def _detector_model(config):
  return detector.build_detector(config.model, config.modalities, len(landmarks_lib.LANDMARKS))


def _finetune_model(config):
  task = task_specs.get(config.task)
  return finetune.build_finetune_model(config.model, task.head, task.num_outputs)


def _finetune_dummy(config):
  # One modality's images as a plain array: the fine-tuning model has one encoder.
  (modality,) = config.modalities
  return inputs.dummy_inputs((modality,), config.data.image_size)[modality]


EXPERIMENTS = {
  e.name: e
  for e in (
    Experiment('pretrain', 'aacp_jax.train.pretrain', _pretrain_model),
    Experiment('landmarks', 'aacp_jax.train.landmarks', _detector_model),
    Experiment('finetune', 'aacp_jax.train.finetune', _finetune_model, _finetune_dummy),
  )
}


def get(name: str) -> Experiment:
  if name not in EXPERIMENTS:
    raise ValueError(f'config.experiment={name!r}: expected one of {", ".join(EXPERIMENTS)}')
  return EXPERIMENTS[name]
