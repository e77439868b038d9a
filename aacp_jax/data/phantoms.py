"""Deterministic synthetic anatomy: the embedded default dataset (CT, X-ray, MRI phantoms).

Every record is a pure function of ``(seed, split, modality, index, image_size)``. Anatomy lives in
millimetres in a patient frame (x: patient right -> left, y: anterior -> posterior, z: superior ->
inferior, z = 0 at the top of the imaged body part); each modality samples that frame on its own grid:

* CT: the torso voxelised on 1 mm axial slices, a random 64-slice slab (centred near a chest or an
  abdominal landmark) kept as HU. Label 1: a pleural effusion in chest slabs, hepatic
  steatosis in abdominal slabs (diffuse findings; see DESIGN.md on why not small nodules).
* X-ray: the same torso model voxelised on a coronal grid and integrated along the AP axis (Beer-Lambert
  line integral, i.e. the log of transmission), so bone is bright and lung dark. Label 1: pneumonia.
* MRI: an axial brain slice with T1/T2/FLAIR tissue contrasts. Label 1: tumour core with oedema.

Shapes are painted in order on one grid (later shapes win), which gives realistic overlaps (the heart
and liver carve the lungs, the diaphragm is the liver dome) with a few vectorised ops per shape.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import zlib

import numpy as np

from aacp_jax import version
from aacp_jax.data import landmarks as lm
from aacp_jax.data import records as rec
from aacp_jax.data import shards
from aacp_jax.modalities import MODALITIES  # every modality has phantoms (data_prep.phantoms)

# A phantom's RNG is seeded with its modality's position in this tuple, so the order is part of
# every phantom's bytes and every demo result: never reorder it to match aacp_jax.modalities.
_SEED_ORDER = ('ct', 'xray', 'mri')
CT_SLICES = 64
TISSUES = {
  'air': 0,
  'fat': 1,
  'soft_tissue': 2,
  'lung': 3,
  'airway': 4,
  'heart': 5,
  'aorta': 6,
  'liver': 7,
  'spleen': 8,
  'kidney': 9,
  'bone': 10,
  'lesion': 11,
  'scalp': 12,
  'csf': 13,
  'grey_matter': 14,
  'white_matter': 15,
  'oedema': 16,
}
LABEL_NAMES = {
  'ct': ['normal', 'effusion_or_steatosis'],
  'xray': ['normal', 'pneumonia'],
  'mri': ['normal', 'tumour'],
}
_TORSO_FOV, _XRAY_TOP, _HEAD_FOV, _XRAY_AP_SAMPLES = 440.0, -60.0, 240.0, 64
_MU_WATER = 0.019  # 1/mm at ~70 keV; X-ray attenuation is mu_water * (1 + HU / 1000).


class _Grid:
  """Sample points: x, y broadcast over the volume with size 1 along ``zaxis``; z is 1D, ascending."""

  def __init__(self, x, y, z, zaxis):
    self.x, self.y, self.z, self.zaxis = x, y, np.asarray(z, np.float32), zaxis
    self.shape = list(np.broadcast_shapes(x.shape, y.shape))
    self.shape[zaxis] = len(self.z)
    self.vol = np.zeros(self.shape, np.float32)
    self.lab = np.zeros(self.shape, np.uint8)

  def paint(self, zlo, zhi, inside_fn, value, tissue, where_tissue=None) -> bool:
    """Sets voxels with z in [zlo, zhi] where ``inside_fn(x, y, z)`` holds; True if any did."""
    # The tolerance absorbs float32 rounding of the stored z (a lone MRI slice paints at z == z).
    k0 = np.searchsorted(self.z, zlo - 1e-3)
    k1 = np.searchsorted(self.z, zhi + 1e-3, side='right')
    if k0 >= k1:
      return False
    idx = [slice(None)] * 3
    idx[self.zaxis] = slice(k0, k1)
    zshape = [1, 1, 1]
    zshape[self.zaxis] = k1 - k0
    m = inside_fn(self.x, self.y, self.z[k0:k1].reshape(zshape))
    m = np.broadcast_to(m, self.vol[tuple(idx)].shape)
    if where_tissue is not None:
      m = m & (self.lab[tuple(idx)] == where_tissue)
    if not m.any():
      return False
    self.vol[tuple(idx)][m] = value
    self.lab[tuple(idx)][m] = tissue
    return True


def _ellipsoid(c, r, mod=0.0, phase=0.0):
  def inside(x, y, z):
    dx, dy = (x - c[0]) / r[0], (y - c[1]) / r[1]
    xy = dx * dx + dy * dy
    if mod:  # Lobulated outline: the in-plane radius varies with angle.
      xy = xy * (1 + mod * np.cos(2 * np.arctan2(dy, dx) + phase))
    return xy + ((z - c[2]) / r[2]) ** 2 < 1

  return inside, c[2] - r[2], c[2] + r[2]


def _tube(a, b, radius):
  """Capsule around segment a->b (point-to-segment distance, vectorised)."""
  a, d = np.asarray(a, np.float32), np.asarray(b, np.float32) - np.asarray(a, np.float32)
  dd = float(d @ d)

  def inside(x, y, z):
    px, py, pz = x - a[0], y - a[1], z - a[2]
    t = np.clip((px * d[0] + py * d[1]) / dd + pz * (d[2] / dd), 0, 1)
    return (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2 < radius * radius

  return inside, min(a[2], b[2]) - radius, max(a[2], b[2]) + radius


def _torso(rng):
  """Per-subject torso anatomy (mm) and landmark positions; variation in size, shape and contrast."""
  s = rng.uniform(0.9, 1.1)
  sw, sa = s * rng.uniform(0.93, 1.07), s * rng.uniform(0.93, 1.07)
  j = lambda sd=5.0: rng.normal(0, sd)  # pylint: disable=unnecessary-lambda-assignment
  v = lambda lo=0.9, hi=1.1: rng.uniform(lo, hi)  # pylint: disable=unnecessary-lambda-assignment
  length = 440 * s
  # Neck, sloping shoulders, chest, abdomen: semi-axes interpolated along z.
  body_z = np.array([-70, -35, -10, 0, 200 * s, length], np.float32)
  body_ax = np.array([55, 60, 160, 150, 170, 160]) * sw
  body_ay = np.array([60, 65, 95, 100, 115, 125]) * sa
  contrast = rng.uniform(0, 1)  # Arterial phase strength: enhances aorta, heart and kidneys.
  p = lambda x, y, z: (x * sw + j(), y * sa + j(), z * s + j())  # pylint: disable=unnecessary-lambda-assignment
  t = {
    'length': length,
    'body_z': body_z,
    'body_ax': body_ax,
    'body_ay': body_ay,
    'fat': rng.uniform(8, 25),
    'contrast': contrast,
  }
  t['lungs'] = [
    (p(-75, 5, 130), (55 * sw * v(), 75 * sa * v(), 125 * s * v())),
    (p(75, 5, 135), (50 * sw * v(), 75 * sa * v(), 120 * s * v())),
  ]
  t['heart'] = (p(15, -25, 165), (60 * sw * v(), 50 * sa * v(), 55 * s * v()))
  t['liver'] = (p(-40, 10, 265), (90 * sw * v(), 80 * sa * v(), 70 * s * v()))
  t['spleen'] = (p(80, 45, 265), (35 * sw * v(), 50 * sa * v(), 55 * s * v()))
  t['kidneys'] = [
    (p(-65, 60, 330), (30 * sw, 28 * sa, 55 * s * v())),
    (p(65, 60, 315), (30 * sw, 28 * sa, 55 * s * v())),
  ]
  carina = p(0, 0, 75)
  t['airways'] = [
    (p(0, -5, -10), carina, 9 * s),
    (carina, p(-45, 10, 100), 6.5 * s),
    (carina, p(45, 10, 110), 6 * s),
  ]
  arch_top, desc = p(22, 8, 45), p(28, 38, 62)
  t['aorta'] = [
    (p(12, -25, 125), p(12, -22, 60), 12 * s),
    (p(12, -22, 60), arch_top, 12 * s),
    (arch_top, desc, 12 * s),
    (desc, p(20, 45, 420), 10 * s),
  ]
  t['spine'] = (0.0, 65 * sa, 18 * s)
  t['hu'] = {
    'fat': -100 + j(10),
    'soft_tissue': 40 + j(5),
    'lung': -850 + j(20),
    'heart': 45 + 180 * contrast,
    'aorta': 50 + 220 * contrast,
    'liver': 60 + j(6),
    'spleen': 50 + j(5),
    'kidney': 35 + 150 * contrast,
  }
  (rc, rr), (lc, lr), (hc, hr) = t['lungs'][0], t['lungs'][1], t['heart']
  lv, sp, kr, kl = t['liver'], t['spleen'], t['kidneys'][0], t['kidneys'][1]
  t['landmarks'] = {
    'tracheal_bifurcation': carina,
    'aortic_arch': arch_top,
    'cardiac_apex': (hc[0] + 0.75 * hr[0], hc[1] - 0.35 * hr[1], hc[2] + 0.5 * hr[2]),
    'lung_apex_right': (rc[0], rc[1], rc[2] - 0.97 * rr[2]),
    'lung_apex_left': (lc[0], lc[1], lc[2] - 0.97 * lr[2]),
    'costophrenic_angle_right': (rc[0] - 0.7 * rr[0], rc[1] + 0.2 * rr[1], rc[2] + 0.62 * rr[2]),
    'costophrenic_angle_left': (lc[0] + 0.7 * lr[0], lc[1] + 0.2 * lr[1], lc[2] + 0.62 * lr[2]),
    'liver_dome': (lv[0][0], lv[0][1], lv[0][2] - lv[1][2]),
    'kidney_upper_pole_right': (kr[0][0], kr[0][1], kr[0][2] - kr[1][2]),
    'kidney_upper_pole_left': (kl[0][0], kl[0][1], kl[0][2] - kl[1][2]),
    'spleen_tip': (sp[0][0], sp[0][1], sp[0][2] + sp[1][2]),
    'l3_vertebra': (0.0, t['spine'][1], 370 * s),
  }
  return t


def _paint_torso(g, t, rng):
  """Paints the torso on grid ``g``; returns the set of organs that appear."""
  hu, organs = t['hu'], set()
  zb, ax, ay = t['body_z'], t['body_ax'], t['body_ay']

  def radii(z, inset=0.0):  # Per-slice body semi-axes as 1 / r^2, so the 3D work is two FMAs.
    return ((np.interp(z, zb, ax) - inset) ** -2).astype(np.float32), (
      (np.interp(z, zb, ay) - inset) ** -2
    ).astype(np.float32)

  x2, y2 = g.x * g.x, g.y * g.y

  def body(inset):
    def inside(x, y, z):
      ibx, iby = radii(z, inset)
      return x2 * ibx + y2 * iby < 1

    return inside

  g.paint(zb[0], t['length'], body(0), hu['fat'], TISSUES['fat'])
  g.paint(zb[0], t['length'], body(min(t['fat'], 30)), hu['soft_tissue'], TISSUES['soft_tissue'])
  for c, r in t['lungs']:
    f, lo, hi = _ellipsoid(c, r, rng.uniform(0, 0.1), rng.uniform(0, 6.3))
    if g.paint(lo, hi, f, hu['lung'], TISSUES['lung']):
      organs.add('lungs')
  for name, tissue, shapes in (('aorta', 'aorta', t['aorta']), ('trachea', 'airway', t['airways'])):
    for a, b, radius in shapes:
      f, lo, hi = _tube(a, b, radius)
      if g.paint(lo, hi, f, hu.get(tissue, -1000), TISSUES[tissue]):
        organs.add(name)
  for name, tissue, shapes in (
    ('heart', 'heart', [t['heart']]),
    ('liver', 'liver', [t['liver']]),
    ('spleen', 'spleen', [t['spleen']]),
    ('kidneys', 'kidney', t['kidneys']),
  ):
    for c, r in shapes:
      f, lo, hi = _ellipsoid(c, r, rng.uniform(0, 0.15), rng.uniform(0, 6.3))
      if g.paint(lo, hi, f, hu[tissue], TISSUES[tissue]):
        organs.add(name)

  # Ribs: a shell under the body wall, banded in z and sloping down anteriorly like real ribs.
  def ribs(x, y, z):
    ibx, iby = radii(z)
    rho2 = x2 * ibx + y2 * iby
    band = np.mod(z - 25 * y * np.sqrt(iby), 24.0) < 9.0
    return (rho2 > 0.84**2) & (rho2 < 0.91**2) & band

  g.paint(15, 250 * t['length'] / 440, ribs, 700, TISSUES['bone'])
  sx, sy, sr = t['spine']
  # Vertebral bodies (cancellous core, cortical rim) separated by 5 mm discs every 30 mm.
  vert = lambda r: lambda x, y, z: ((x - sx) ** 2 + (y - sy) ** 2 < r * r) & (np.mod(z, 30) > 5)  # pylint: disable=unnecessary-lambda-assignment
  g.paint(0, t['length'], vert(sr), 900, TISSUES['bone'])
  g.paint(0, t['length'], vert(sr - 3), 350, TISSUES['bone'])
  g.paint(
    0, t['length'], lambda x, y, z: (x - sx) ** 2 + (y - sy - 30) ** 2 < 64, 700, TISSUES['bone']
  )
  organs.add('bone')
  return organs


def _lesion_in(organ, zlo, zhi, radius, rng):
  """Random lesion centre inside ``organ`` (centre, radii) at z in [zlo, zhi] (clipped to the organ)."""
  (cx, cy, cz), (rx, ry, rz) = organ
  z = np.clip(rng.uniform(zlo, zhi), cz - 0.75 * rz, cz + 0.75 * rz)
  f = np.sqrt(max(1 - ((z - cz) / rz) ** 2, 0.0))
  a, rr = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1))
  scale = 0.65 * f * rr
  return (
    cx + scale * max(rx - radius, 1) * np.cos(a),
    cy + scale * max(ry - radius, 1) * np.sin(a),
    z,
  )


def _canonical_torso(t, pos):
  xmax = float(np.max(t['body_ax']))
  # Clipped: jittered apices can sit a few mm above the torso's nominal top.
  return np.clip((pos[2] / t['length'], (pos[0] + xmax) / (2 * xmax)), 0, 1)


def _ct(rng, size, label):
  t = _torso(rng)
  region = 'chest' if rng.uniform() < 0.5 else 'abdomen'
  core = lm.LANDMARKS[0:8] if region == 'chest' else lm.LANDMARKS[7:12]
  centre = t['landmarks'][core[rng.integers(len(core))]][2] + rng.uniform(-24, 24)
  radius = rng.uniform(8, 20) if region == 'chest' else rng.uniform(10, 25)
  # A site in the lungs (chest) or liver (abdomen), away from the heart and liver in the chest:
  # the slab is centred near it whatever the label, so its position says nothing of the label.
  for _ in range(20):
    organ = t['lungs'][rng.integers(2)] if region == 'chest' else t['liver']
    lesion = _lesion_in(organ, centre - 20, centre + 20, radius, rng)
    if region == 'abdomen' or not any(
      _ellipsoid(c, r)[0](*lesion) for c, r in (t['heart'], t['liver'])
    ):
      break
  centre = np.clip(centre, lesion[2] - 32 + radius + 1, lesion[2] + 32 - radius - 1)
  z0 = float(np.clip(np.round(centre - CT_SLICES / 2), 0, np.floor(t['length']) - CT_SLICES))
  theta, tx, ty = np.deg2rad(rng.uniform(-8, 8)), rng.uniform(-15, 15), rng.uniform(-15, 15)
  pix = _TORSO_FOV / size
  u = (np.arange(size, dtype=np.float32) + 0.5) * pix - _TORSO_FOV / 2
  uu, vv = u[:, None, None] - ty, u[None, :, None] - tx  # rows: AP, cols: right -> left
  cos, sin = float(np.cos(theta)), float(np.sin(theta))  # Python floats keep the grid float32.
  g = _Grid(cos * vv + sin * uu, -sin * vv + cos * uu, z0 + 0.5 + np.arange(CT_SLICES), zaxis=2)
  organs = _paint_torso(g, t, rng)
  mask = np.zeros((size, size), np.uint8)
  if label:
    # Diffuse findings, visible to globally pooled features in the soft-tissue window at any
    # resolution: a pleural effusion (fluid layering in the posterior lung) in chest slabs, hepatic
    # steatosis (fatty liver, 40-80 HU below normal) in abdominal slabs.
    if region == 'chest':
      inside = np.zeros(g.vol.shape, bool)
      sides = [rng.integers(2)] if rng.uniform() < 0.5 else [0, 1]
      for c, r in (t['lungs'][k] for k in sides):
        level = c[1] + r[1] * (1 - 2 * rng.uniform(0.3, 0.6))  # fluid fills 30-60 % of the depth
        inside |= (g.lab == TISSUES['lung']) & (np.abs(g.x - c[0]) < r[0]) & (g.y > level)
      g.vol[inside] = rng.uniform(0, 20)
    else:
      inside = g.lab == TISSUES['liver']
      g.vol[inside] -= rng.uniform(40, 80)
    g.lab[inside] = TISSUES['lesion']
    mask = inside.any(axis=2).astype(np.uint8)
  g.vol[g.lab == 0] = -1000
  g.vol += rng.standard_normal(g.vol.shape, dtype=np.float32) * 10
  image = np.clip(np.rint(g.vol), -1024, 3071).astype(np.int16)
  pts, vis, canon = lm.empty_landmarks()
  for name, pos in t['landmarks'].items():
    if z0 <= pos[2] < z0 + CT_SLICES:
      k = lm.landmark_index(name)
      x, y = pos[0], pos[1]
      pts[k] = (
        (sin * x + cos * y + ty) / _TORSO_FOV + 0.5,
        (cos * x - sin * y + tx) / _TORSO_FOV + 0.5,
      )
      vis[k], canon[k] = True, _canonical_torso(t, pos)
  return dict(
    image=image,
    region=region,
    spacing=np.array([pix, pix, 1.0], np.float32),
    landmarks=np.clip(pts, 0, 1),
    landmark_visible=vis,
    landmarks_canonical=canon,
    organs=lm.organ_multi_hot(organs),
    mask=mask,
  ), g.lab


def _xray(rng, size, label):
  t = _torso(rng)
  tx = rng.uniform(-15, 15)
  pix = _TORSO_FOV / size
  u = (np.arange(size, dtype=np.float32) + 0.5) * pix
  ap = np.linspace(-170, 170, _XRAY_AP_SAMPLES, dtype=np.float32)
  g = _Grid(u[None, :, None] - _TORSO_FOV / 2 - tx, ap[None, None, :], u + _XRAY_TOP, zaxis=0)
  organs = _paint_torso(g, t, rng)
  mask = np.zeros((size, size), np.uint8)
  if label:  # Pneumonia: overlapping consolidation blobs of different density in one lung.
    c, r = t['lungs'][rng.integers(2)]
    for _ in range(rng.integers(3, 7)):
      centre = _lesion_in((c, r), c[2] - 0.2 * r[2], c[2] + 0.6 * r[2], 15, rng)
      f, lo, hi = _ellipsoid(centre, rng.uniform(25, 50, size=3), 0.2, rng.uniform(0, 6.3))
      # Consolidation: alveoli filled with fluid, near water density (lobar pneumonia).
      g.paint(lo, hi, f, rng.uniform(-300, 0), TISSUES['lesion'], TISSUES['lung'])
    mask = (g.lab == TISSUES['lesion']).any(axis=2).astype(np.uint8)
    if not mask.any():  # Every blob missed the lung (rare): mark the lung centre.
      mask[
        min(int((c[2] - _XRAY_TOP) / pix), size - 1),
        min(max(int((c[0] + tx + _TORSO_FOV / 2) / pix), 0), size - 1),
      ] = 1
  g.vol[g.lab == 0] = -1000
  line_integral = (np.maximum(g.vol + 1000, 0) * (_MU_WATER / 1000)).sum(axis=2) * (ap[1] - ap[0])
  line_integral *= 1 + 0.02 * rng.standard_normal(line_integral.shape, dtype=np.float32)
  # Per-image window, as CLAHE-normalised radiographs are; gamma < 1 lifts the lung fields.
  scale = np.percentile(line_integral, 99.5) * rng.uniform(0.95, 1.05)
  image = (np.clip(line_integral / scale, 0, 1) ** 0.8 * 255).round().astype(np.uint8)[..., None]
  pts, vis, canon = lm.empty_landmarks()
  for name in lm.LANDMARKS[0:8]:
    pos, k = t['landmarks'][name], lm.landmark_index(name)
    pts[k] = ((pos[2] - _XRAY_TOP) / _TORSO_FOV, (pos[0] + tx) / _TORSO_FOV + 0.5)
    vis[k], canon[k] = True, _canonical_torso(t, pos)
  return dict(
    image=image,
    region='chest',
    spacing=np.array([pix, pix, 0.0], np.float32),
    landmarks=np.clip(pts, 0, 1),
    landmark_visible=vis,
    landmarks_canonical=canon,
    organs=lm.organ_multi_hot(organs),
    mask=mask,
  ), g.lab


# (T1, T2, FLAIR) signal per tissue, the textbook order: T1 WM > GM > CSF; T2 CSF bright;
# FLAIR CSF suppressed; tumour and oedema bright on T2/FLAIR, dark on T1.
_MR_SIGNAL = {
  'scalp': (0.95, 0.6, 0.55),
  'bone': (0.05, 0.05, 0.05),
  'csf': (0.12, 1.0, 0.07),
  'grey_matter': (0.6, 0.55, 0.6),
  'white_matter': (0.85, 0.35, 0.42),
  'lesion': (0.4, 0.8, 0.85),
  'oedema': (0.5, 0.88, 0.95),
}


def _mri(rng, size, label):
  s = rng.uniform(0.9, 1.1)
  hr = np.array([75, 95, 110]) * s * rng.uniform(0.95, 1.05, 3)
  head_c = np.array([0, 0, hr[2]])
  z = rng.uniform(60, 100) * s  # Centred on the landmark levels so most slices show some.
  theta, tx, ty = np.deg2rad(rng.uniform(-10, 10)), rng.uniform(-10, 10), rng.uniform(-10, 10)
  pix = _HEAD_FOV / size
  u = (np.arange(size, dtype=np.float32) + 0.5) * pix - _HEAD_FOV / 2
  uu, vv = u[:, None, None] - ty, u[None, :, None] - tx
  cos, sin = float(np.cos(theta)), float(np.sin(theta))  # Python floats keep the grid float32.
  g = _Grid(cos * vv + sin * uu, -sin * vv + cos * uu, [z], zaxis=2)
  gyri = rng.uniform(0, 6.3)
  layers = (('scalp', 0), ('bone', 6), ('csf', 12), ('grey_matter', 15))
  for name, inset in layers:
    g.paint(z, z, _ellipsoid(head_c, hr - inset)[0], 0, TISSUES[name])

  def white(x, y, zz):  # Gyral folding: the GM ribbon's inner edge wobbles with angle.
    r = hr - 20
    rho = (x / r[0]) ** 2 + (y / r[1]) ** 2 + ((zz - head_c[2]) / r[2]) ** 2
    return rho * (1 + 0.12 * np.sin(14 * np.arctan2(y, x) + gyri)) < 1

  g.paint(z, z, white, 0, TISSUES['white_matter'])
  vent = lambda c, r: _ellipsoid(np.array(c) * s, np.array(r) * s * rng.uniform(0.8, 1.3))[0]  # pylint: disable=unnecessary-lambda-assignment
  for side in (-1, 1):
    g.paint(z, z, vent((side * 18, 5, 80), (10, 14, 11)), 0, TISSUES['grey_matter'])  # deep GM
    g.paint(z, z, vent((side * 8, -5, 70), (6, 25, 15)), 0, TISSUES['csf'])  # lateral ventricles
  mask = np.zeros((size, size), np.uint8)
  if label:
    core = rng.uniform(6, 14)
    c = (
      rng.choice([-1, 1]) * rng.uniform(20, 45) * s,
      rng.uniform(-45, 45) * s,
      z + rng.uniform(-0.5, 0.5) * core,
    )
    rim = core * rng.uniform(1.5, 2.2)
    for name, r in (('oedema', rim), ('lesion', core)):  # Only inside the brain and its CSF.
      m = ((g.x - c[0]) ** 2 + (g.y - c[1]) ** 2 + (g.z - c[2]) ** 2 < r * r) & (g.lab >= 13)
      g.lab[m] = TISSUES[name]
    mask = (np.isin(g.lab, [TISSUES['lesion'], TISSUES['oedema']])[..., 0]).astype(np.uint8)
  lab = g.lab[..., 0]
  image = np.zeros((size, size, 3), np.float32)
  for name, signal in _MR_SIGNAL.items():
    image[lab == TISSUES[name]] = signal
  # Smooth bias field and Rician noise, as in real magnitude images before normalisation.
  bias = 1 + 0.1 * (rng.uniform(-1, 1) * uu[..., 0] + rng.uniform(-1, 1) * vv[..., 0]) / _HEAD_FOV
  n1, n2 = rng.standard_normal((2, size, size, 3), dtype=np.float32) * 0.03
  image = np.sqrt((image * bias[..., None] + n1) ** 2 + n2**2)
  head = lab > 0
  mean, std = image[head].mean(0), image[head].std(0) + 1e-6
  image = ((image - mean) / std).astype(np.float16)
  pts, vis, canon = lm.empty_landmarks()
  pole = lambda zz: 0.95 * (hr[1] - 15) * np.sqrt(1 - ((zz - hr[2]) / (hr[2] - 15)) ** 2)  # pylint: disable=unnecessary-lambda-assignment
  marks = {
    'anterior_commissure': (0, -3 * s, 88 * s),
    'posterior_commissure': (0, 22 * s, 88 * s),
    'frontal_pole': (0, -pole(70 * s), 70 * s),
    'occipital_pole': (0, pole(82 * s), 82 * s),
  }
  for name, (x, y, zz) in marks.items():
    if abs(zz - z) <= 7:  # Near the (5 mm) slice: the in-plane position is still meaningful.
      k = lm.landmark_index(name)
      pts[k] = (
        (sin * x + cos * y + ty) / _HEAD_FOV + 0.5,
        (cos * x - sin * y + tx) / _HEAD_FOV + 0.5,
      )
      vis[k], canon[k] = True, (zz / (2 * hr[2]), (x + hr[0]) / (2 * hr[0]))
  return dict(
    image=image,
    region='brain',
    spacing=np.array([pix, pix, 5.0], np.float32),
    landmarks=np.clip(pts, 0, 1),
    landmark_visible=vis,
    landmarks_canonical=canon,
    organs=lm.organ_multi_hot(['brain', 'bone']),
    mask=mask,
  ), lab


_MAKERS = {'ct': _ct, 'xray': _xray, 'mri': _mri}


def make_record_with_truth(
  modality: str, index: int, *, seed: int, image_size: int, split: str
) -> tuple[dict, np.ndarray]:
  """``(record, tissue labels)``; labels use ``TISSUES`` codes on the record's sampling grid
  (CT ``(S, S, 64)``, X-ray ``(S, S, AP samples)``, MRI ``(S, S)``)."""
  if modality not in _MAKERS:
    raise ValueError(f'unknown phantom modality {modality!r}; expected one of {MODALITIES}')
  key = [seed, zlib.crc32(split.encode()), _SEED_ORDER.index(modality), index]
  rng = np.random.default_rng(np.random.SeedSequence(key))
  label = int(rng.integers(2))
  record, truth = _MAKERS[modality](rng, image_size, label)
  subject = hashlib.sha256(f'phantom/{seed}/{split}/{modality}/{index}'.encode()).hexdigest()[:16]
  record.update(
    modality=modality, source='phantom', subject=subject, label=np.array(label, np.int32)
  )
  rec.validate(record, where=f'phantom {split}/{modality}/{index}')
  return record, truth


def make_record(modality: str, index: int, *, seed: int, image_size: int, split: str) -> dict:
  """One phantom record; the same ``(seed, split, modality, index, image_size)`` gives the same bytes."""
  return make_record_with_truth(modality, index, seed=seed, image_size=image_size, split=split)[0]


def _params(seed, image_size, counts):
  return {
    'generator': 'phantoms',
    'seed': int(seed),
    'image_size': int(image_size),
    'counts': {s: {m: int(n) for m, n in sorted(c.items())} for s, c in sorted(counts.items())},
    'code_version': version.code_version(),
  }


def default_root(workdir: str, seed: int, image_size: int, counts: dict) -> str:
  """``workdir/phantoms-<hash of the parameters>``: a cache never serves other settings."""
  blob = json.dumps(_params(seed, image_size, counts), sort_keys=True).encode()
  return os.path.join(workdir, f'phantoms-{hashlib.sha256(blob).hexdigest()[:10]}')


class _Records:
  """Lazy, sized stream of one modality's phantoms (shards need the count before the records)."""

  def __init__(self, modality, n, seed, image_size, split, bar):
    self.args, self.n, self.bar = (modality, seed, image_size, split), n, bar

  def __len__(self):
    return self.n

  def __iter__(self):
    modality, seed, image_size, split = self.args
    for i in range(self.n):
      yield make_record(modality, i, seed=seed, image_size=image_size, split=split)
      if self.bar is not None:
        self.bar.update(1)


