"""Draw augmentation parameters, apply them, and the batched / jitted entry points.

Sampling and application are separate so tests and plots can see which ops fired, vmap the cheap
sampling over thousands of draws, and build hand-made parameters (e.g. a pure translation).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aacp_jax import augment_defaults, precision
from aacp_jax.augment import config as config_lib
from aacp_jax.augment import intensity, spatial

OPS = (
  'crop',
  'rotate',
  'translate',
  'scale',
  'flip',
  'elastic',
  'brightness',
  'contrast',
  'noise',
  'cutout',
)
_NUM_UNIFORMS = 24  # scalars drawn per sample (at most 22 used), in one draw


def _frozen(cfg):
  # Static jit arguments must hash; a FrozenConfigDict does, by value.
  cfg = augment_defaults.default_config() if cfg is None else cfg
  if isinstance(cfg, ml_collections.FrozenConfigDict):
    return cfg
  return ml_collections.FrozenConfigDict(cfg)


def _uses_elastic(cfg):
  return bool(cfg.anatomy_aware) and cfg.elastic.p > 0


def identity_params(cfg=None):
  """Parameters of the identity transform (no op fired); a base for hand-made transforms."""
  cfg = _frozen(cfg)
  off = jnp.bool_(False)
  g = int(cfg.elastic.grid)
  return {
    'fired': {op: off for op in OPS},
    'crop': jnp.array([0.0, 0.0, 1.0, 1.0], precision.real()),
    'angle': precision.real()(0.0),
    'translate': jnp.zeros((2,), precision.real()),
    'scale': jnp.ones((2,), precision.real()),
    'flip': off,
    'elastic': jnp.zeros((g, g, 2), precision.real()),
    'brightness': precision.real()(0.0),
    'contrast': precision.real()(1.0),
    'noise_std': precision.real()(0.0),
    'noise_key': jax.random.PRNGKey(0),
    'cutout_box': jnp.zeros((4,), precision.real()),
  }


def _sample_params(key, landmarks, visible, modality, cfg):
  config_lib.check_modality(modality)
  k_u, k_elastic, k_noise = jax.random.split(key, 3)
  uniforms = jax.random.uniform(k_u, (_NUM_UNIFORMS,), precision.real())
  taken = [0]

  def u(n=None, lo=0.0, hi=1.0):
    # Consume the next n (or 1, as a scalar) uniforms, mapped to [lo, hi).
    m = 1 if n is None else n
    v = uniforms[taken[0] : taken[0] + m]
    taken[0] += m
    v = lo + v * (hi - lo)
    return v[0] if n is None else v

  bern = lambda prob: u() < prob  # uniform in [0, 1): p = 0 never fires, p = 1 always does
  p = identity_params(cfg)
  fired = dict(p['fired'])
  landmarks = jnp.asarray(landmarks, precision.real())
  visible = jnp.asarray(visible, bool)

  if cfg.anatomy_aware:
    if cfg.crop.enabled:
      fired['crop'] = jnp.bool_(True)
      p['crop'] = spatial.anatomy_crop(
        u(4), landmarks, visible, cfg.crop.area, cfg.crop.ratio, cfg.crop.margin
      )
    fired['rotate'] = bern(cfg.rotation.p)
    max_rad = float(np.deg2rad(cfg.rotation.max_deg))
    p['angle'] = jnp.where(fired['rotate'], u(None, -max_rad, max_rad), 0.0)
    fired['translate'] = bern(cfg.translation.p)
    m = cfg.translation.max_frac
    p['translate'] = jnp.where(fired['translate'], u(2, -m, m), 0.0)
    fired['scale'] = bern(cfg.scale.p)
    p['scale'] = jnp.where(fired['scale'], u(2, *cfg.scale.range), 1.0)
    if modality in cfg.symmetric_modalities:
      fired['flip'] = bern(cfg.flip.p)
    if cfg.elastic.p > 0:
      fired['elastic'] = bern(cfg.elastic.p)
      e = cfg.elastic
      ctrl = spatial.elastic_control(k_elastic, int(e.grid), float(e.sigma), e.alpha)
      p['elastic'] = jnp.where(fired['elastic'], ctrl, 0.0)
  else:
    # SimCLR ablation: random resized crop + flip for every modality, landmarks ignored.
    fired['crop'] = jnp.bool_(True)
    p['crop'] = spatial.random_resized_crop(u(4), cfg.simclr.area, cfg.simclr.ratio)
    fired['flip'] = bern(cfg.simclr.flip_p)
  p['flip'] = fired['flip']

  fired['brightness'] = bern(cfg.brightness.p)
  d = cfg.brightness.max_delta
  p['brightness'] = jnp.where(fired['brightness'], u(None, -d, d), 0.0)
  fired['contrast'] = bern(cfg.contrast.p)
  p['contrast'] = jnp.where(fired['contrast'], u(None, *cfg.contrast.range), 1.0)
  fired['noise'] = bern(cfg.noise.p)
  p['noise_std'] = jnp.where(fired['noise'], precision.real()(cfg.noise.std), 0.0)
  p['noise_key'] = k_noise
  fired['cutout'] = bern(cfg.cutout.p)
  s = precision.real()(cfg.cutout.size)
  p['cutout_box'] = jnp.concatenate([u(2), jnp.stack([s, s])])
  assert taken[0] <= _NUM_UNIFORMS
  p['fired'] = fired
  return p


def _out_shape(image, out_size):
  return tuple(image.shape[:2]) if out_size is None else (int(out_size), int(out_size))


def _warp_mask(mask, a, t, ctrl, out_shape, extent):
  # The image's resample with nearest sampling and fill 0: label-exact, in the mask's own dtype.
  fill = jnp.zeros((), mask.dtype)
  return spatial.resample(mask[..., None], a, t, ctrl, fill, out_shape, extent, order=0)[..., 0]


def _check_masks(masks, images_shape):
  """masks as an array (None stays None), checked against the images' (..., H, W, C) shape."""
  if masks is None:
    return None
  masks = jnp.asarray(masks)
  if not jnp.issubdtype(masks.dtype, jnp.integer):
    raise ValueError(f'masks: integer labels expected, got dtype {masks.dtype}')
  if masks.shape != tuple(images_shape[:-1]):
    raise ValueError(f'masks {masks.shape} do not match images {tuple(images_shape)}')
  return masks


