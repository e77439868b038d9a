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

from aacp_jax import methods
from aacp_jax.data import landmarks as landmarks_lib
from aacp_jax.models import detector, inputs


@dataclasses.dataclass(frozen=True)
class Experiment:
  name: str
  train_module: str
  build_model: Callable[[Any], Any]

  def module(self):
    return importlib.import_module(self.train_module)

  def dummy_inputs(self, config):
    return inputs.dummy_inputs(config.modalities, config.data.image_size)


def _pretrain_model(config):
  return methods.get(config.get('method', 'aacp')).build_model(config)


def _detector_model(config):
  return detector.build_detector(config.model, config.modalities, len(landmarks_lib.LANDMARKS))


EXPERIMENTS = {
  e.name: e
  for e in (
    Experiment('pretrain', 'aacp_jax.train.pretrain', _pretrain_model),
    Experiment('landmarks', 'aacp_jax.train.landmarks', _detector_model),
  )
}


def get(name: str) -> Experiment:
  if name not in EXPERIMENTS:
    raise ValueError(f'config.experiment={name!r}: expected one of {", ".join(EXPERIMENTS)}')
  return EXPERIMENTS[name]
