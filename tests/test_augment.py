"""Augmentation: landmark tracking, visibility, firing rates, crop guarantee, determinism."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from aacp_jax import augment, augment_defaults, losses

K = 5


def _cfg(**over):
  cfg = augment_defaults.default_config()
  for path, value in over.items():
    node = cfg
    *parents, leaf = path.split('.')
    for name in parents:
      node = node[name]
    node[leaf] = value
  return cfg


def _spatial_only(elastic_p, **over):
  """Every spatial op likely, no photometric op or cutout (they would move the brightest point)."""
  return _cfg(
    **{
      'rotation.p': 1.0,
      'scale.p': 1.0,
      'translation.p': 1.0,
      'flip.p': 0.5,
      'elastic.p': elastic_p,
      'brightness.p': 0.0,
      'contrast.p': 0.0,
      'noise.p': 0.0,
      'cutout.p': 0.0,
      **over,
    }
  )


def _dots(landmarks, h, w, sigma_px=1.0):
  """One channel per landmark: a Gaussian dot at its pixel position (pixel centre i at (i+.5)/N)."""
  py = landmarks[:, 0] * h - 0.5
  px = landmarks[:, 1] * w - 0.5
  yy = jnp.arange(h, dtype=jnp.float32)[:, None, None]
  xx = jnp.arange(w, dtype=jnp.float32)[None, :, None]
  return 255.0 * jnp.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * sigma_px**2))


def _refine(img, iy, ix):
  """Sub-pixel peak: a parabola through the brightest pixel and its neighbours, per axis."""
  h, w = img.shape

  def axis(v_m, v_0, v_p, i, n):
    den = v_m - 2 * v_0 + v_p
    off = jnp.where(den < 0, 0.5 * (v_m - v_p) / jnp.where(den < 0, den, -1.0), 0.0)
    return i + jnp.where((i > 0) & (i < n - 1), jnp.clip(off, -0.5, 0.5), 0.0)

  at = lambda y, x: img[jnp.clip(y, 0, h - 1), jnp.clip(x, 0, w - 1)]
  return jnp.stack(
    [
      axis(at(iy - 1, ix), at(iy, ix), at(iy + 1, ix), iy, h),
      axis(at(iy, ix - 1), at(iy, ix), at(iy, ix + 1), ix, w),
    ]
  )


@functools.partial(jax.jit, static_argnames=('hw', 'n', 'cfg'))
def _track(key, hw, n, cfg):
  """Per draw: random landmarks and visibility, dot image, augment; brightest point per channel."""

  def one(k):
    kl, kv, ka = jax.random.split(k, 3)
    lm = jax.random.uniform(kl, (K, 2), minval=0.1, maxval=0.9)
    vis = jax.random.uniform(kv, (K,)) < 0.8
    img = _dots(lm, *hw)
    params = augment.sample_params(ka, lm, vis, 'xray', cfg)
    out, lm2, vis2, _ = augment.apply_params(params, img, lm, vis, 'xray', cfg)
    flat = jnp.argmax(out.reshape(-1, K), axis=0)
    peak = jax.vmap(_refine, in_axes=(2, 0, 0))(out, flat // hw[1], flat % hw[1])
    # Same transform with every landmark marked visible: which ones stay in the field.
    _, _, vis_all, _ = augment.apply_params(params, img, lm, jnp.ones((K,), bool), 'xray', cfg)
    return peak, lm2, vis, vis2, vis_all, params['fired']['elastic']

  return jax.vmap(one)(jax.random.split(key, n))


# Draws per image size: the acceptance asks 1,000 at 64 px; 224 px is the full-size check.
@pytest.mark.parametrize('hw,n', [((64, 64), 1000), ((224, 224), 32)])
def test_landmarks_follow_the_image(hw, n):
  """Brightest point of each landmark's dot: within 1 px (affine) / 2 px (with elastic)."""
  cfg = ml_collections.FrozenConfigDict(_spatial_only(0.5))
  out = _track(jax.random.PRNGKey(hw[0]), hw, n, cfg)
  peak, lm2, vis, vis2, vis_all, elastic = map(np.asarray, out)
  assert not np.any(vis2 & ~vis), 'an invisible landmark became visible'
  np.testing.assert_array_equal(vis2, vis & vis_all)
  assert 0 < elastic.mean() < 1
  # Keep clear of the border where a dot is half cut off and its peak clamps to the edge pixel.
  px = np.array(hw, np.float32)
  inner = vis2 & np.all((lm2 > 1.5 / px) & (lm2 < 1 - 1.5 / px), axis=-1)
  assert inner.sum() > 0.4 * vis.size
  err = np.linalg.norm(peak - (lm2 * px - 0.5), axis=-1)
  assert err[inner & ~elastic[:, None]].max() <= 1.0
  assert err[inner & elastic[:, None]].max() <= 2.0
  # Landmarks that left the field are flagged, and the flag follows the coordinates.
  assert (vis & ~vis2).sum() > 0
  assert np.all(np.all((lm2 >= 0) & (lm2 <= 1), axis=-1)[vis2])