def build(
  root: str, *, seed: int, image_size: int, counts: dict[str, dict[str, int]], progress: bool = True
) -> str:
  """Writes every split of ``counts`` (split -> modality -> n) under ``root``; cached per split.

  Each split is written into a temporary folder inside ``root`` and renamed into place, so a
  reader never sees half a split and two builders of one cache (two runs started together) do
  not write into each other's files: the second to finish finds the split complete and uses it.
  """
  params = _params(seed, image_size, counts)
  todo = []
  for split, per_modality in counts.items():
    meta = dict(params, counts=params['counts'][split], split=split)
    if not _complete(root, split, meta):
      todo.append((split, per_modality, meta))
  if not todo:
    return root
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top

    bar = tqdm.tqdm(total=sum(sum(c.values()) for _, c, _ in todo), desc='phantoms', unit='rec')
  try:
    for split, per_modality, meta in todo:
      records = {m: _Records(m, n, seed, image_size, split, bar) for m, n in per_modality.items()}
      _build_split(root, split, records, meta, seed)
  finally:
    if bar is not None:
      bar.close()
  return root


def _complete(root: str, split: str, meta: dict) -> bool:
  """Whether ``root/split`` holds the split of exactly these parameters (its manifest says so)."""
  try:
    return shards.read_manifest(root, split).get('meta') == meta
  except shards.ShardError:
    return False


