"""MAE (He et al. 2022): masked autoencoders with a ViT encoder per modality.

The model is `models.vit.MAEModel`: per modality a ViT (`config.model.vit`, ViT-B/16 by default;
its patch embedding takes the modality's channels: CT 64, MRI 3, X-ray 1) and a light decoder
(`config.mae.decoder`, 8 blocks of 512 by default). Each step, per modality: one view by the
project's on-device augmentation with MAE's light setting (`aug_config`: random resized crop and a
flip, nothing photometric), uniform noise per patch, `config.mae.mask_ratio` of the patches masked
per sample (`vit.random_masking`), and the loss `reconstruction_loss` on the masked patches.

  L = sum_m share_m L_m,   share_m = modality m's fraction of the global batch

as AACP weights its modalities. Needs `config.model.arch = 'vit'`, which
`configs/pretrain.py:method=mae` sets; the pooled patch tokens are the 'features' the linear
probes read after pretraining.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from aacp_jax import augment, config_checks, precision
from aacp_jax.methods.base import Method, RunInfo
from aacp_jax.modalities import MODALITY_IDS
from aacp_jax.models import vit

BATCH_KEYS = ('image', 'landmarks', 'landmark_visible')
NORM_PIX_EPS = 1e-6  # MAE's

RULES = (
  ('data.image_size', config_checks.COUNT),
  ('mae.mask_ratio', config_checks.Number(lo=0, hi=1, open_lo=True, open_hi=True)),
  ('mae.crop_area', config_checks.Number(lo=0, hi=1, open_lo=True)),
  ('mae.crop_ratio', config_checks.POSITIVE),
  ('mae.flip_p', config_checks.UNIT),
  ('eval.batch_size', config_checks.COUNT),
  ('eval.bootstrap', config_checks.COUNT),
  ('eval.l2', config_checks.NON_NEGATIVE),  # 0 = chosen by cross-validation
)


def check_config(config) -> None:
  """One-line errors naming the config key, before any data is read or anything compiles."""
  if config.model.get('arch') != 'vit':
    raise ValueError(
      f"config.model.arch={config.model.get('arch')!r}: method 'mae' trains a ViT; set "
      "model.arch='vit' (configs/pretrain.py:method=mae does)"
    )
  config_checks.check(config, RULES)
  enc = vit.check_spec(vit.spec_from(config.model.vit), 'config.model.vit')
  vit.check_spec(vit.spec_from(config.mae.decoder), 'config.mae.decoder')
  size, p = config.data.image_size, enc.patch_size
  if size % p:
    raise ValueError(
      f'config.data.image_size={size}: not divisible by config.model.vit.patch_size={p}'
    )
  n = (size // p) ** 2
  if not 0 < vit.num_kept(n, config.mae.mask_ratio) < n:
    raise ValueError(
      f'config.mae.mask_ratio={config.mae.mask_ratio}: keeps '
      f'{vit.num_kept(n, config.mae.mask_ratio)} of the {n} patches; need at least one of each'
    )
  if not isinstance(config.mae.norm_pix_loss, bool):
    raise ValueError(f'config.mae.norm_pix_loss={config.mae.norm_pix_loss!r}: expected a bool')
  lo, hi = config.mae.crop_area
  if not lo <= hi:
    raise ValueError(f'config.mae.crop_area={tuple(config.mae.crop_area)}: need low <= high')


def build_model(config):
  return vit.build_mae(config.model, config.mae, config.modalities)


def aug_config(config, modality: str) -> ml_collections.FrozenConfigDict:
  """`config.augment` with MAE's light augmentation: the random resized crop of area
  `config.mae.crop_area` and aspect `crop_ratio` (the augmentation's SimCLR path, no anatomy
  placement), a horizontal flip with `flip_p` for the modalities the project lets flip
  (`augment.symmetric_modalities`: X-ray; never CT or MRI, whose laterality a flip destroys), no
  brightness, contrast, noise or cutout. The intensity normalisation (CT window, X-ray scale)
  stays the config's, as the probes and fine-tuning read it."""
  cfg = config.augment.to_dict()
  flip = config.mae.flip_p if modality in tuple(cfg['symmetric_modalities']) else 0.0
  cfg['anatomy_aware'] = False
  cfg['simclr'] = dict(
    area=tuple(config.mae.crop_area), ratio=tuple(config.mae.crop_ratio), flip_p=float(flip)
  )
  for op in ('brightness', 'contrast', 'noise', 'cutout'):
    cfg[op] = dict(cfg[op], p=0.0)
  return ml_collections.FrozenConfigDict(cfg)