def test_rotation_is_rigid_in_pixels_on_non_square_images():
  p = augment.identity_params()
  p['angle'] = jnp.float32(0.4)
  hw = np.array([40.0, 72.0])
  lm = np.array([[0.5, 0.5], [0.3, 0.6], [0.6, 0.35], [0.45, 0.7], [0.55, 0.45]], np.float32)
  _, lm2, vis2, _ = augment.apply_params(
    p, np.zeros((40, 72, 1), np.float32), lm, np.ones(K, bool), 'mri'
  )
  assert np.all(np.asarray(vis2))
  dist = lambda x: np.linalg.norm((x[:, None] - x[None]) * hw, axis=-1)
  np.testing.assert_allclose(dist(np.asarray(lm2)), dist(lm), atol=1e-3)


def test_visibility_at_the_borders():
  p = augment.identity_params()
  p['translate'] = jnp.array([0.0, 0.1])
  lm = jnp.array([[0.5, 0.85], [0.5, 0.95], [0.5, 0.999], [0.5, 0.5], [0.5, -0.05]])
  vis = jnp.array([True, True, True, False, True])
  img = jnp.zeros((32, 32, 1))
  _, lm2, vis2, lin = augment.apply_params(p, img, lm, vis, 'mri')
  np.testing.assert_array_equal(np.asarray(vis2), [True, False, False, False, True])
  np.testing.assert_allclose(np.asarray(lm2[0]), [0.5, 0.95], atol=1e-6)
  np.testing.assert_allclose(np.asarray(lm2[4]), [0.5, 0.05], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(lm2[1:4]), 0.0)  # invisible hold (0, 0)
  np.testing.assert_allclose(np.asarray(lin), np.eye(2), atol=1e-6)


def test_identity_is_exact_and_ct_fills_with_air():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(16, 20, 3)).astype(np.float32)
  p = augment.identity_params()
  out, _, _, _ = augment.apply_params(p, img, np.zeros((K, 2)), np.zeros(K, bool), 'mri')
  np.testing.assert_allclose(np.asarray(out), img, atol=1e-5)
  p['translate'] = jnp.array([0.0, 0.25])  # shift right by 8 of 32 px: the left strip is outside
  ct = np.zeros((32, 32, 4), np.float32)  # 0 HU water -> 0.4 in the [-160, 240] window
  out, _, _, _ = augment.apply_params(p, ct, np.zeros((K, 2)), np.zeros(K, bool), 'ct')
  out = np.asarray(out)
  np.testing.assert_allclose(out[:, :7], 0.0, atol=1e-6)
  np.testing.assert_allclose(out[:, 9:], 0.4, atol=1e-6)


def test_preprocess_windows_and_scales():
  hu = jnp.array([-1200.0, -160.0, 40.0, 240.0, 900.0]).reshape(1, 1, 5, 1)
  np.testing.assert_allclose(
    np.asarray(augment.preprocess(hu, 'ct')).ravel(), [0, 0, 0.5, 1, 1], atol=1e-6
  )
  lung = np.asarray(augment.preprocess(hu, 'ct', _cfg(ct_window='lung'))).ravel()
  np.testing.assert_allclose(lung, np.clip((np.asarray(hu).ravel() + 1000) / 1400, 0, 1), atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(augment.preprocess(jnp.full((2, 2, 1), 51.0), 'xray')), 0.2, atol=1e-6
  )
  mri = jnp.linspace(-3, 3, 12).reshape(2, 2, 3)
  np.testing.assert_array_equal(np.asarray(augment.preprocess(mri, 'mri')), np.asarray(mri))
  with pytest.raises(ValueError):
    augment.preprocess(hu, 'pet')


