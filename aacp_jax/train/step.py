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
from aacp_jax.models import fpn as fpn_lib
from aacp_jax.train import state as state_lib
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


BATCH_KEYS = ('image', 'landmarks', 'landmark_visible', 'landmarks_canonical', 'organs')


def check_batch(batch, config):
  """One-line error when the batch lacks a modality the config enables, or a key of one."""
  have = sorted(batch) if hasattr(batch, 'keys') else type(batch).__name__
  missing = [m for m in config.modalities if m not in batch]
  if missing:
    raise ValueError(f'batch has modalities {have} but config.modalities enables '
                     f'{tuple(config.modalities)}: missing {missing}; each needs keys {BATCH_KEYS}')
  for m in config.modalities:
    lacking = [k for k in BATCH_KEYS if k not in batch[m]]
    if lacking:
      raise ValueError(f'batch[{m!r}] lacks keys {lacking}; expected {BATCH_KEYS}')


def views_loss(params, batch_stats, batch, views, *, model, config, cross_weight=None):
  """The loss on already augmented views (`make_views`); see `loss_fn`.

  cross_weight: lambda_cross at this step (a scalar; None = config.loss.cross_weight, the
  curriculum's plateau).
  """
  check_batch(batch, config)
  out, new_vars = model.apply(
      {'params': params, 'batch_stats': batch_stats}, {m: views[m]['image'] for m in views},
      train=True, mutable=['batch_stats'])
  total_n = sum(batch[m]['image'].shape[0] for m in config.modalities)
  lam = float(config.loss.get('spatial_weight', 0.0))
  lam_triplet = float(config.loss.get('triplet_weight', 0.0))
  ms_weights = tuple(config.loss.get('multiscale_weights', ())) if config.model.get('fpn') else ()
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
    if any(w > 0 for w in ms_weights):
      levels = [jnp.split(out[m]['levels'][name], 2, axis=0) for name in fpn_lib.LEVELS]
      ms_m, per_level = losses.multiscale_info_nce(
          [a for a, _ in levels], [b for _, b in levels], ms_weights, config.loss.temperature,
          weights)
      loss = loss + share * ms_m
      metrics[f'multiscale_{m}'] = ms_m
      for name, l in zip(fpn_lib.LEVELS, per_level):
        metrics[f'multiscale_{name}_{m}'] = l
    if lam > 0:
      s_m = spatial_term(out[m]['landmarks'], views[m], batch[m])
      loss = loss + lam * share * s_m
      metrics[f'spatial_{m}'] = s_m
    if lam_triplet > 0:
      t_m = losses.triplet(z1, z2, config.loss.triplet_margin, config.loss.triplet_mining)
      loss = loss + lam_triplet * share * t_m
      metrics[f'triplet_{m}'] = t_m
  if cross_enabled(config):
    lam_cross = jnp.asarray(config.loss.cross_weight if cross_weight is None else cross_weight,
                            jnp.float32)
    c, frac = cross_term(out, batch, config)
    loss = loss + lam_cross * c
    metrics.update(cross=c, cross_weight=lam_cross, cross_anchor_frac=frac)
  metrics['loss'] = loss
  return loss, (new_vars['batch_stats'], metrics)


def cross_enabled(config) -> bool:
  """The cross-modal term needs a weight and at least two modalities to pair."""
  return config.loss.get('cross_weight', 0.0) > 0 and len(config.modalities) > 1


def cross_term(out, batch, config):
  """`losses.cross_modal_info_nce` over both views of every modality in the shared space.

  Rows are [view 1; view 2] of each modality in config order; a sample's landmarks and organs
  serve both its views. Returns (loss, fraction of rows with at least one pseudo-positive).
  """
  mods = config.modalities
  z = jnp.concatenate([out[m]['z'].astype(jnp.float32) for m in mods], axis=0)
  both = lambda key: jnp.concatenate([jnp.concatenate([batch[m][key]] * 2) for m in mods])
  ids = jnp.concatenate([jnp.full((2 * batch[m]['image'].shape[0],), _MODALITY_IDS[m])
                         for m in mods])
  pairs = losses.cross_modal_pairs(
      both('landmarks_canonical'), both('landmark_visible'), both('organs'), ids,
      config.loss.cross_delta, landmark_mask=state_lib.cross_landmark_mask(config.loss),
      min_common=int(config.loss.cross_min_common),
      organ_weight=float(config.loss.cross_organ_weight))
  frac = jnp.mean(jnp.any(pairs > 0, axis=1).astype(jnp.float32))
  return losses.cross_modal_info_nce(z, ids, pairs, config.loss.temperature), frac


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


def loss_fn(params, batch_stats, batch, key, *, model, config, cross_weight=None):
  """The full pretraining loss, with share_m = modality m's fraction of the global batch:

    L = sum_m share_m (contrast_m + multiscale_m + lam_spatial spatial_m + lam_triplet triplet_m)
        + lam_cross(t) cross

  contrast_m: InfoNCE on z within modality m; multiscale_m: weighted InfoNCE per FPN level;
  spatial_m: spatial consistency of the landmark head; triplet_m: `losses.triplet` on (view 1,
  view 2); cross: `losses.cross_modal_info_nce` across modalities. Terms whose module is off are
  absent (and absent from the metrics). Within-modality negatives are the other examples of the
  same modality across the whole global batch; other modalities belong to the cross term.
  """
  check_batch(batch, config)
  views = make_views(key, batch, config)
  return views_loss(params, batch_stats, batch, views, model=model, config=config,
                    cross_weight=cross_weight)


def train_step(state: TrainState, batch, *, model, tx, schedule, config, cross_schedule=None):
  """One optimiser step. cross_schedule: step -> lambda_cross (`state.cross_modal_schedule`);
  None holds it at config.loss.cross_weight (benchmarks, tests)."""
  key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  cross_weight = None if cross_schedule is None else cross_schedule(state.step)
  grad_fn = jax.value_and_grad(
      functools.partial(loss_fn, model=model, config=config, cross_weight=cross_weight),
      has_aux=True)
  (loss, (batch_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch, key)
  new_state, finite, grad_norm, updates = state_lib.apply_if_finite(
      state, grads, batch_stats, loss, tx)
  metrics.update(
      grad_norm=grad_norm,
      param_norm=optax.tree.norm(state.params),
      update_norm=optax.tree.norm(updates),
      lr=schedule(state.step),
      finite=finite.astype(jnp.float32))
  return new_state, metrics
