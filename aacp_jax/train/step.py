"""The train step every experiment shares: a pure function of (state, global batch), jitted over
the mesh by `train.loop`. The experiment's loss decides what is computed; this decides how the
update is applied and what is logged about it."""

import jax
import jax.numpy as jnp
import optax

from aacp_jax.train import state as state_lib
from aacp_jax.train.state import TrainState


def train_step(
  state: TrainState, batch, *, loss_fn, tx, schedule, seed: int, schedules=None, after_update=None
):
  """One optimiser step.

  loss_fn(params, batch_stats, extra, batch, key, scheduled) -> (loss, (batch_stats, extra,
  metrics)) (`methods.base.LossFn`); key = fold_in(key(seed), step), so a resumed run draws the
  same augmentation as an uninterrupted one; scheduled = schedules(step) (curriculum weights;
  {} when None), computed before differentiation: it depends on the step alone. after_update(state) -> state runs after the
  update (a momentum encoder's EMA) and is kept only when the step is finite. Returns
  (new_state, metrics) with the loss's metrics plus grad_norm, param_norm, update_norm, lr,
  finite (1.0 or 0.0) and nonfinite_steps (skipped so far).
  """
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  scheduled = {} if schedules is None else schedules(state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (batch_stats, extra, metrics)), grads = grad_fn(
    state.params, state.batch_stats, state.extra, batch, key, scheduled
  )
  new_state, finite, grad_norm, updates = state_lib.apply_if_finite(
    state, grads, batch_stats, extra, loss, tx
  )
  if after_update is not None:
    updated = after_update(new_state)
    new_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), updated, new_state)
  metrics.update(
    grad_norm=grad_norm,
    param_norm=optax.tree.norm(state.params),
    update_norm=optax.tree.norm(updates),
    lr=schedule(state.step),
    finite=finite.astype(jnp.float32),
    nonfinite_steps=new_state.nonfinite,
  )
  return new_state, metrics