def test_photometric_ops_and_cutout():
  img = jnp.full((16, 16, 1), 102.0)  # 0.4 after /255
  p = augment.identity_params()
  p['brightness'] = jnp.float32(0.05)
  p['fired'] = dict(p['fired'], cutout=jnp.bool_(True))
  p['cutout_box'] = jnp.array([0.25, 0.25, 0.25, 0.25])  # the 4x4 block at rows/cols 2..5
  lm, vis = jnp.array([[0.25, 0.25]] * K), jnp.ones(K, bool)
  out, _, vis2, _ = augment.apply_params(p, img, lm, vis, 'xray')
  out = np.asarray(out)[..., 0]
  assert np.all(out[2:6, 2:6] == 0.0) and (out == 0.0).sum() == 16
  np.testing.assert_allclose(out[8:, 8:], 0.45, atol=1e-6)
  assert np.all(np.asarray(vis2))  # cutout does not touch visibility


@functools.partial(jax.jit, static_argnames=('modality', 'cfg'))
def _draws(key, modality, cfg, n=10_000):
  kl, kc, kv, ks = jax.random.split(key, 4)
  # Half the draws spread over the image, half clustered: both crop branches get exercised.
  centre = jax.random.uniform(kc, (n, 1, 2), minval=0.2, maxval=0.8)
  spread = jnp.where(jnp.arange(n)[:, None, None] % 2 == 0, 0.5, 0.1)
  lm = jnp.clip(centre + spread * jax.random.uniform(kl, (n, 8, 2), minval=-1, maxval=1), 0, 1)
  vis = jax.random.uniform(kv, (n, 8)) < 0.7
  params = jax.vmap(lambda k, l, v: augment.sample_params(k, l, v, modality, cfg))(
    jax.random.split(ks, n), lm, vis
  )
  return params, lm, vis


def _rate_ok(fired, p):
  n = fired.size
  return abs(fired.mean() - p) <= 3 * np.sqrt(p * (1 - p) / n) + 1e-12


@pytest.mark.parametrize('modality', ['xray', 'ct', 'mri'])
def test_firing_rates_and_crop_keeps_landmarks(modality):
  cfg = augment_defaults.default_config()
  frozen = ml_collections.FrozenConfigDict(cfg)  # static jit argument: must hash
  params, lm, vis = jax.tree.map(np.asarray, _draws(jax.random.PRNGKey(2), modality, frozen))
  fired = params['fired']
  flip_p = cfg.flip.p if modality in cfg.symmetric_modalities else 0.0
  expect = {
    'crop': 1.0,
    'rotate': cfg.rotation.p,
    'translate': cfg.translation.p,
    'scale': cfg.scale.p,
    'flip': flip_p,
    'elastic': cfg.elastic.p,
    'brightness': cfg.brightness.p,
    'contrast': cfg.contrast.p,
    'noise': cfg.noise.p,
    'cutout': cfg.cutout.p,
  }
  assert set(expect) == set(augment.OPS)
  for op, p in expect.items():
    assert _rate_ok(np.broadcast_to(fired[op], (10_000,)), p), (op, fired[op].mean(), p)
  if modality != 'xray':
    assert not np.any(fired['flip'])
  # Ranges: values of ops that fired lie in their ranges, others are the identity.
  assert np.all(np.abs(np.rad2deg(params['angle'])) <= cfg.rotation.max_deg + 1e-4)
  assert np.all(params['angle'][~fired['rotate']] == 0)
  assert np.all((params['scale'] >= 0.9) & (params['scale'] <= 1.1))
  assert np.all(np.abs(params['translate']) <= cfg.translation.max_frac + 1e-6)
  # The anatomy-aware crop holds every visible landmark (with margin, clipped) in all draws.
  y0x0, hw = params['crop'][:, :2], params['crop'][:, 2:]
  m, eps = cfg.crop.margin, 1e-5
  assert np.all(y0x0 >= -eps) and np.all(y0x0 + hw <= 1 + eps)
  lo = np.clip(lm - m, 0, 1)
  hi = np.clip(lm + m, 0, 1)
  inside = (lo >= y0x0[:, None] - eps) & (hi <= (y0x0 + hw)[:, None] + eps)
  assert np.all(inside.all(-1) | ~vis)
  area = hw.prod(-1)
  assert area.min() >= cfg.crop.area[0] - eps  # growing to fit only ever enlarges the window
  assert np.mean(area < 0.9) > 0.3  # and the window is really random, not always the full image


