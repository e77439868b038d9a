"""Train state, optimiser, the finite-update rule and the checks every experiment shares."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from aacp_jax import sharding
from aacp_jax.modalities import MODALITIES
from aacp_jax.models import layers


@flax.struct.dataclass
class TrainState:
  """step: optimiser steps taken (skipped ones included); params, batch_stats, opt_state: the
  model's; extra: the method's own state (a momentum encoder, a queue), {} when it has none;
  nonfinite: how many steps were skipped as not finite (`apply_if_finite`), nonfinite_last:
  the number of the last one (1-based, as logged; 0 = none)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  extra: Any
  nonfinite: jax.Array
  nonfinite_last: jax.Array

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
      0.0, optim_cfg.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1)
    )
  else:
    schedule = optax.cosine_decay_schedule(optim_cfg.lr, decay_steps=max(total_steps, 1))
  parts = []
  if optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  if optim_cfg.weight_decay > 0:
    parts.append(optax.add_decayed_weights(optim_cfg.weight_decay))
  parts.append(optax.adam(schedule))
  return optax.chain(*parts), schedule


def create_state(model, tx, mesh, inputs, seed: int, init_extra=None):
  """(state, shardings): parameters initialised by a jitted init that places them, replicated,
  on the mesh. `inputs`: model.init's dummy images (`models.inputs.dummy_inputs`);
  `init_extra(variables)`: the method's extra state (default none)."""

  def init(key):
    variables = model.init(key, inputs, train=False)
    params = variables['params']
    extra = {} if init_extra is None else init_extra(variables)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
      extra=extra,
      nonfinite=jnp.zeros((), jnp.int32),
      nonfinite_last=jnp.zeros((), jnp.int32),
    )

  key = jax.random.key(seed)
  abstract = jax.eval_shape(init, key)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  state = jax.jit(init, out_shardings=shardings)(key)
  return state, shardings


def apply_if_finite(state: TrainState, grads, batch_stats, extra, loss, tx):
  """The optimiser update, kept only when the loss and gradient norm are finite.

  Returns (new_state, finite, grad_norm, updates). A non-finite step leaves the parameters,
  statistics, optimiser and extra state as they were, and counts itself in `nonfinite` (the
  step still advances), so the checkpoint written when the loop stops on it is usable.
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
    opt_state=keep(opt_state, state.opt_state),
    extra=keep(extra, state.extra),
    nonfinite=state.nonfinite + jnp.where(finite, 0, 1).astype(jnp.int32),
    nonfinite_last=jnp.where(finite, state.nonfinite_last, state.step + 1),
  )
  return new_state, finite, grad_norm, updates


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


def check_common(config) -> None:
  """The keys every experiment's loop reads: one-line errors naming them."""
  check_modalities(config)
  if config.batch_size <= 0:
    raise ValueError(f'config.batch_size={config.batch_size}: must be positive')
  if config.optim.lr <= 0:
    raise ValueError(f'config.optim.lr={config.optim.lr}: must be positive')
  if config.total_steps < 0 or config.get('num_epochs', 1) <= 0:
    raise ValueError('config.total_steps / config.num_epochs: must be positive')
  if config.log_every_steps <= 0:
    raise ValueError(f'config.log_every_steps={config.log_every_steps}: must be positive')
  if config.checkpoint_every_steps <= 0:
    raise ValueError(
      f'config.checkpoint_every_steps={config.checkpoint_every_steps}: must be positive'
    )
  if config.keep_checkpoints < 1:
    raise ValueError(f'config.keep_checkpoints={config.keep_checkpoints}: must be >= 1')
  layers.compute_dtype(config.model.dtype)
