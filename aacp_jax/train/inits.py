"""Where a fine-tuning run's encoder starts: `config.init`.

- 'random': the model's own initialisation (He-normal convolutions, as torchvision).
- a pretraining workdir (any method): the task modality's encoder from its `config.json` and
  newest checkpoint that verifies (`restore.load_variables`); depth and width are the workdir's,
  and so is the encoder kind (`model.arch`: 'resnet', or 'vit' with its `model.vit`, e.g. MAE).
- 'imagenet:PATH': torchvision/timm ResNet weights (.npz or .safetensors) on disk, through
  `models/convert.py` (conv1 adapted to CT's 64 and X-ray's 1 channel). Nothing is downloaded.

Every mismatch is a one-line ValueError naming `config.init` and the culprit: a workdir without
the task's modality, weights whose shapes do not fit.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from aacp_jax import restore
from aacp_jax import workdir as workdir_lib
from aacp_jax.models import convert

IMAGENET = 'imagenet:'


def kind(init: str) -> str:
  """'random', 'imagenet' or 'workdir'."""
  if init == 'random':
    return 'random'
  if init.startswith(IMAGENET):
    return 'imagenet'
  return 'workdir'


def encoder_config(init: str, modality: str) -> dict:
  """The encoder settings an init fixes ({} for random and ImageNet: the config's own)."""
  if kind(init) == 'imagenet' and not os.path.isfile(init[len(IMAGENET) :]):
    raise ValueError(f'config.init={init}: no such file')
  if kind(init) != 'workdir':
    return {}
  if not os.path.isdir(init):
    raise ValueError(
      f"config.init={init}: not 'random', 'imagenet:PATH' or an existing pretraining workdir"
    )
  try:
    pre = workdir_lib.read_config(init)
  except ValueError as e:
    raise ValueError(f'config.init={init}: {e}') from None
  mods = tuple(pre.get('modalities', ()))
  if modality not in mods:
    raise ValueError(
      f'config.init={init}: the workdir has encoders for {list(mods)}, the task needs {modality!r}'
    )
  return encoder_fields(pre.model)


def encoder_fields(model) -> dict:
  """The encoder fields of a pretraining config's `model` that a fine-tuning config must copy."""
  if model.get('arch', 'resnet') == 'vit':
    return {'arch': 'vit', 'vit': model.vit.to_dict()}
  return {
    'arch': 'resnet',
    'depth': int(model.depth),
    'width': int(model.width),
    'zero_init_residual': bool(model.get('zero_init_residual', False)),
  }


def _check_fits(loaded, fresh, where: str):
  """Same tree and shapes leaf by leaf; names the first leaf that differs."""
  flat_new = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  flat_old = dict(jax.tree_util.tree_flatten_with_path(fresh)[0])
  keys = lambda flat: set(map(jax.tree_util.keystr, flat))
  missing = sorted(keys(flat_old) - keys(flat_new))
  if missing or len(flat_new) != len(flat_old):
    raise ValueError(f'{where}: the encoder weights do not fit the model; missing {missing[:3]}')
  for path, old in flat_old.items():
    new = flat_new[path]
    if np.shape(new) != np.shape(old):
      raise ValueError(
        f'{where}: {jax.tree_util.keystr(path)} has shape {np.shape(new)}, the model '
        f'expects {np.shape(old)}'
      )


def initial_variables(init: str, modality: str):
  """None for random init, else fresh FineTuneModel variables -> ones with the encoder loaded."""
  how = kind(init)
  if how == 'random':
    return None

  def load(fresh):
    # A ViT has no BatchNorm: no 'encoder' among the batch statistics (and none to load).
    enc = {c: fresh[c].get('encoder', {}) for c in ('params', 'batch_stats')}
    if how == 'workdir':
      restored = restore.load_variables(init)
      _, loaded = restore.encoder_variables(restored, modality)
      where = f'config.init={init} ({modality} encoder, step {restored.step})'
    else:
      path = init[len(IMAGENET) :]
      if not os.path.isfile(path):
        raise ValueError(f'config.init={init}: no such file')
      reader = convert.load_safetensors if path.endswith('.safetensors') else convert.load_npz
      try:
        loaded = convert.load_torchvision_resnet(enc, reader(path))
      except ValueError as e:
        raise ValueError(f'config.init={init}: {e}') from None
      where = f'config.init={init}'
    loaded = {c: loaded[c] for c in ('params', 'batch_stats')}
    _check_fits(loaded, enc, where)
    cast = lambda new, old: np.asarray(new, np.asarray(old).dtype)
    loaded = jax.tree.map(cast, loaded, enc)
    return {
      c: {**fresh[c], 'encoder': loaded[c]} if 'encoder' in fresh[c] else fresh[c]
      for c in ('params', 'batch_stats')
    }

  return load
