"""Intensity part: deterministic normalisation per modality, then random photometric ops, cutout."""

import jax
import jax.numpy as jnp

from aacp_jax import precision
from aacp_jax.augment import config as config_lib


def fill_value(modality, cfg) -> float:
  """Raw-value background used outside the field: air for CT, zero (black / mean) otherwise."""
  return float(cfg.ct_fill_hu) if modality == 'ct' else 0.0


def normalise(images, modality, cfg):
  """Raw values -> encoder input: CT HU window -> [0, 1]; X-ray * 1/255; MRI unchanged."""
  config_lib.check_modality(modality)
  x = jnp.asarray(images, precision.real())
  if modality == 'ct':
    lo, hi = config_lib.ct_window(cfg)
    return jnp.clip((x - lo) / (hi - lo), 0.0, 1.0)
  if modality == 'xray':
    return x * precision.real()(cfg.xray_scale)
  return x


def photometric(image, params, modality, cfg):
  """Brightness, contrast (about the image mean), clip. Identity params = no-op. Noise is separate
  (`noise`): it is the costliest op, and the batched path draws it only for samples that fire."""
  x = image + params['brightness']
  mean = jnp.mean(x)
  x = (x - mean) * params['contrast'] + mean
  if cfg.clip_unit and modality in ('ct', 'xray'):
    x = jnp.clip(x, 0.0, 1.0)
  return x


def noise(params, shape, hole):
  """Additive Gaussian noise std·N(0, 1) from the sample's own key, zero inside the cutout hole
  (cutout comes last, so its fill stays exact)."""
  n = params['noise_std'] * jax.random.normal(params['noise_key'], shape, precision.real())
  return jnp.where(hole[..., None], 0.0, n)


def cutout_hole(shape, box, fired):
  """(H, W) bool: the box (cy, cx, h, w) in normalised units when fired; may cross the border."""
  hgt, wid = shape[:2]
  yy = (jnp.arange(hgt) + 0.5) / hgt
  xx = (jnp.arange(wid) + 0.5) / wid
  in_y = jnp.abs(yy - box[0]) <= box[2] / 2
  in_x = jnp.abs(xx - box[1]) <= box[3] / 2
  return fired & in_y[:, None] & in_x[None, :]


def cutout(image, hole, fill):
  return jnp.where(hole[..., None], precision.real()(fill), image)
