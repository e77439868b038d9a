"""Train state, optimiser and the config checks that run before anything compiles."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from aacp_jax.modalities import IN_CHANNELS, MODALITIES  # noqa: F401  (re-exported)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """Adam with L2 weight decay and a cosine schedule (paper 3.5.1).

  The decay is added to the gradient before Adam (torch.optim.Adam's `weight_decay`), the
  optimiser the paper names; AdamW's decoupled decay would be a different method.
  """
  warmup = int(optim_cfg.warmup_steps)
  if warmup > 0:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, optim_cfg.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1))
  else:
    schedule = optax.cosine_decay_schedule(optim_cfg.lr, decay_steps=max(total_steps, 1))
  parts = []
  if optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  if optim_cfg.weight_decay > 0:
    parts.append(optax.add_decayed_weights(optim_cfg.weight_decay))
  parts.append(optax.adam(schedule))
  return optax.chain(*parts), schedule


def compute_dtype(name: str):
  try:
    return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]
  except KeyError:
    raise ValueError(f"config.model.dtype={name!r}: expected 'float32' or 'bfloat16'") from None


def check_config(config) -> None:
  """One-line errors naming the config key, before any data is read or anything compiles."""
  mods = tuple(config.modalities)
  if not mods:
    raise ValueError('config.modalities: empty; expected some of ' + ', '.join(MODALITIES))
  for m in mods:
    if m not in MODALITIES:
      raise ValueError(f'config.modalities: unknown modality {m!r}; expected some of {MODALITIES}')
    if m not in config.data.shares:
      raise ValueError(f'config.data.shares: no share for enabled modality {m!r}')
  if config.batch_size <= 0:
    raise ValueError(f'config.batch_size={config.batch_size}: must be positive')
  if config.data.image_size < 32:
    raise ValueError(f'config.data.image_size={config.data.image_size}: must be at least 32')
  if config.model.depth not in (18, 34, 50, 101, 152):
    raise ValueError(f'config.model.depth={config.model.depth}: expected 18, 34, 50, 101 or 152')
  if config.loss.temperature <= 0:
    raise ValueError(f'config.loss.temperature={config.loss.temperature}: must be positive')
  if not 0 <= config.loss.gamma < 1:
    raise ValueError(f'config.loss.gamma={config.loss.gamma}: must lie in [0, 1)')
  if config.loss.get('spatial_weight', 0) < 0:
    raise ValueError(f'config.loss.spatial_weight={config.loss.spatial_weight}: must be >= 0')
  if config.loss.get('spatial_weight', 0) > 0 and not config.model.get('landmark_head', False):
    raise ValueError(f'config.loss.spatial_weight={config.loss.spatial_weight} needs '
                     'config.model.landmark_head=True (or set the weight to 0)')
  if config.optim.lr <= 0:
    raise ValueError(f'config.optim.lr={config.optim.lr}: must be positive')
  if config.total_steps < 0 or config.num_epochs <= 0:
    raise ValueError('config.total_steps / config.num_epochs: must be positive')
  compute_dtype(config.model.dtype)
