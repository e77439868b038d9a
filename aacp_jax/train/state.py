"""Train state, optimiser, the finite-update rule and the checks every experiment shares."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from aacp_jax import config_checks, sharding
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


# `config.optim.name`: the update rule. 'adam' is the default and the paper's; 'adamw' is MAE's
# recipe (He et al. 2022: AdamW, betas (0.9, 0.95), decoupled decay 0.05 off the norms, biases,
# tokens and positions). Configs without the key (fine-tuning, the detector) get 'adam'.
OPTIMIZERS = ('adam', 'adamw')
# Parameters AdamW never decays, by name, beside every parameter of at most one dimension (norm
# scales and biases, BatchNorm's too): MAE's `param_groups_weight_decay` and timm's
# `no_weight_decay` set (position embeddings, class and mask tokens). Decay pulls these towards 0,
# which for a LayerNorm scale or a token is a wrong prior, not regularisation.
NO_DECAY_NAMES = ('pos_embed', 'cls_token', 'mask_token')


def decay_mask(params):
  """The pytree of `params` with True where AdamW's decoupled decay applies: leaves of at least
  two dimensions whose path holds none of NO_DECAY_NAMES."""

  def decays(path, leaf):
    names = {str(getattr(k, 'key', getattr(k, 'name', k))) for k in path}
    return len(leaf.shape) > 1 and not names & set(NO_DECAY_NAMES)

  return jax.tree_util.tree_map_with_path(decays, params)


def warmup_steps(optim_cfg, total_steps: int) -> int:
  """The linear warmup's length: `warmup_steps` when > 0, else `warmup_fraction` (default 0) of
  the run, rounded (MAE's 40 of 800 epochs is a fraction, whatever an epoch's steps are)."""
  warmup = int(optim_cfg.warmup_steps)
  if warmup > 0:
    return warmup
  return int(round(float(optim_cfg.get('warmup_fraction', 0.0)) * total_steps))


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """The optimiser `optim_cfg.name` with a cosine schedule and optional warmup (paper 3.5.1).

  'adam' (the default): the decay is added to the gradient before Adam (torch.optim.Adam's
  `weight_decay`), the optimiser the paper names; AdamW's decoupled decay would be a different
  method. 'adamw': optax.adamw, p <- p - lr (m_hat / (sqrt(v_hat) + eps) + wd p), with the decay
  only where `decay_mask` says (torch.optim.AdamW's update). `b1`, `b2`: Adam's betas (default
  0.9, 0.999, optax's and torch's).
  """
  name = optim_cfg.get('name', 'adam')
  if name not in OPTIMIZERS:
    raise ValueError(f'config.optim.name={name!r}: expected one of {", ".join(OPTIMIZERS)}')
  warmup = warmup_steps(optim_cfg, total_steps)
  if warmup > 0:
    schedule = optax.warmup_cosine_decay_schedule(
      0.0, optim_cfg.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1)
    )
  else:
    schedule = optax.cosine_decay_schedule(optim_cfg.lr, decay_steps=max(total_steps, 1))
  betas = dict(b1=float(optim_cfg.get('b1', 0.9)), b2=float(optim_cfg.get('b2', 0.999)))
  parts = []
  if optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  if name == 'adamw':
    decay = float(optim_cfg.weight_decay)
    parts.append(optax.adamw(schedule, **betas, weight_decay=decay, mask=decay_mask))
  else:
    if optim_cfg.weight_decay > 0:
      parts.append(optax.add_decayed_weights(optim_cfg.weight_decay))
    parts.append(optax.adam(schedule, **betas))
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
  """The optimiser update, kept only when the loss, the gradient norm, the update norm and every
  new parameter are finite.

  Returns (new_state, finite, grad_norm, updates). A non-finite step leaves the parameters,
  statistics, optimiser and extra state as they were, and counts itself in `nonfinite` (the
  step still advances), so the checkpoint written when the loop stops on it is usable.
  The loss and gradient alone miss a broken optimiser: with lr = NaN both are finite and every
  parameter is NaN after the step; with lr = 1e30 the update norm overflows. A finite step
  computes exactly what it did without these checks (they only choose between two states).
  """
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # Norms, not a per-leaf `all(isfinite)` chain: one flag reduced from every leaf that way made
  # XLA:CPU compile the full step 5x longer. A norm is finite iff every element is (and the
  # sum of squares does not overflow: parameters near 1e19 in float32 count as not finite).
  finite = (
    jnp.isfinite(loss)
    & jnp.isfinite(grad_norm)
    & jnp.isfinite(optax.tree.norm(updates))
    & jnp.isfinite(optax.tree.norm(params))
  )
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
  """config.modalities is a non-empty subset of MODALITIES, each with a positive batch share."""
  mods = tuple(config.modalities)
  if not mods:
    raise ValueError('config.modalities: empty; expected some of ' + ', '.join(MODALITIES))
  for m in mods:
    if m not in MODALITIES:
      raise ValueError(f'config.modalities: unknown modality {m!r}; expected some of {MODALITIES}')
    if m not in config.data.shares:
      raise ValueError(f'config.data.shares: no share for enabled modality {m!r}')
  # A zero or negative share would give an empty batch or a zero sum to divide by.
  config_checks.check(config, [(f'data.shares.{m}', config_checks.POSITIVE) for m in mods])


# The keys every experiment's loop reads, with the values a run can use.
COMMON_RULES = (
  ('seed', config_checks.INDEX),
  ('batch_size', config_checks.COUNT),
  ('total_steps', config_checks.INDEX),
  ('num_epochs', config_checks.COUNT),
  ('log_every_steps', config_checks.COUNT),
  ('checkpoint_every_steps', config_checks.COUNT),
  ('keep_checkpoints', config_checks.COUNT),
  ('optim.lr', config_checks.POSITIVE),
  ('optim.weight_decay', config_checks.NON_NEGATIVE),
  ('optim.grad_clip', config_checks.NON_NEGATIVE),  # 0 = off
  ('optim.warmup_steps', config_checks.INDEX),
  # Optional: configs without them get Adam's defaults (`make_optimizer`).
  ('optim.b1', config_checks.Number(lo=0, hi=1, open_hi=True)),
  ('optim.b2', config_checks.Number(lo=0, hi=1, open_hi=True)),
  ('optim.warmup_fraction', config_checks.Number(lo=0, hi=1, open_hi=True)),
  ('data.image_size', config_checks.COUNT),
  ('data.worker_count', config_checks.INDEX),
) + config_checks.AUGMENT_RULES


_OPTIONAL_OPTIM = ('optim.b1', 'optim.b2', 'optim.warmup_fraction')


def check_common(config) -> None:
  """The keys every experiment's loop reads: one-line errors naming them."""
  config_checks.check_finite(config)
  check_modalities(config)
  # num_epochs: experiments without epochs (the landmark detector) have only total_steps.
  config_checks.check(config, COMMON_RULES, optional=('num_epochs',) + _OPTIONAL_OPTIM)
  name = config.optim.get('name', 'adam')
  if name not in OPTIMIZERS:
    raise ValueError(f'config.optim.name={name!r}: expected one of {", ".join(OPTIMIZERS)}')
  phantoms = config.data.get('phantoms') or {}
  config_checks.check(config, [(f'data.phantoms.{s}', config_checks.COUNT) for s in phantoms])
  layers.compute_dtype(config.model.dtype)