def _apply_params(
  params,
  image,
  landmarks,
  visible,
  modality,
  cfg,
  with_noise=True,
  extent=None,
  out_size=None,
  mask=None,
):
  # Order: one spatial resample on raw values (so CT air fills at -1000 HU) -> intensity
  # normalisation -> brightness, contrast, noise -> cutout (paper 3.5.3). Noise outside the hole
  # plus the filled hole equals noise-then-cutout, so the batched path may add it afterwards.
  # The record's own size enters only through `extent` (its valid region in a padded array):
  # the transform lives in normalised coordinates of the training frame (out_size²), so the
  # resize to the training size is part of the one resample.
  config_lib.check_modality(modality)
  image = jnp.asarray(image, precision.real())
  out_shape = _out_shape(image, out_size)
  a, t = spatial.affine(params, out_shape)
  ctrl = params['elastic'] if _uses_elastic(cfg) else None
  x = spatial.resample(
    image, a, t, ctrl, intensity.fill_value(modality, cfg), out_shape=out_shape, extent=extent
  )
  x = intensity.normalise(x, modality, cfg)
  x = intensity.photometric(x, params, modality, cfg)
  hole = intensity.cutout_hole(x.shape, params['cutout_box'], params['fired']['cutout'])
  x = intensity.cutout(x, hole, cfg.cutout.fill)
  if with_noise:
    x = x + intensity.noise(params, x.shape, hole)
  iters = int(cfg.elastic.inverse_iters) if ctrl is not None else 0
  lm, vis = spatial.move_landmarks(
    jnp.asarray(landmarks, precision.real()), jnp.asarray(visible, bool), a, t, ctrl, iters
  )
  if mask is None:  # statically: callers without masks trace exactly the program they always did
    return x, lm, vis, a
  return x, lm, vis, a, _warp_mask(mask, a, t, ctrl, out_shape, extent)


