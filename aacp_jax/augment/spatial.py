"""Spatial part of the augmentation: crop windows, one affine, one elastic field, one resample.

Coordinates are normalised (y, x) in [0, 1]; pixel i of an axis of size N covers [i/N, (i+1)/N],
so its centre is (i + 0.5) / N. The forward transform maps an original-frame point p to the
augmented frame: q = A p + t, then the elastic warp. Sampling runs backwards: output pixel q reads
the original at A^-1 (q + d(q) - t), d being the elastic displacement on the output grid.
"""

import jax
import jax.numpy as jnp
import numpy as np

from aacp_jax import precision

_CENTRE = np.array([0.5, 0.5], np.float32)  # numpy: no device work at import


def _window_position(u, lo, hi, size):
  """Left edge of a window of `size` in [0, 1] covering [lo, hi] (lo > hi: no constraint)."""
  first = jnp.maximum(0.0, hi - size)
  last = jnp.minimum(lo, 1.0 - size)
  return first + u * jnp.maximum(last - first, 0.0)


def _window_shape(u_area, u_ratio, area, ratio):
  """(h, w) with h*w ~ U(area) and w/h log-uniform in `ratio`, each at most the full side."""
  a = area[0] + u_area * (area[1] - area[0])
  r = jnp.exp(jnp.log(ratio[0]) + u_ratio * (jnp.log(ratio[1]) - jnp.log(ratio[0])))
  return jnp.minimum(jnp.sqrt(a / r), 1.0), jnp.minimum(jnp.sqrt(a * r), 1.0)


# Crops take 4 uniforms in [0, 1) rather than a key: one uniform draw for all of sample_params
# keeps the traced graph (and compile time) small.
def anatomy_crop(u, landmarks, visible, area, ratio, margin):
  """Window (y0, x0, h, w) holding every visible landmark with `margin` (clipped to the image).

  The window's area and aspect are drawn first; a side too short to hold the landmarks' box is
  grown to the box (the smallest window containing them), so no visible landmark is ever cut.
  """
  h, w = _window_shape(u[0], u[1], area, ratio)
  big = precision.real()(2.0)
  lo = jnp.min(jnp.where(visible[:, None], landmarks, big), axis=0)
  hi = jnp.max(jnp.where(visible[:, None], landmarks, -big), axis=0)
  lo = jnp.clip(lo - margin, 0.0, 1.0)  # no visible landmark: lo = 1 > hi = 0, no constraint
  hi = jnp.clip(hi + margin, 0.0, 1.0)
  size = jnp.minimum(jnp.maximum(jnp.stack([h, w]), hi - lo), 1.0)
  y0 = _window_position(u[2], lo[0], hi[0], size[0])
  x0 = _window_position(u[3], lo[1], hi[1], size[1])
  return jnp.stack([y0, x0, size[0], size[1]])


def random_resized_crop(u, area, ratio):
  """SimCLR / torchvision RandomResizedCrop window, landmarks ignored (sides clipped, no retry)."""
  h, w = _window_shape(u[0], u[1], area, ratio)
  none = precision.real()(1.0), precision.real()(0.0)
  return jnp.stack([_window_position(u[2], *none, h), _window_position(u[3], *none, w), h, w])


def elastic_control(key, grid, sigma, alpha):
  """(grid, grid, 2) control displacements, Gaussian-smoothed over the grid.

  Rows of the smoothing matrix have unit L2 norm, so every control point keeps std `alpha`
  whatever `sigma`: alpha is the displacement scale, sigma only its spatial correlation.
  """
  noise = jax.random.normal(key, (grid, grid, 2), precision.real())
  idx = jnp.arange(grid, dtype=precision.real())
  if sigma > 0:
    g = jnp.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
  else:
    g = jnp.eye(grid, dtype=precision.real())
  g = g / jnp.sqrt(jnp.sum(g * g, axis=1, keepdims=True))
  return alpha * jnp.einsum('ab,bcd,ec->aed', g, noise, g)


def elastic_at(ctrl, pts):
  """Displacement (N, 2) at normalised points (N, 2): bilinear in the control grid, edge-clamped."""
  g = ctrl.shape[0]
  u = jnp.clip(pts * (g - 1), 0.0, g - 1.0)
  i0 = jnp.clip(jnp.floor(u), 0, g - 2).astype(jnp.int32)
  f = u - i0
  fy, fx = f[:, :1], f[:, 1:]
  c = lambda dy, dx: ctrl[i0[:, 0] + dy, i0[:, 1] + dx]
  return (1 - fy) * ((1 - fx) * c(0, 0) + fx * c(0, 1)) + fy * ((1 - fx) * c(1, 0) + fx * c(1, 1))