def test_simclr_ablation_ignores_anatomy():
  cfg = _cfg(anatomy_aware=False)
  params, _, _ = _draws(jax.random.PRNGKey(2), 'ct', ml_collections.FrozenConfigDict(cfg))
  fired = jax.tree.map(np.asarray, params['fired'])
  assert _rate_ok(np.broadcast_to(fired['flip'], (10_000,)), cfg.simclr.flip_p)  # even for CT
  for op in ('rotate', 'translate', 'scale', 'elastic'):
    assert not np.any(fired[op])
  area = np.asarray(params['crop'][:, 2] * params['crop'][:, 3])
  assert area.min() < 0.2  # SimCLR scale range (0.08, 1) regardless of landmarks


@pytest.mark.parametrize('modality,channels', [('xray', 1), ('mri', 3), ('ct', 64)])
def test_shapes_dtypes_and_determinism(modality, channels):
  rng = np.random.default_rng(3)
  images = rng.uniform(0, 255, size=(4, 32, 32, channels)).astype(np.float32)
  lm = rng.uniform(0.2, 0.8, size=(4, K, 2)).astype(np.float32)
  vis = np.ones((4, K), bool)
  key = jax.random.PRNGKey(0)
  a = augment.augment_batch(key, images, lm, vis, modality, augment_defaults.default_config())
  b = augment.augment_batch(key, images, lm, vis, modality, augment_defaults.default_config())
  c = augment.augment_batch(
    jax.random.PRNGKey(1), images, lm, vis, modality, augment_defaults.default_config()
  )
  assert a[0].shape == images.shape and a[0].dtype == jnp.float32
  assert a[1].shape == (4, K, 2) and a[1].dtype == jnp.float32
  assert a[2].shape == (4, K) and a[2].dtype == jnp.bool_
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.allclose(np.asarray(a[0]), np.asarray(c[0]))
  # The per-sample key is split(key, B)[b]: sample 2 alone reproduces batch row 2.
  if modality == 'xray':  # eager augment_one is slow; one modality is enough for the key layout
    one = augment.augment_one(jax.random.split(key, 4)[2], images[2], lm[2], vis[2], modality)
    np.testing.assert_allclose(np.asarray(one[0]), np.asarray(a[0][2]), atol=1e-3)
  # Views of one batch differ from each other.
  assert not np.allclose(np.asarray(a[0][0]), np.asarray(a[0][1]))


def test_linear_transform_makes_spatial_loss_vanish():
  """return_transform's `linear` is what spatial_consistency needs (elastic off: exact)."""
  rng = np.random.default_rng(4)
  images = rng.uniform(0, 255, size=(8, 32, 32, 1)).astype(np.float32)
  lm = rng.uniform(0.1, 0.9, size=(8, K, 2)).astype(np.float32)
  vis = np.ones((8, K), bool)
  cfg = _cfg(**{'elastic.p': 0.0, 'rotation.p': 1.0, 'scale.p': 1.0, 'flip.p': 0.5})
  # A new-style typed key, as the train step uses.
  _, lm2, vis2, lin = augment.augment_batch(
    jax.random.key(5), images, lm, vis, 'xray', cfg, return_transform=True
  )
  assert lin.shape == (8, 2, 2)
  assert np.asarray(vis2).sum() > 0.5 * vis.size
  a_inv = jnp.linalg.inv(lin)
  assert float(losses.spatial_consistency(lm2, vis2, lm, vis, a_inv)) < 1e-9
  eye = jnp.tile(jnp.eye(2), (8, 1, 1))  # ignoring the transform is penalised
  assert float(losses.spatial_consistency(lm2, vis2, lm, vis, eye)) > 1e-4


def test_batched_noise_equals_the_per_sample_path():
  """The batch draws noise only for samples whose noise op fired (a real branch per sample); each
  row still equals augment_one with its own key, noise and cutout included."""
  rng = np.random.default_rng(6)
  images = rng.uniform(0, 255, size=(4, 16, 16, 1)).astype(np.float32)
  lm = rng.uniform(0.2, 0.8, size=(4, K, 2)).astype(np.float32)
  vis = np.ones((4, K), bool)
  cfg = _cfg(**{'noise.p': 0.5, 'cutout.p': 1.0, 'noise.std': 0.5})
  key = jax.random.PRNGKey(11)
  batch = np.asarray(augment.augment_batch(key, images, lm, vis, 'xray', cfg)[0])
  fired = []
  for b, k in enumerate(jax.random.split(key, 4)):
    one = np.asarray(augment.augment_one(k, images[b], lm[b], vis[b], 'xray', cfg)[0])
    np.testing.assert_allclose(one, batch[b], atol=1e-5)
    fired.append(bool(augment.sample_params(k, lm[b], vis[b], 'xray', cfg)['fired']['noise']))
    hole = one[..., 0] == cfg.cutout.fill
    assert hole.any()  # cutout fired and its fill is exact despite the noise
  assert any(fired) and not all(fired)  # both branches exercised by this key


