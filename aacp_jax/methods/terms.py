"""The terms of the AACP loss, each a function returning `(loss, metrics)`.

Within-modality terms take `(ctx, m)` and return modality m's unweighted value; the cross-modal
term takes `ctx` alone. `aacp.views_loss` weights and sums them (its docstring has the formula).
The formulas of the underlying losses are in `aacp_jax.losses`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from aacp_jax import losses, precision
from aacp_jax.augment import spatial
from aacp_jax.data import landmarks as landmarks_lib
from aacp_jax.modalities import MODALITY_IDS
from aacp_jax.models import fpn as fpn_lib


@dataclasses.dataclass(frozen=True)
class Context:
  """What every term sees at one step.

  out: the model's output per modality on [view 1; view 2]; views: `aacp.two_views` per
  modality; batch: the raw global batch; neg_weights: per modality, the structure-aware negative
  weights (None when config.loss.gamma is 0); z_views: per modality, (z1, z2) the float32
  projections of view 1 and view 2 (`views_loss` splits them once per modality, so every term's
  gradient reaches z through the same node; filled on first use otherwise).
  """

  out: dict
  views: dict
  batch: dict
  config: Any
  neg_weights: dict
  z_views: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Term:
  """A within-modality term: `fn(ctx, m) -> (loss_m, metrics)`, weighted by `weight(config)`
  and modality m's share of the global batch; `enabled(config)` says whether the run has it."""

  name: str
  fn: Callable[[Context, str], Any]
  weight: Callable[[Any], float]
  enabled: Callable[[Any], bool]


def _contrastive_accuracy(z1, z2):
  """Fraction of view-1 rows whose most similar view-2 row is their own positive."""
  hits = jnp.argmax(z1 @ z2.T, axis=1) == jnp.arange(z1.shape[0])
  return jnp.mean(hits.astype(precision.real()))


def z_views(ctx, m):
  """(z1, z2) of modality m, split once and shared by every term that reads them."""
  if m not in ctx.z_views:
    ctx.z_views[m] = jnp.split(ctx.out[m]['z'].astype(precision.real()), 2, axis=0)
  return ctx.z_views[m]


def contrast(ctx, m):
  """InfoNCE on the projections z of modality m (`losses.info_nce`, global negatives)."""
  z1, z2 = z_views(ctx, m)
  l_m = losses.info_nce(z1, z2, ctx.config.loss.temperature, ctx.neg_weights[m])
  return l_m, {f'contrast_{m}': l_m, f'pos_acc_{m}': _contrastive_accuracy(z1, z2)}


def multiscale(ctx, m):
  """`losses.multiscale_info_nce` over the FPN levels' projections."""
  levels = [jnp.split(ctx.out[m]['levels'][name], 2, axis=0) for name in fpn_lib.LEVELS]
  ms_m, per_level = losses.multiscale_info_nce(
    [a for a, _ in levels],
    [b for _, b in levels],
    multiscale_weights(ctx.config),
    ctx.config.loss.temperature,
    ctx.neg_weights[m],
  )
  metrics = {f'multiscale_{m}': ms_m}
  for name, l in zip(fpn_lib.LEVELS, per_level):
    metrics[f'multiscale_{name}_{m}'] = l
  return ms_m, metrics


def spatial_term(ctx, m):
  """Mean over the two views of `losses.spatial_consistency`.

  pred: the landmark head on [view1; view2] (2B, K, 2); ref: the record's landmarks (original
  frame; the frozen detector's output for real data, ground truth for phantoms); each view's
  predictions are mapped back with the inverse of its augmentation's linear part.
  """
  pred, views_m, batch_m = ctx.out[m]['landmarks'], ctx.views[m], ctx.batch[m]
  p1, p2 = jnp.split(pred, 2, axis=0)
  v1, v2 = jnp.split(views_m['landmark_visible'], 2, axis=0)
  a1, a2 = jnp.split(jax.vmap(spatial.inv2)(views_m['linear'].astype(precision.real())), 2, axis=0)
  ref, ref_vis = batch_m['landmarks'], batch_m['landmark_visible']
  s_m = 0.5 * (
    losses.spatial_consistency(p1, v1, ref, ref_vis, a1)
    + losses.spatial_consistency(p2, v2, ref, ref_vis, a2)
  )
  return s_m, {f'spatial_{m}': s_m}


