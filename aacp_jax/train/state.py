"""Train state, optimiser and the config checks that run before anything compiles."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from aacp_jax import losses
from aacp_jax.data import landmarks as landmarks_lib
from aacp_jax.modalities import IN_CHANNELS, MODALITIES  # noqa: F401  (re-exported)

TRIPLET_MINING = ('hardest', 'semihard')


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


def cross_modal_schedule(loss_cfg, steps_per_epoch: int, epoch_scale: float = 1.0):
  """step -> lambda_cross (a traced float32 scalar), from `losses.curriculum_weight`.

  epoch = step / steps_per_epoch (an epoch is the smallest modality's pass, as `num_epochs`);
  the configured start/end epochs are multiplied by `epoch_scale` (the run's length in epochs
  over `num_epochs` when `total_steps` sets the length), so a shorter run keeps the curriculum's
  shape: off for the first quarter, ramping in the second, full in the second half.
  """
  start = float(loss_cfg.cross_start_epoch) * epoch_scale
  end = float(loss_cfg.cross_end_epoch) * epoch_scale
  peak = float(loss_cfg.cross_weight)

  def schedule(step):
    epoch = jnp.asarray(step, jnp.float32) / jnp.float32(max(int(steps_per_epoch), 1))
    return losses.curriculum_weight(epoch, start, end, peak)
  return schedule


def compute_dtype(name: str):
  try:
    return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]
  except KeyError:
    raise ValueError(f"config.model.dtype={name!r}: expected 'float32' or 'bfloat16'") from None


def check_modalities(config) -> None:
  """config.modalities is a non-empty subset of MODALITIES, each with a batch share."""
  mods = tuple(config.modalities)
  if not mods:
    raise ValueError('config.modalities: empty; expected some of ' + ', '.join(MODALITIES))
  for m in mods:
    if m not in MODALITIES:
      raise ValueError(f'config.modalities: unknown modality {m!r}; expected some of {MODALITIES}')
    if m not in config.data.shares:
      raise ValueError(f'config.data.shares: no share for enabled modality {m!r}')


def apply_if_finite(state: TrainState, grads, batch_stats, loss, tx):
  """The optimiser update, kept only when the loss and gradient norm are finite.

  Returns (new_state, finite, grad_norm, updates). A non-finite step leaves the state as it was
  (step still advances), so the checkpoint written when the loop stops on it is usable.
  """
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state))
  return new_state, finite, grad_norm, updates


def check_config(config) -> None:
  """One-line errors naming the config key, before any data is read or anything compiles."""
  check_modalities(config)
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
  _check_modules(config)
  if config.optim.lr <= 0:
    raise ValueError(f'config.optim.lr={config.optim.lr}: must be positive')
  if config.total_steps < 0 or config.num_epochs <= 0:
    raise ValueError('config.total_steps / config.num_epochs: must be positive')
  compute_dtype(config.model.dtype)


def _check_modules(config) -> None:
  """The optional modules 4-7 (pyramid, ROI attention, triplet, cross-modal)."""
  loss, model = config.loss, config.model
  weights = tuple(loss.get('multiscale_weights', ()))
  if model.get('fpn', False):
    if len(tuple(model.fpn_channels)) != 4 or min(model.fpn_channels) <= 0:
      raise ValueError(f'config.model.fpn_channels={tuple(model.fpn_channels)}: expected 4 '
                       'positive widths for p2..p5')
    if len(tuple(model.level_projector)) < 1:
      raise ValueError('config.model.level_projector: expected at least one width')
  if weights:
    if len(weights) != 4 or min(weights) < 0:
      raise ValueError(f'config.loss.multiscale_weights={weights}: expected 4 weights >= 0 '
                       '(p2, p3, p4, p5)')
    if max(weights) > 0 and not model.get('fpn', False):
      raise ValueError(f'config.loss.multiscale_weights={weights} needs config.model.fpn=True '
                       '(or all weights 0)')
  if model.get('roi_attention', False) and model.get('roi_features', 1) <= 0:
    raise ValueError(f'config.model.roi_features={model.roi_features}: must be positive')
  if loss.get('triplet_weight', 0) < 0 or loss.get('triplet_margin', 0) < 0:
    raise ValueError(f'config.loss.triplet_weight / triplet_margin: must be >= 0, got '
                     f'{loss.triplet_weight} / {loss.triplet_margin}')
  if loss.get('triplet_weight', 0) > 0 and loss.triplet_mining not in TRIPLET_MINING:
    raise ValueError(f'config.loss.triplet_mining={loss.triplet_mining!r}: expected one of '
                     f'{TRIPLET_MINING}')
  if loss.get('cross_weight', 0) < 0:
    raise ValueError(f'config.loss.cross_weight={loss.cross_weight}: must be >= 0')
  if loss.get('cross_weight', 0) > 0:
    if loss.cross_delta <= 0:
      raise ValueError(f'config.loss.cross_delta={loss.cross_delta}: must be positive')
    if not 0 <= loss.cross_start_epoch <= loss.cross_end_epoch:
      raise ValueError(f'config.loss.cross_start_epoch={loss.cross_start_epoch} / '
                       f'cross_end_epoch={loss.cross_end_epoch}: need 0 <= start <= end')
    if not 0 <= loss.cross_organ_weight <= 1:
      raise ValueError(f'config.loss.cross_organ_weight={loss.cross_organ_weight}: must lie '
                       'in [0, 1]')
    if loss.cross_min_common < 1:
      raise ValueError(f'config.loss.cross_min_common={loss.cross_min_common}: must be >= 1')
    for name in loss.cross_landmarks:
      try:
        landmarks_lib.landmark_index(name)
      except KeyError as e:
        raise ValueError(f'config.loss.cross_landmarks: {e.args[0]}') from None


def cross_landmark_mask(loss_cfg):
  """(K,) bool of the named cross-modal landmark set; the whole vocabulary when empty."""
  names = tuple(loss_cfg.get('cross_landmarks', ()))
  if not names:
    return np.ones(len(landmarks_lib.LANDMARKS), bool)
  mask = np.zeros(len(landmarks_lib.LANDMARKS), bool)
  mask[[landmarks_lib.landmark_index(n) for n in names]] = True
  return mask