# Records of any size: the resize to the training size is part of the one resample.


def _padded(images, hw):
  out = np.zeros((len(images), *hw, images[0].shape[-1]), images[0].dtype)
  for i, x in enumerate(images):
    out[i, : x.shape[0], : x.shape[1]] = x
  return out, np.array([x.shape[:2] for x in images], np.int32)


def test_padded_record_resizes_like_the_record_alone():
  """Float64: a record inside a padded array, with its extent, gives the same view and landmarks
  as the record alone, for every spatial op (elastic included) and a resize to another size."""
  rng = np.random.default_rng(7)
  cfg = _spatial_only(1.0, **{'crop.margin': 0.0})
  with jax.enable_x64(True):
    for hw, out in (((11, 7), 9),):
      record = rng.normal(size=(*hw, 2))
      lm = rng.uniform(0.2, 0.8, (K, 2))
      vis = np.ones(K, bool)
      padded, extent = _padded([record], (17, 19))
      for seed in range(3):
        p = augment.sample_params(jax.random.PRNGKey(seed), lm, vis, 'mri', cfg)
        alone = augment.apply_params(p, record, lm, vis, 'mri', cfg, out_size=out)
        pad = augment.apply_params(
          p, padded[0], lm, vis, 'mri', cfg, extent=extent[0], out_size=out
        )
        assert alone[0].dtype == jnp.float64 and alone[0].shape == (out, out, 2)
        for a, b in zip(alone, pad):
          np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)


def test_batch_of_mixed_sizes_equals_each_record_alone():
  rng = np.random.default_rng(8)
  records = [rng.uniform(0, 255, (h, w, 1)).astype(np.float32) for h, w in ((12, 9), (5, 14))]
  padded, extent = _padded(records, (12, 14))
  lm = rng.uniform(0.2, 0.8, (2, K, 2)).astype(np.float32)
  vis = np.ones((2, K), bool)
  cfg = _spatial_only(0.0)
  key = jax.random.PRNGKey(3)
  batch = augment.augment_batch(key, padded, lm, vis, 'xray', cfg, extent=extent, out_size=8)
  b, k = 1, jax.random.split(key, 2)[1]  # the record padded along both axes (one compile)
  one = augment.augment_one(k, records[b], lm[b], vis[b], 'xray', cfg, out_size=8)
  for x, y in zip(one, batch):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y[b]), atol=1e-5)


def test_records_at_the_training_size_are_an_exact_identity_of_the_old_path():
  """What phantoms (stored at the training size) see: extent = array = output size gives the
  same bits as the call without extent, i.e. as before records of other sizes existed."""
  rng = np.random.default_rng(9)
  images = rng.normal(0, 300, (3, 16, 16, 4)).astype(np.float32)
  lm = rng.uniform(0.2, 0.8, (3, K, 2)).astype(np.float32)
  vis = rng.uniform(size=(3, K)) < 0.8
  key = jax.random.PRNGKey(5)
  old = augment.augment_batch(key, images, lm, vis, 'ct', return_transform=True)
  new = augment.augment_batch(
    key, images, lm, vis, 'ct', return_transform=True, extent=np.full((3, 2), 16), out_size=16
  )
  for a, b in zip(old, new):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_device_resize_is_pixel_centre_bilinear():
  """Float64, against scipy's grid-mode zoom (pixel edges to pixel edges, constant outside): down
  and up, each record inside a padded batch."""
  from scipy import ndimage

  rng = np.random.default_rng(10)
  records = [rng.normal(size=(13, 10, 2)), rng.normal(size=(4, 7, 2))]
  padded, extent = _padded(records, (13, 10))
  with jax.enable_x64(True):
    for size in (6, 20):
      out = np.asarray(augment.resize(padded, extent, size, fill=-3.0))
      for b, x in enumerate(records):
        zoom = (size / x.shape[0], size / x.shape[1], 1)
        ref = ndimage.zoom(x, zoom, order=1, mode='grid-constant', cval=-3.0, grid_mode=True)
        np.testing.assert_allclose(out[b], ref, atol=1e-12)