def _augment_one(
  key,
  image,
  landmarks,
  visible,
  modality,
  cfg,
  return_transform,
  extent=None,
  out_size=None,
  mask=None,
):
  params = _sample_params(key, landmarks, visible, modality, cfg)
  out = _apply_params(
    params, image, landmarks, visible, modality, cfg, extent=extent, out_size=out_size, mask=mask
  )
  return _select(out, return_transform, mask is not None)


def _select(out, return_transform, with_mask):
  # (image, landmarks, visible, linear[, mask]) -> the public tuple: linear only when asked for,
  # the mask always last.
  head = out[:4] if return_transform else out[:3]
  return head + (out[4],) if with_mask else head


# Jitted with modality / cfg (and flags) static; the public wrappers freeze cfg so it hashes.
# Jitted functions nest inside an outer jit or vmap, and eager calls (tests, notebooks) stay fast.
_STATIC = ('modality', 'cfg')
_sample_params_jit = jax.jit(_sample_params, static_argnames=_STATIC)
_apply_params_jit = jax.jit(_apply_params, static_argnames=_STATIC + ('out_size',))
_augment_one_jit = jax.jit(_augment_one, static_argnames=_STATIC + ('return_transform', 'out_size'))


def sample_params(key, landmarks, visible, modality, cfg=None):
  """Draw one sample's parameters. Returns a dict; `fired[op]` says whether each op fired.

  Values of ops that did not fire are the identity, so `apply_params` needs no branching.
  landmarks (K, 2) normalised (y, x), visible (K,) bool: only the anatomy-aware crop reads them.
  """
  return _sample_params_jit(key, landmarks, visible, modality=modality, cfg=_frozen(cfg))


def apply_params(
  params, image, landmarks, visible, modality, cfg=None, *, extent=None, out_size=None, mask=None
):
  """Apply drawn params to one sample (H, W, C) raw float32.

  Returns (image normalised float32, landmarks (K, 2), visible (K,), linear (2, 2)); `linear` is
  the 2x2 part of the affine, mapping original-frame normalised vectors to augmented-frame ones
  (elastic ignored). `params` may be hand-made from `identity_params`. `extent` (2,): the
  record's valid (h, w) when `image` is padded; `out_size`: the output side (default: the input's).
  `mask` (H, W) integer labels (padded like `image`): warped by the same transform with nearest
  sampling (fill 0, same dtype) and appended last: (image, landmarks, visible, linear, mask).
  """
  mask = _check_masks(mask, jnp.shape(image))
  return _apply_params_jit(
    params,
    image,
    landmarks,
    visible,
    extent=extent,
    modality=modality,
    cfg=_frozen(cfg),
    out_size=out_size,
    mask=mask,
  )


def augment_one(
  key,
  image,
  landmarks,
  visible,
  modality,
  cfg=None,
  return_transform=False,
  *,
  extent=None,
  out_size=None,
  mask=None,
):
  """One sample: (image, landmarks, visible) [+ linear (2, 2) if return_transform] [+ mask (S, S)
  if `mask` (H, W) integer labels is given: same transform, nearest, fill 0, same dtype]."""
  mask = _check_masks(mask, jnp.shape(image))
  return _augment_one_jit(
    key,
    image,
    landmarks,
    visible,
    extent=extent,
    modality=modality,
    cfg=_frozen(cfg),
    return_transform=bool(return_transform),
    out_size=out_size,
    mask=mask,
  )


def _add_noise_where_fired(images, params):
  """Noise for the samples whose noise op fired, one sample at a time under a real branch: vmap
  would turn the branch into a select and draw noise for every sample (p = 0.2: 5x the work,
  most of the augmentation's time for 64-channel CT)."""

  def one(args):
    image, p = args
    hole = intensity.cutout_hole(image.shape, p['cutout_box'], p['fired']['cutout'])
    return jax.lax.cond(
      p['fired']['noise'], lambda: image + intensity.noise(p, image.shape, hole), lambda: image
    )

  return jax.lax.map(one, (images, params))


