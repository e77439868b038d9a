"""Parameters-only restore: a workdir's model and variables for notebooks, inference and
fine-tuning, from its `config.json` and a checkpoint, with no optimiser, mesh or train state.

  restored = restore.load_variables('/tmp/aacp_demo')
  out = restored.model.apply(restored.variables, {'ct': x}, train=False)
  encoder, enc_vars = restore.encoder_variables(restored, 'ct')   # a plain ResNet
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from aacp_jax import checkpoint as ckpt_lib
from aacp_jax import experiments
from aacp_jax import workdir as workdir_lib
from aacp_jax.models import resnet, vit


@dataclasses.dataclass(frozen=True)
class Restored:
  """config: the run's resolved config (config.json); model: its flax Module; variables:
  {'params', 'batch_stats'} as host (NumPy-backed) arrays; step: the checkpoint's step."""

  config: Any
  model: Any
  variables: dict
  step: int


def load_variables(workdir: str, *, step: int | None = None) -> Restored:
  """The model and variables of `workdir`'s newest checkpoint that verifies (or of `step`).

  One-line ValueErrors when the workdir has no config.json or no usable checkpoint.
  """
  config = workdir_lib.read_config(workdir)
  experiment = experiments.get(config.experiment)
  model = experiment.build_model(config)
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), experiment.dummy_inputs(config), train=False)
  )
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise ValueError(f'{workdir}: no checkpoints/ (the run has not saved a step yet)')
  ckpt = ckpt_lib.Checkpointer(directory, every_steps=1, keep=1, async_save=False)
  try:
    variables, found = ckpt.restore_variables(abstract, step)
  finally:
    ckpt.close()
  if variables is None:
    # ckpt.note names every step that failed its checksum or restore, and why.
    raise ValueError(ckpt.note or f'{workdir}: no checkpoint under {directory}')
  variables = jax.device_get(variables)
  return Restored(config=config, model=model, variables=variables, step=int(found))


def encoder_variables(restored: Restored, modality: str):
  """(ResNet module, its variables) of one modality's encoder in a pretraining workdir: the
  backbone alone, as fine-tuning and feature extraction use it (`__call__(x, train)` gives
  c2..c5 and 'pooled'). A ViT workdir (config.model.arch 'vit', e.g. MAE) gives (`vit.ViT`,
  {'params', 'batch_stats': {}}) instead (`__call__(x)` gives 'tokens', 'grid' and 'pooled').
  A fine-tuning workdir gives its one modality's fine-tuned encoder the same way (no head)."""
  model = restored.model
  if restored.config.get('experiment') == 'finetune':
    return _finetuned_encoder(restored, modality)
  name = f'encoder_{modality}'
  if name not in restored.variables['params']:
    have = sorted(
      k[len('encoder_') :] for k in restored.variables['params'] if k.startswith('encoder_')
    )
    raise ValueError(f'modality {modality!r}: the restored model has encoders for {have}')
  if restored.config.model.get('arch', 'resnet') == 'vit':
    encoder = vit.ViT(vit.spec_from(restored.config.model.vit), model.dtype)
    return encoder, {'params': restored.variables['params'][name], 'batch_stats': {}}
  channels = None if model.in_channels is None else model.in_channels.get(modality)
  encoder = resnet.ResNet(
    depth=model.depth,
    width=model.width,
    num_classes=None,
    in_channels=channels,
    dtype=model.dtype,
    zero_init_residual=model.zero_init_residual,
  )
  return encoder, {
    'params': restored.variables['params'][name],
    'batch_stats': restored.variables['batch_stats'][name],
  }


def _finetuned_encoder(restored: Restored, modality: str):
  """`encoder_variables` of a fine-tuning workdir: `FineTuneModel`'s `encoder` submodule."""
  model, have = restored.model, tuple(restored.config.modalities)
  if modality not in have:
    raise ValueError(f'modality {modality!r}: the restored model has encoders for {list(have)}')
  params = restored.variables['params']['encoder']
  stats = restored.variables.get('batch_stats', {}).get('encoder', {})
  if model.arch == 'vit':
    return vit.ViT(model.vit_spec, model.dtype), {'params': params, 'batch_stats': {}}
  encoder = resnet.ResNet(
    depth=model.depth,
    width=model.width,
    num_classes=None,
    dtype=model.dtype,
    zero_init_residual=model.zero_init_residual,
  )
  return encoder, {'params': params, 'batch_stats': stats}