def test_masks_resize_label_exact():
  rng = np.random.default_rng(11)
  masks = [rng.choice([0, 3, 7], (9, 6, 1)).astype(np.uint8), np.full((3, 5, 1), 7, np.uint8)]
  padded, extent = _padded(masks, (9, 6))
  for size in (4, 18):
    out = np.asarray(augment.resize(padded, extent, size, order=0))
    assert out.dtype == np.uint8 and out.shape == (2, size, size, 1)
    for b, m in enumerate(masks):
      # Output pixel i takes the record pixel whose cell holds its centre, floor((i + .5) h / S).
      iy = np.floor((np.arange(size) + 0.5) * m.shape[0] / size).astype(int)
      ix = np.floor((np.arange(size) + 0.5) * m.shape[1] / size).astype(int)
      np.testing.assert_array_equal(out[b], m[iy][:, ix])
  assert set(np.unique(out)) <= {0, 3, 7}


def _label_image(rng, hw):
  """Blocky label map {0, 2, 5} (uint8) from a coarse random grid, upsampled by repetition."""
  coarse = rng.choice(np.array([0, 2, 5], np.uint8), (hw[0] // 4 + 1, hw[1] // 4 + 1))
  return np.repeat(np.repeat(coarse, 4, 0), 4, 1)[: hw[0], : hw[1]]


def test_masks_move_exactly_with_the_image():
  from aacp_jax.augment import spatial

  rng = np.random.default_rng(12)
  b, hw, level = 3, (32, 32), 40.0  # 5 * 40 < 255: X-ray's clip to [0, 1] leaves it alone
  masks = np.stack([_label_image(rng, hw) for _ in range(b)])
  images = level * masks[..., None].astype(np.float32)  # every channel = the label's value
  lm = rng.uniform(0.2, 0.8, (b, K, 2)).astype(np.float32)
  vis = np.ones((b, K), bool)
  cfg = _spatial_only(1.0, **{'flip.p': 1.0})
  key = jax.random.PRNGKey(4)
  out = augment.augment_batch(key, images, lm, vis, 'xray', cfg, masks=masks)
  plain = augment.augment_batch(key, images, lm, vis, 'xray', cfg)
  assert len(out) == 4 and out[3].dtype == np.uint8 and out[3].shape == (b, *hw)
  for x, y in zip(plain, out[:3]):  # the mask changes nothing else
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  warped = np.asarray(out[3])
  assert set(np.unique(warped)) <= {0, 2, 5}
  labels = np.asarray(out[0])[..., 0] * 255.0 / level  # bilinear image, in label units
  for i, k in enumerate(jax.random.split(key, b)):
    p = augment.sample_params(k, lm[i], vis[i], 'xray', cfg)
    assert all(bool(p['fired'][op]) for op in ('crop', 'rotate', 'scale', 'flip', 'elastic'))
    a, t = spatial.affine(p, hw)
    ref = spatial.resample(masks[i][..., None], a, t, p['elastic'], np.uint8(0), order=0)
    np.testing.assert_array_equal(warped[i], np.asarray(ref)[..., 0])
    # Where the bilinear image is pure (all four corners one label) the mask holds that label, so
    # each label's area agrees with the image's region up to the boundary (mixed) pixels.
    pure = {lab: np.abs(labels[i] - lab) < 1e-3 for lab in (0, 2, 5)}
    boundary = 1.0 - sum(m.mean() for m in pure.values())
    assert boundary < 0.5
    for lab, region in pure.items():
      assert np.all(warped[i][region] == lab)
      assert region.mean() <= (warped[i] == lab).mean() <= region.mean() + boundary


def test_padded_masks_warp_like_the_record_alone():
  rng = np.random.default_rng(13)
  records = [_label_image(rng, hw)[..., None] for hw in ((12, 9), (5, 14))]
  padded, extent = _padded(records, (12, 14))
  images = 40.0 * padded.astype(np.float32)
  lm = rng.uniform(0.2, 0.8, (2, K, 2)).astype(np.float32)
  vis = np.ones((2, K), bool)
  cfg = _spatial_only(1.0)
  key = jax.random.PRNGKey(6)
  batch = augment.augment_batch(
    key, images, lm, vis, 'xray', cfg, extent=extent, out_size=8, masks=padded[..., 0]
  )
  b, k = 1, jax.random.split(key, 2)[1]
  one = augment.augment_one(
    k,
    40.0 * records[b].astype(np.float32),
    lm[b],
    vis[b],
    'xray',
    cfg,
    out_size=8,
    mask=records[b][..., 0],
  )
  assert batch[-1].shape == (2, 8, 8) and one[-1].dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(one[-1]), np.asarray(batch[-1][b]))