def _build_split(root: str, split: str, records: dict, meta: dict, seed: int) -> None:
  os.makedirs(root, exist_ok=True)
  # Same parent as the split, so the rename below stays on one filesystem (atomic).
  tmp = tempfile.mkdtemp(prefix=f'.{split}.building-', dir=root)
  try:
    shards.write_split(
      tmp,
      split,
      records,
      seed=seed,
      label_names={m: LABEL_NAMES[m] for m in records},
      meta=meta,
    )
    _publish(os.path.join(tmp, split), root, split, meta)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _publish(built: str, root: str, split: str, meta: dict) -> None:
  """Renames the finished split ``built`` to ``root/split``; a complete split of the same
  parameters already there (a concurrent builder's) is kept and ``built`` discarded."""
  target = os.path.join(root, split)
  for _ in range(10):
    try:
      os.rename(built, target)  # atomic; fails when the target is a non-empty folder
      return
    except OSError as e:
      if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
        raise
    if _complete(root, split, meta):
      return
    # An old split (other parameters, or left half-written by an older version): move it
    # aside in one rename, then delete it, so the target is never half old and half new.
    aside = tempfile.mkdtemp(prefix=f'.{split}.old-', dir=root)
    try:
      os.rename(target, os.path.join(aside, split))
    except FileNotFoundError:
      pass  # another builder moved it first
    finally:
      shutil.rmtree(aside, ignore_errors=True)
  raise OSError(f'{target}: could not be replaced (other builders keep writing it)')