def affine(params, shape):
  """Forward (A (2, 2), t (2,)): original-frame normalised p -> augmented q = A p + t.

  Order: crop window -> flip -> anisotropic scale -> rotation -> translation, the last three about
  the image centre. Rotation is done in pixel units (conjugated by diag(H, W)) so it stays a
  rotation on non-square images.
  """
  y0, x0, h, w = params['crop'][0], params['crop'][1], params['crop'][2], params['crop'][3]
  crop_lin = jnp.diag(jnp.stack([1.0 / h, 1.0 / w]))
  crop_off = -jnp.stack([y0 / h, x0 / w])
  flip = jnp.diag(jnp.stack([1.0, jnp.where(params['flip'], -1.0, 1.0)]))
  scale = jnp.diag(params['scale'])
  cos, sin = jnp.cos(params['angle']), jnp.sin(params['angle'])
  rot = jnp.stack([jnp.stack([cos, -sin]), jnp.stack([sin, cos])])
  d = jnp.array(shape, precision.real())
  rot = rot * d[None, :] / d[:, None]  # D^-1 R D
  lin = rot @ scale @ flip
  a = lin @ crop_lin
  t = lin @ (crop_off - _CENTRE) + _CENTRE + params['translate']
  return a.astype(precision.real()), t.astype(precision.real())


def inv2(a):
  """Closed-form 2x2 inverse (jnp.linalg.inv goes through LU: slower to compile and run)."""
  det = a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0]
  return jnp.stack([jnp.stack([a[1, 1], -a[0, 1]]), jnp.stack([-a[1, 0], a[0, 0]])]) / det


def _pixel_centres(h, w):
  yy, xx = jnp.meshgrid((jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w, indexing='ij')
  return jnp.stack([yy.ravel(), xx.ravel()], axis=-1).astype(precision.real())


def _inside(iy, ix, hgt, wid):
  return (iy >= 0) & (iy < hgt) & (ix >= 0) & (ix < wid)


def bilinear(image, pix, fill, extent=None):
  """Sample image (H, W, C) at pixel coords pix (N, 2) -> (N, C); corners outside read `fill`.

  `extent` (2,) int: the valid (h, w) of a padded image (None: the whole array); corners in the
  padding read `fill` too, so a padded record samples exactly like the record alone.
  One gather per corner for all channels at once (cheaper than map_coordinates per channel).
  """
  hgt, wid, ch = image.shape
  vh, vw = (hgt, wid) if extent is None else (extent[0], extent[1])
  flat = image.reshape(hgt * wid, ch)
  base = jnp.floor(pix)
  frac = pix - base
  base = base.astype(jnp.int32)
  out = 0.0
  for dy in (0, 1):
    for dx in (0, 1):
      iy, ix = base[:, 0] + dy, base[:, 1] + dx
      ok = _inside(iy, ix, vh, vw)
      idx = jnp.clip(iy, 0, hgt - 1) * wid + jnp.clip(ix, 0, wid - 1)
      val = jnp.where(ok[:, None], jnp.take(flat, idx, axis=0), fill)
      wgt = (frac[:, 0] if dy else 1 - frac[:, 0]) * (frac[:, 1] if dx else 1 - frac[:, 1])
      out = out + wgt[:, None] * val
  return out


def nearest(image, pix, fill, extent=None):
  """Nearest-neighbour sample (label-exact: every value is a stored one or `fill`), as bilinear."""
  hgt, wid, ch = image.shape
  vh, vw = (hgt, wid) if extent is None else (extent[0], extent[1])
  # The pixel whose cell [i, i + 1) holds the point: pix + 0.5 is the point in pixel-edge units.
  cell = jnp.floor(pix + 0.5).astype(jnp.int32)
  iy, ix = cell[:, 0], cell[:, 1]
  ok = _inside(iy, ix, vh, vw)
  idx = jnp.clip(iy, 0, hgt - 1) * wid + jnp.clip(ix, 0, wid - 1)
  return jnp.where(ok[:, None], jnp.take(image.reshape(hgt * wid, ch), idx, axis=0), fill)


def resample(image, a, t, ctrl, fill, out_shape=None, extent=None, order=1):
  """The single resample of all channels through the affine (a, t) and elastic field ctrl.

  The output grid is `out_shape` (default: the image's); the input is the image's valid region
  `extent` (h, w) (default: the whole array). Both frames are normalised [0, 1]^2, so resizing
  a record to the training size is part of this one resample, not a separate pass: a record of
  any size, padded or not, lands on the same grid. order 1 = bilinear, 0 = nearest (masks).
  """
  hgt, wid, ch = image.shape
  oh, ow = (hgt, wid) if out_shape is None else out_shape
  q = _pixel_centres(oh, ow)
  if ctrl is not None:  # None: elastic statically off, skip the field
    q = q + elastic_at(ctrl, q)
  p = (q - t) @ inv2(a).T
  if extent is None:
    size = jnp.array([hgt, wid], precision.real())
  else:
    size = jnp.asarray(extent).astype(precision.real())
  pix = p * size - 0.5
  sample = bilinear if order == 1 else nearest
  return sample(image, pix, fill, extent).reshape(oh, ow, ch)


def move_landmarks(landmarks, visible, a, t, ctrl, iters):
  """Landmarks through the same transform; invisible once outside [0, 1]^2 (or before).

  Affine part exact; elastic: solve q + d(q) = A p + t by fixed point q <- A p + t - d(q)
  (one step = first-order inverse; d is small and smooth so a few steps converge).
  """
  target = landmarks @ a.T + t
  q = target
  for _ in range(iters if ctrl is not None else 0):
    q = target - elastic_at(ctrl, q)
  inside = jnp.all((q >= 0.0) & (q <= 1.0), axis=-1)
  vis = visible & inside
  return jnp.where(vis[:, None], q, 0.0).astype(precision.real()), vis