def triplet(ctx, m):
  """`losses.triplet` with anchor view 1 and positive view 2 of the projections."""
  z1, z2 = z_views(ctx, m)
  t_m = losses.triplet(z1, z2, ctx.config.loss.triplet_margin, ctx.config.loss.triplet_mining)
  return t_m, {f'triplet_{m}': t_m}


def cross_modal(ctx):
  """`losses.cross_modal_info_nce` over both views of every modality in the shared space.

  Rows are [view 1; view 2] of each modality in config order; a sample's landmarks and organs
  serve both its views. Metrics: cross and cross_anchor_frac (rows with a pseudo-positive).
  """
  config, out, batch = ctx.config, ctx.out, ctx.batch
  mods = config.modalities
  z = jnp.concatenate([out[m]['z'].astype(precision.real()) for m in mods], axis=0)
  both = lambda key: jnp.concatenate([jnp.concatenate([batch[m][key]] * 2) for m in mods])
  ids = jnp.concatenate(
    [jnp.full((2 * batch[m]['image'].shape[0],), MODALITY_IDS[m]) for m in mods]
  )
  pairs = losses.cross_modal_pairs(
    both('landmarks_canonical'),
    both('landmark_visible'),
    both('organs'),
    ids,
    config.loss.cross_delta,
    landmark_mask=cross_landmark_mask(config.loss),
    min_common=int(config.loss.cross_min_common),
    organ_weight=float(config.loss.cross_organ_weight),
  )
  frac = jnp.mean(jnp.any(pairs > 0, axis=1).astype(precision.real()))
  c = losses.cross_modal_info_nce(z, ids, pairs, config.loss.temperature)
  return c, {'cross': c, 'cross_anchor_frac': frac}


def multiscale_weights(config) -> tuple:
  return tuple(config.loss.get('multiscale_weights', ())) if config.model.get('fpn') else ()


def cross_enabled(config) -> bool:
  """The cross-modal term needs a weight and at least two modalities to pair."""
  return config.loss.get('cross_weight', 0.0) > 0 and len(config.modalities) > 1


def cross_landmark_mask(loss_cfg):
  """(K,) bool of the named cross-modal landmark set; the whole vocabulary when empty."""
  names = tuple(loss_cfg.get('cross_landmarks', ()))
  if not names:
    return np.ones(len(landmarks_lib.LANDMARKS), bool)
  mask = np.zeros(len(landmarks_lib.LANDMARKS), bool)
  mask[[landmarks_lib.landmark_index(n) for n in names]] = True
  return mask


# The within-modality terms in the order they are summed (the order is part of what a run
# computes: floating-point sums depend on it).
MODALITY_TERMS = (
  Term('contrast', contrast, weight=lambda c: 1.0, enabled=lambda c: True),
  Term(
    'multiscale',
    multiscale,
    weight=lambda c: 1.0,
    enabled=lambda c: any(w > 0 for w in multiscale_weights(c)),
  ),
  Term(
    'spatial',
    spatial_term,
    weight=lambda c: float(c.loss.get('spatial_weight', 0.0)),
    enabled=lambda c: float(c.loss.get('spatial_weight', 0.0)) > 0,
  ),
  Term(
    'triplet',
    triplet,
    weight=lambda c: float(c.loss.get('triplet_weight', 0.0)),
    enabled=lambda c: float(c.loss.get('triplet_weight', 0.0)) > 0,
  ),
)
