"""Landmark detector: network shapes, heatmap targets, the loss against NumPy, metrics, annotation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from aacp_jax.data import landmarks as lm
from aacp_jax.eval import detector as detector_eval
from aacp_jax.models import detector as det
from aacp_jax.train import landmarks as lmk
from data_prep import annotate_landmarks as ann

K = len(lm.LANDMARKS)


@pytest.mark.parametrize('size,levels,out_level', [(32, 2, 1), (64, 3, 0), (48, 4, 2)])
def test_heatmap_net_shapes(size, levels, out_level):
  net = det.LandmarkDetector(('ct', 'xray'), K, width=4, levels=levels, output_level=out_level)
  x = {'ct': jnp.zeros((2, size, size, 64)), 'xray': jnp.zeros((2, size, size, 1))}
  if size % 2**levels:
    with pytest.raises(ValueError, match='not divisible'):
      net.init(jax.random.key(0), x)
    return
  variables = net.init(jax.random.key(0), x)
  out = net.apply(variables, x)
  hm = size // 2**out_level
  for m in x:
    assert out[m]['heatmaps'].shape == (2, hm, hm, K)
    assert out[m]['landmarks'].shape == (2, K, 2)
    assert out[m]['visible_logit'].shape == (2, K)
  with pytest.raises(ValueError, match='no net for'):
    net.apply(variables, {'mri': jnp.zeros((2, size, size, 3))})


def np_targets(pts, h, w, sigma):
  ys = (np.arange(h) + 0.5) / h
  xs = (np.arange(w) + 0.5) / w
  out = np.zeros((pts.shape[0], h, w, pts.shape[1]))
  for b in range(pts.shape[0]):
    for k in range(pts.shape[1]):
      d2 = ((ys[:, None] - pts[b, k, 0]) * h) ** 2 + ((xs[None, :] - pts[b, k, 1]) * w) ** 2
      g = np.exp(-d2 / (2 * sigma**2))
      out[b, :, :, k] = g / g.sum()
  return out


def test_heatmap_targets_match_numpy_and_centre_on_the_landmark():
  pts = np.random.default_rng(0).uniform(0.1, 0.9, (3, 4, 2)).astype(np.float32)
  got = np.asarray(det.heatmap_targets(jnp.asarray(pts), 16, 12, 1.5))
  np.testing.assert_allclose(got, np_targets(pts, 16, 12, 1.5), atol=1e-6)
  # The expectation of a Gaussian away from the border is the landmark itself.
  centre = np.array([[[0.5, 0.5]]], np.float32)
  t = det.heatmap_targets(jnp.asarray(centre), 32, 32, 1.0)
  np.testing.assert_allclose(np.asarray(det.spatial_soft_argmax(jnp.log(t))), centre, atol=1e-5)


def np_modality_loss(heat, pts_pred, vis_logit, pts, vis, size, cfg):
  b, h, w, k = heat.shape
  t = np_targets(pts, h, w, cfg.heatmap_sigma)
  flat = heat.reshape(b, h * w, k)
  logp = flat - flat.max(1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
  ce = -(t.reshape(b, h * w, k) * logp).sum(1)
  n = max(vis.sum(), 1)
  ce = (ce * vis).sum() / n
  mre = (np.linalg.norm(pts_pred - pts, axis=-1) * size * vis).sum() / n
  p = 1 / (1 + np.exp(-vis_logit))
  bce = -(vis * np.log(p) + (1 - vis) * np.log(1 - p)).mean()
  return ce + cfg.coord_weight * mre + cfg.visible_weight * bce, ce, mre, bce


def test_modality_loss_matches_numpy():
  rng = np.random.default_rng(1)
  heat = rng.normal(size=(2, 8, 8, 5)).astype(np.float32)
  pts = rng.uniform(0, 1, (2, 5, 2)).astype(np.float32)
  vis = rng.uniform(size=(2, 5)) > 0.4
  logit = rng.normal(size=(2, 5)).astype(np.float32)
  out = {
    'heatmaps': jnp.asarray(heat),
    'landmarks': det.spatial_soft_argmax(jnp.asarray(heat)),
    'visible_logit': jnp.asarray(logit),
  }
  cfg = ml_collections.ConfigDict(
    {'heatmap_sigma': 1.5, 'coord_weight': 0.1, 'visible_weight': 1.0}
  )
  loss, parts = lmk.modality_loss(out, jnp.asarray(pts), jnp.asarray(vis), 32, cfg)
  want = np_modality_loss(
    heat, np.asarray(out['landmarks']), logit, pts, vis.astype(np.float64), 32, cfg
  )
  np.testing.assert_allclose(float(loss), want[0], rtol=1e-5)
  for got, ref in zip((parts['heatmap_ce'], parts['mre_px'], parts['visible_bce']), want[1:]):
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_detection_metrics_by_hand():
  truth = np.zeros((2, K, 2), np.float32)
  vis = np.zeros((2, K), bool)
  truth[:, 0] = [[0.5, 0.5], [0.2, 0.2]]
  vis[:, 0] = True
  pred = truth.copy()
  pred[0, 0] += [0.03, 0.04]  # 0.05 of the side: within the radius
  pred[1, 0] += [0.06, 0.08]  # 0.10: outside
  conf = np.zeros((2, K), np.float32)
  conf[:, 0] = 0.9
  conf[0, 1] = 0.8  # an invisible landmark called visible
  m = detector_eval.detection_metrics(
    pred, conf, truth, vis, 100, threshold=0.5, radius=0.05 + 1e-6
  )
  assert m['mre_px'] == pytest.approx(7.5, abs=1e-4)
  assert m['mre_percent'] == pytest.approx(7.5, abs=1e-4)
  assert m['detection_rate'] == 0.5
  assert m['false_detection_rate'] == pytest.approx(1 / (2 * K - 2))
  assert list(m['mre_px_per_landmark']) == [lm.LANDMARKS[0]]


def test_annotate_record_fields():
  k = K
  record = {
    'landmarks': np.zeros((k, 2), np.float32),
    'landmark_visible': np.zeros(k, bool),
    'landmarks_canonical': np.zeros((k, 2), np.float32),
    'other': 'kept',
  }
  record['landmark_visible'][1] = True
  record['landmarks_canonical'][1] = (0.3, 0.4)
  record['landmarks'][1] = (0.31, 0.41)
  points = np.full((k, 2), 0.5, np.float32)
  conf = np.zeros(k, np.float32)
  conf[[0, 1]] = 0.9
  atlas = np.full((k, 2), 0.7, np.float32)
  out = ann.annotate(record, points, conf, atlas, 0.5)
  assert out['other'] == 'kept' and record['landmark_visible'][0] == False  # input untouched
  np.testing.assert_array_equal(out['landmark_visible'], conf > 0.5)
  np.testing.assert_allclose(out['landmarks'][0], (0.5, 0.5))
  np.testing.assert_allclose(out['landmarks'][2:], 0)
  np.testing.assert_allclose(out['landmarks_canonical'][0], (0.7, 0.7))  # atlas: no own position
  np.testing.assert_allclose(out['landmarks_canonical'][1], (0.3, 0.4))  # its own canonical kept
  np.testing.assert_allclose(out['landmarks_canonical'][2:], 0)
  np.testing.assert_allclose(out['landmark_confidence'], conf)