@functools.partial(jax.jit, static_argnames=('modality', 'cfg', 'return_transform', 'out_size'))
def _augment_batch(
  key, images, landmarks, visible, extent, modality, cfg, return_transform, out_size, masks=None
):
  keys = jax.random.split(key, images.shape[0])
  params = jax.vmap(functools.partial(_sample_params, modality=modality, cfg=cfg))(
    keys, landmarks, visible
  )
  apply = functools.partial(
    _apply_params, modality=modality, cfg=cfg, with_noise=False, out_size=out_size
  )
  if masks is None and extent is None:
    out = jax.vmap(apply)(params, images, landmarks, visible)
  elif masks is None:
    out = jax.vmap(lambda p, x, lm, v, e: apply(p, x, lm, v, extent=e))(
      params, images, landmarks, visible, extent
    )
  elif extent is None:
    out = jax.vmap(lambda p, x, lm, v, m: apply(p, x, lm, v, mask=m))(
      params, images, landmarks, visible, masks
    )
  else:
    out = jax.vmap(lambda p, x, lm, v, e, m: apply(p, x, lm, v, extent=e, mask=m))(
      params, images, landmarks, visible, extent, masks
    )
  out = (_add_noise_where_fired(out[0], params),) + tuple(out[1:])
  return _select(out, return_transform, masks is not None)


def augment_batch(
  key,
  images,
  landmarks,
  visible,
  modality,
  cfg=None,
  return_transform=False,
  *,
  extent=None,
  out_size=None,
  masks=None,
):
  """Augment a batch: images (B, H, W, C) raw float32, landmarks (B, K, 2), visible (B, K).

  Sample b uses jax.random.split(key, B)[b]. Returns (images, landmarks, visible), plus
  linear (B, 2, 2) when return_transform. Jitted with modality / cfg static; safe to call inside
  an outer jit (e.g. the train step). Records of any size: `extent` (B, 2) int is each sample's
  valid (h, w) inside the padded `images` (the pipeline's 'extent'), and the views come out at
  `out_size`² (default: the input's size), resized within the same single resample.
  `masks` (B, H, W) integer labels (padded like `images`): warped by each sample's same spatial
  transform with nearest sampling (fill 0, input dtype, never touched by intensity ops) and
  appended last: (images, landmarks, visible[, linear], masks).
  """
  masks = _check_masks(masks, jnp.shape(images))
  return _augment_batch(
    key,
    jnp.asarray(images, precision.real()),
    jnp.asarray(landmarks, precision.real()),
    jnp.asarray(visible, bool),
    None if extent is None else jnp.asarray(extent, jnp.int32),
    modality,
    _frozen(cfg),
    bool(return_transform),
    None if out_size is None else int(out_size),
    masks,
  )


@functools.partial(jax.jit, static_argnames=('out_size', 'order'))
def _resize(images, extent, fill, out_size, order):
  eye, zero = jnp.eye(2, dtype=precision.real()), jnp.zeros((2,), precision.real())
  one = lambda x, e: spatial.resample(x, eye, zero, None, fill, (out_size, out_size), e, order)
  return jax.vmap(one)(images, extent)


def resize(images, extent, out_size, *, fill=0.0, order=1):
  """The augmentation's resample with the identity transform: (B, H, W, C) records padded to a
  common array, valid (h, w) = `extent` (B, 2), to (B, out_size, out_size, C) float (order 1,
  bilinear) or in the input dtype (order 0, nearest: label-exact for masks). Evaluation uses it
  so that its images are those the training views are resampled from."""
  images = jnp.asarray(images)
  if order == 1:
    images = images.astype(precision.real())
  fill = jnp.asarray(fill, images.dtype)
  return _resize(images, jnp.asarray(extent, jnp.int32), fill, int(out_size), int(order))


def preprocess(images, modality, cfg=None):
  """Deterministic intensity normalisation only (evaluation): same as the training pipeline's."""
  return intensity.normalise(images, modality, _frozen(cfg))