def reconstruction_loss(pred, target, mask, norm_pix: bool = True, eps: float = NORM_PIX_EPS):
  """MAE's loss: mean squared error on the masked patches only, per-patch normalised targets.

  pred, target (B, N, P) (P = p²C pixels of a patch), mask (B, N) (1 = masked, 0 = visible):

    t̂_bn = (t_bn - mu_bn) / sqrt(var_bn + eps)      (norm_pix; else t̂ = t)
    mu_bn = (1/P) sum_j t_bnj,   var_bn = (1/(P-1)) sum_j (t_bnj - mu_bn)²   (unbiased: MAE's
      `target.var(dim=-1)`, torch's default)
    L = sum_bn m_bn e_bn / sum_bn m_bn,   e_bn = (1/P) sum_j (pred_bnj - t̂_bnj)²

  over the whole (global) batch; visible patches (m = 0) do not enter L. At least float32.
  """
  pred, target, mask = (precision.upcast(a) for a in (pred, target, mask))
  if norm_pix:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + eps)
  per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def check_batch(batch, config):
  """One-line error when the batch lacks a modality the config enables, or a key of one."""
  missing = [m for m in config.modalities if m not in batch]
  if missing:
    raise ValueError(
      f'batch has modalities {sorted(batch)} but config.modalities enables '
      f'{tuple(config.modalities)}: missing {missing}; each needs keys {BATCH_KEYS}'
    )
  for m in config.modalities:
    lacking = [k for k in BATCH_KEYS if k not in batch[m]]
    if lacking:
      raise ValueError(f'batch[{m!r}] lacks keys {lacking}; expected {BATCH_KEYS}')


def views_and_noise(key, batch, config, patch_size: int):
  """({m: one augmented view (B_m, S, S, C_m)}, {m: uniform noise (B_m, N)}): per modality the
  step key folded with the modality's id, split into the augmentation's and the mask's."""
  size = config.data.image_size
  n = (size // patch_size) ** 2
  views, noise = {}, {}
  for m in config.modalities:
    k_aug, k_mask = jax.random.split(jax.random.fold_in(key, MODALITY_IDS[m]))
    b = batch[m]
    views[m] = augment.augment_batch(
      k_aug,
      b['image'].astype(precision.real()),
      b['landmarks'],
      b['landmark_visible'],
      m,
      aug_config(config, m),
      extent=b.get('extent'),
      out_size=size,
    )[0]
    noise[m] = jax.random.uniform(k_mask, (views[m].shape[0], n), precision.real())
  return views, noise


def views_loss(params, views, noise, *, model, config):
  """(L, metrics) on given views and noise: L = sum_m share_m reconstruction_loss_m; metrics
  'mae_<m>' (L_m), 'loss'."""
  out = model.apply({'params': params}, views, train=True, noise=noise)
  p = model.encoder.patch_size
  total_n = sum(views[m].shape[0] for m in config.modalities)
  loss, metrics = 0.0, {}
  for m in config.modalities:
    value = reconstruction_loss(
      out[m]['pred'],
      vit.patchify(precision.upcast(views[m]), p),
      out[m]['mask'],
      bool(config.mae.norm_pix_loss),
    )
    loss = loss + views[m].shape[0] / total_n * value
    metrics[f'mae_{m}'] = value
  metrics['loss'] = loss
  return loss, metrics


def make_loss(config, model, run: RunInfo):
  """The loop's loss (`methods.base.LossFn`); MAE has no BatchNorm, no extra state and no
  schedule, so `batch_stats` and `extra` come back as they came."""
  del run

  def loss(params, batch_stats, extra, batch, key, scheduled):
    del scheduled
    check_batch(batch, config)
    views, noise = views_and_noise(key, batch, config, model.encoder.patch_size)
    value, metrics = views_loss(params, views, noise, model=model, config=config)
    return value, (batch_stats, extra, metrics)

  return loss


METHOD = Method(
  name='mae',
  check_config=check_config,
  build_model=build_model,
  make_loss=make_loss,
)
