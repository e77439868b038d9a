"""The pretraining step: a pure function of (state, global batch), jitted over the mesh.

Augmentation runs inside the step on device (byol style): the host only reads and batches raw
records, and the two views never leave the accelerator.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from aacp_jax import augment, losses
from aacp_jax.augment import spatial
from aacp_jax.train.state import TrainState

_MODALITY_IDS = {'ct': 0, 'mri': 1, 'xray': 2}


def two_views(key, batch_m, modality, aug_cfg):
  """Two independently augmented views of one modality's raw batch.

  Returns {'image', 'landmarks', 'landmark_visible', 'linear'}, each stacked [view1; view2]:
  the images, the landmarks and their visibility after augmentation, and the per-sample 2x2
  `linear` part of the transform (original -> augmented frame).
  """
  images = batch_m['image'].astype(jnp.float32)
  parts = [augment.augment_batch(k, images, batch_m['landmarks'], batch_m['landmark_visible'],
                                 modality, aug_cfg, return_transform=True)
           for k in jax.random.split(key)]
  stacked = [jnp.concatenate(p, axis=0) for p in zip(*parts)]
  return dict(zip(('image', 'landmarks', 'landmark_visible', 'linear'), stacked))


def make_views(key, batch, config):
  """{m: two_views(...)} for every enabled modality (the step's RNG)."""
  return {m: two_views(jax.random.fold_in(key, _MODALITY_IDS[m]), batch[m], m, config.augment)
          for m in config.modalities}


def _contrastive_accuracy(z1, z2):
  """Fraction of view-1 rows whose most similar view-2 row is their own positive."""
  hits = jnp.argmax(z1 @ z2.T, axis=1) == jnp.arange(z1.shape[0])
  return jnp.mean(hits.astype(jnp.float32))


def views_loss(params, batch_stats, batch, views, *, model, config):
  """The loss on already augmented views (`make_views`); see `loss_fn`."""
  out, new_vars = model.apply(
      {'params': params, 'batch_stats': batch_stats}, {m: views[m]['image'] for m in views},
      train=True, mutable=['batch_stats'])
  total_n = sum(batch[m]['image'].shape[0] for m in config.modalities)
  lam = float(config.loss.get('spatial_weight', 0.0))
  loss = 0.0
  metrics = {}
  for m in config.modalities:
    z = out[m]['z'].astype(jnp.float32)
    z1, z2 = jnp.split(z, 2, axis=0)
    weights = None
    if config.loss.gamma > 0:
      weights = losses.structure_neg_weights(
          batch[m]['landmarks_canonical'], batch[m]['landmark_visible'],
          config.loss.gamma, config.loss.sigma)
    l_m = losses.info_nce(z1, z2, config.loss.temperature, weights)
    share = batch[m]['image'].shape[0] / total_n
    loss = loss + share * l_m
    metrics[f'contrast_{m}'] = l_m
    metrics[f'pos_acc_{m}'] = _contrastive_accuracy(z1, z2)
    if lam > 0:
      s_m = spatial_term(out[m]['landmarks'], views[m], batch[m])
      loss = loss + lam * share * s_m
      metrics[f'spatial_{m}'] = s_m
  metrics['loss'] = loss
  return loss, (new_vars['batch_stats'], metrics)


def spatial_term(pred, views_m, batch_m):
  """Mean over the two views of `losses.spatial_consistency`.

  pred: the landmark head on [view1; view2] (2B, K, 2); ref: the record's landmarks (original
  frame; the frozen detector's output for real data, ground truth for phantoms); each view's
  predictions are mapped back with the inverse of its augmentation's linear part.
  """
  p1, p2 = jnp.split(pred, 2, axis=0)
  v1, v2 = jnp.split(views_m['landmark_visible'], 2, axis=0)
  a1, a2 = jnp.split(jax.vmap(spatial.inv2)(views_m['linear'].astype(jnp.float32)), 2, axis=0)
  ref, ref_vis = batch_m['landmarks'], batch_m['landmark_visible']
  return 0.5 * (losses.spatial_consistency(p1, v1, ref, ref_vis, a1)
                + losses.spatial_consistency(p2, v2, ref, ref_vis, a2))


def loss_fn(params, batch_stats, batch, key, *, model, config):
  """Sum over modalities of InfoNCE weighted by each modality's share of the batch, plus
  `config.loss.spatial_weight` times the (equally share-weighted) spatial-consistency term.

  Negatives are the other examples of the same modality across the whole global batch; examples
  of other modalities are left out, as cross-modal pairs belong to the alignment term (DESIGN.md).
  """
  views = make_views(key, batch, config)
  return views_loss(params, batch_stats, batch, views, model=model, config=config)


def train_step(state: TrainState, batch, *, model, tx, schedule, config):
  key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  grad_fn = jax.value_and_grad(
      functools.partial(loss_fn, model=model, config=config), has_aux=True)
  (loss, (batch_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch, key)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # A non-finite step leaves the state as it was, so the checkpoint written on stop is usable.
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state))
  metrics.update(
      grad_norm=grad_norm,
      param_norm=optax.tree.norm(state.params),
      update_norm=optax.tree.norm(updates),
      lr=schedule(state.step),
      finite=finite.astype(jnp.float32))
  return new_state, metrics
