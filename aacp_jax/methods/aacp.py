"""AACP, the paper's method: anatomy-aware contrastive pretraining (and SimCLR through it).

The model is `models.encoders.AACPModel` (one encoder per modality, a shared projector, optional
landmark head, FPN and ROI attention); the loss is a weighted sum of the terms in
`methods.terms`, each switched by the config (the Table 6 variants of configs/pretrain.py).
`simclr` is this method with every anatomy-aware part off.

Augmentation runs inside the step on device (byol style): the host only reads and batches raw
records, and the two views never leave the accelerator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aacp_jax import augment, config_checks, losses, precision
from aacp_jax.data import landmarks as landmarks_lib
from aacp_jax.methods import terms
from aacp_jax.methods.base import Method, RunInfo
from aacp_jax.modalities import MODALITY_IDS
from aacp_jax.models import encoders, resnet

TRIPLET_MINING = ('hardest', 'semihard')
BATCH_KEYS = ('image', 'landmarks', 'landmark_visible', 'landmarks_canonical', 'organs')


def build_model(config):
  return encoders.build_model(
    config.model, config.modalities, num_landmarks=len(landmarks_lib.LANDMARKS)
  )


def two_views(key, batch_m, modality, aug_cfg, out_size=None):
  """Two independently augmented views of one modality's raw batch, at `out_size`² (default:
  the batch's size; records padded by the pipeline carry their true size in 'extent').

  Returns {'image', 'landmarks', 'landmark_visible', 'linear'}, each stacked [view1; view2]:
  the images, the landmarks and their visibility after augmentation, and the per-sample 2x2
  `linear` part of the transform (original -> augmented frame).
  """
  images = batch_m['image'].astype(precision.real())
  parts = [
    augment.augment_batch(
      k,
      images,
      batch_m['landmarks'],
      batch_m['landmark_visible'],
      modality,
      aug_cfg,
      return_transform=True,
      extent=batch_m.get('extent'),
      out_size=out_size,
    )
    for k in jax.random.split(key)
  ]
  stacked = [jnp.concatenate(p, axis=0) for p in zip(*parts)]
  return dict(zip(('image', 'landmarks', 'landmark_visible', 'linear'), stacked))


def make_views(key, batch, config):
  """{m: two_views(...)} for every enabled modality (the step's RNG)."""
  return {
    m: two_views(
      jax.random.fold_in(key, MODALITY_IDS[m]),
      batch[m],
      m,
      config.augment,
      out_size=config.data.image_size,
    )
    for m in config.modalities
  }


def check_batch(batch, config):
  """One-line error when the batch lacks a modality the config enables, or a key of one."""
  have = sorted(batch) if hasattr(batch, 'keys') else type(batch).__name__
  missing = [m for m in config.modalities if m not in batch]
  if missing:
    raise ValueError(
      f'batch has modalities {have} but config.modalities enables '
      f'{tuple(config.modalities)}: missing {missing}; each needs keys {BATCH_KEYS}'
    )
  for m in config.modalities:
    lacking = [k for k in BATCH_KEYS if k not in batch[m]]
    if lacking:
      raise ValueError(f'batch[{m!r}] lacks keys {lacking}; expected {BATCH_KEYS}')


def views_loss(params, batch_stats, batch, views, *, model, config, cross_weight=None):
  """The loss on already augmented views (`make_views`), with share_m = modality m's fraction
  of the global batch:

    L = sum_m share_m (contrast_m + multiscale_m + lam_spatial spatial_m + lam_triplet triplet_m)
        + lam_cross(t) cross

  contrast_m: InfoNCE on z within modality m; multiscale_m: weighted InfoNCE per FPN level;
  spatial_m: spatial consistency of the landmark head; triplet_m: `losses.triplet` on (view 1,
  view 2); cross: `losses.cross_modal_info_nce` across modalities (`methods.terms`). Terms whose
  module is off are absent (and absent from the metrics). Within-modality negatives are the
  other examples of the same modality across the whole global batch; other modalities belong to
  the cross term. cross_weight: lambda_cross at this step (a scalar; None =
  config.loss.cross_weight, the curriculum's plateau).

  Returns (loss, (new batch_stats, metrics)).
  """
  out, new_vars = model.apply(
    {'params': params, 'batch_stats': batch_stats},
    {m: views[m]['image'] for m in views},
    train=True,
    mutable=['batch_stats'],
  )
  neg_weights = {m: None for m in config.modalities}
  if config.loss.gamma > 0:
    neg_weights = {
      m: losses.structure_neg_weights(
        batch[m]['landmarks_canonical'],
        batch[m]['landmark_visible'],
        config.loss.gamma,
        config.loss.sigma,
      )
      for m in config.modalities
    }
  ctx = terms.Context(out=out, views=views, batch=batch, config=config, neg_weights=neg_weights)
  active = [t for t in terms.MODALITY_TERMS if t.enabled(config)]
  total_n = sum(batch[m]['image'].shape[0] for m in config.modalities)
  loss = 0.0
  metrics = {}
  for m in config.modalities:
    share = batch[m]['image'].shape[0] / total_n
    terms.z_views(ctx, m)  # one split per modality, before any term (the old step's order)
    for term in active:
      value, term_metrics = term.fn(ctx, m)
      loss = loss + term.weight(config) * share * value
      metrics.update(term_metrics)
  if terms.cross_enabled(config):
    lam_cross = jnp.asarray(
      config.loss.cross_weight if cross_weight is None else cross_weight, precision.real()
    )
    value, term_metrics = terms.cross_modal(ctx)
    loss = loss + lam_cross * value
    metrics.update(term_metrics, cross_weight=lam_cross)
  metrics['loss'] = loss
  return loss, (new_vars['batch_stats'], metrics)


def loss_fn(params, batch_stats, batch, key, *, model, config, cross_weight=None):
  """`views_loss` on the two views `make_views` draws from `key` (the whole pretraining loss).

  The batch is checked first (`check_batch`), before anything is traced.
  """
  check_batch(batch, config)
  views = make_views(key, batch, config)
  return views_loss(
    params, batch_stats, batch, views, model=model, config=config, cross_weight=cross_weight
  )


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
    epoch = jnp.asarray(step, precision.real()) / precision.real()(max(int(steps_per_epoch), 1))
    return losses.curriculum_weight(epoch, start, end, peak)

  return schedule


def make_cross_schedule(config, epoch_steps: int, total_steps: int):
  """lambda_cross by step; the curriculum's epochs scale with the run when total_steps sets it.

  The configured epochs (50 -> 100 of 200) describe a num_epochs-long run. A run cut to
  total_steps (the demo: 300 steps = 37.5 epochs) keeps the same fractions of its length, so the
  term is actually trained; otherwise it would never switch on.
  """
  scale = 1.0
  if config.total_steps:
    scale = total_steps / (epoch_steps * config.num_epochs)
  return cross_modal_schedule(config.loss, epoch_steps, scale)


def make_schedules(config, run: RunInfo):
  """step -> {'cross_weight': lambda_cross}, the curriculum (`make_cross_schedule`)."""
  if config.loss.get('cross_weight', 0) > 0 and len(config.modalities) < 2:
    from absl import logging  # pylint: disable=g-import-not-at-top

    logging.warning(
      'config.loss.cross_weight=%s but only %s is enabled: no cross-modal pairs, the term is off.',
      config.loss.cross_weight,
      tuple(config.modalities),
    )
  cross_schedule = make_cross_schedule(config, run.steps_per_epoch, run.total_steps)
  return lambda step: {'cross_weight': cross_schedule(step)}


def make_loss(config, model, run: RunInfo):
  """The loop's loss: `loss_fn` with lambda_cross from `make_schedules`."""
  del run

  def loss(params, batch_stats, extra, batch, key, scheduled):
    value, (new_stats, metrics) = loss_fn(
      params,
      batch_stats,
      batch,
      key,
      model=model,
      config=config,
      cross_weight=scheduled['cross_weight'],
    )
    return value, (new_stats, extra, metrics)

  return loss


# The method's numeric keys (the loop's own are `train.state.COMMON_RULES`).
RULES = (
  ('data.image_size', config_checks.Number(lo=32, integer=True)),
  ('model.width', config_checks.COUNT),
  ('model.projector', config_checks.COUNT),
  ('loss.temperature', config_checks.POSITIVE),
  ('loss.gamma', config_checks.Number(lo=0, hi=1, open_hi=True)),
  ('loss.sigma', config_checks.POSITIVE),
  ('loss.spatial_weight', config_checks.NON_NEGATIVE),
  ('loss.multiscale_weights', config_checks.NON_NEGATIVE),
  ('loss.triplet_weight', config_checks.NON_NEGATIVE),
  ('loss.triplet_margin', config_checks.NON_NEGATIVE),
  ('loss.cross_weight', config_checks.NON_NEGATIVE),
  ('eval.batch_size', config_checks.COUNT),
  ('eval.bootstrap', config_checks.COUNT),
  ('eval.l2', config_checks.NON_NEGATIVE),  # 0 = chosen by cross-validation
)
# Read only when their module is on (fpn, roi_attention, cross_weight > 0).
FPN_RULES = (
  ('model.fpn_channels', config_checks.COUNT),
  ('model.level_projector', config_checks.COUNT),
)
CROSS_RULES = (
  ('loss.cross_delta', config_checks.POSITIVE),
  ('loss.cross_start_epoch', config_checks.NON_NEGATIVE),
  ('loss.cross_end_epoch', config_checks.NON_NEGATIVE),
  ('loss.cross_organ_weight', config_checks.UNIT),
  ('loss.cross_min_common', config_checks.COUNT),
)
# Keys an older config.json may lack (modules 4-7 came later); absent means off.
_OPTIONAL = (
  'loss.spatial_weight',
  'loss.multiscale_weights',
  'loss.triplet_weight',
  'loss.triplet_margin',
  'loss.cross_weight',
)


def check_arch(config) -> None:
  """model.arch must be 'resnet' ('' = the method's own, the ResNet): the pyramid, ROI attention
  and landmark head read the ResNet's stages c2..c5, which a ViT does not have."""
  arch = config.model.get('arch', '') or 'resnet'
  if arch != 'resnet':
    raise ValueError(
      f'config.model.arch={arch!r}: method {config.get("method", "aacp")!r} trains a ResNet '
      "(its pyramid, ROI attention and landmark head read c2..c5); set model.arch='resnet'"
    )


def check_config(config) -> None:
  """One-line errors naming the config key, before any data is read or anything compiles."""
  check_arch(config)
  config_checks.check(config, RULES, optional=_OPTIONAL)
  resnet.check_depth(config.model.depth)
  if config.loss.get('spatial_weight', 0) > 0 and not config.model.get('landmark_head', False):
    raise ValueError(
      f'config.loss.spatial_weight={config.loss.spatial_weight} needs '
      'config.model.landmark_head=True (or set the weight to 0)'
    )
  _check_modules(config)


def _check_modules(config) -> None:
  """The optional modules 4-7 (pyramid, ROI attention, triplet, cross-modal)."""
  loss, model = config.loss, config.model
  weights = tuple(loss.get('multiscale_weights', ()))
  if model.get('fpn', False):
    config_checks.check(config, FPN_RULES)
    if len(tuple(model.fpn_channels)) != 4:
      raise ValueError(
        f'config.model.fpn_channels={tuple(model.fpn_channels)}: expected 4 '
        'positive widths for p2..p5'
      )
    if len(tuple(model.level_projector)) < 1:
      raise ValueError('config.model.level_projector: expected at least one width')
  if weights:
    if len(weights) != 4:
      raise ValueError(
        f'config.loss.multiscale_weights={weights}: expected 4 weights >= 0 (p2, p3, p4, p5)'
      )
    if max(weights) > 0 and not model.get('fpn', False):
      raise ValueError(
        f'config.loss.multiscale_weights={weights} needs config.model.fpn=True (or all weights 0)'
      )
  if model.get('roi_attention', False):
    config_checks.check(config, [('model.roi_features', config_checks.COUNT)])
  if loss.get('triplet_weight', 0) > 0 and loss.triplet_mining not in TRIPLET_MINING:
    raise ValueError(
      f'config.loss.triplet_mining={loss.triplet_mining!r}: expected one of {TRIPLET_MINING}'
    )
  if loss.get('cross_weight', 0) > 0:
    config_checks.check(config, CROSS_RULES)
    if not loss.cross_start_epoch <= loss.cross_end_epoch:
      raise ValueError(
        f'config.loss.cross_start_epoch={loss.cross_start_epoch} / '
        f'cross_end_epoch={loss.cross_end_epoch}: need 0 <= start <= end'
      )
    for name in loss.cross_landmarks:
      try:
        landmarks_lib.landmark_index(name)
      except KeyError as e:
        raise ValueError(f'config.loss.cross_landmarks: {e.args[0]}') from None


METHOD = Method(
  name='aacp',
  check_config=check_config,
  build_model=build_model,
  make_loss=make_loss,
  make_schedules=make_schedules,
)
