"""Every loss against a plain NumPy reference (loops), plus gradient and invariance checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aacp_jax import losses

TOL = 1e-5


def _unit(rng, b, d):
  z = rng.normal(size=(b, d))
  return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def np_info_nce(z1, z2, tau, w=None):
  z = np.concatenate([z1, z2]).astype(np.float64)
  n, b = len(z), len(z1)
  total = 0.0
  for i in range(n):
    p = (i + b) % n
    s = z @ z[i] / tau
    denom = np.exp(s[p])
    for k in range(n):
      if k not in (i, p):
        denom += (1.0 if w is None else w[i, k]) * np.exp(s[k])
    total += np.log(denom) - s[p]
  return total / n


def np_simclr_tf2(h1, h2, tau):
  """google-research/simclr tf2 objective.add_contrastive_loss, in NumPy (loss_a + loss_b)."""
  h1, h2 = h1.astype(np.float64), h2.astype(np.float64)
  b = len(h1)
  large, masks, labels = 1e9, np.eye(b), np.eye(b, 2 * b)
  aa = h1 @ h1.T / tau - masks * large
  bb = h2 @ h2.T / tau - masks * large
  ab, ba = h1 @ h2.T / tau, h2 @ h1.T / tau

  def ce(logits):
    m = logits.max(axis=1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    return -(labels * logp).sum(axis=1).mean()

  return ce(np.concatenate([ab, aa], 1)) + ce(np.concatenate([ba, bb], 1))


def np_structure_weights(c, vis, gamma, sigma):
  b = len(c)
  w = np.ones((b, b))
  for i in range(b):
    for k in range(b):
      shared = [l for l in range(c.shape[1]) if vis[i, l] and vis[k, l]]
      if shared:
        d = np.mean([np.linalg.norm(c[i, l] - c[k, l]) for l in shared])
        w[i, k] = 1 - gamma * np.exp(-(d**2) / sigma**2)
  return np.block([[w, w], [w, w]])


def np_spatial(pred, vis_p, ref, vis_r, a_inv):
  per = []
  for b in range(len(pred)):
    errs = []
    k = pred.shape[1]
    for i in range(k):
      for j in range(i + 1, k):
        if vis_p[b, i] and vis_p[b, j] and vis_r[b, i] and vis_r[b, j]:
          v_ref = ref[b, j] - ref[b, i]
          v_back = a_inv[b] @ (pred[b, j] - pred[b, i])
          errs.append(np.sum((v_ref - v_back) ** 2))
    if errs:
      per.append(np.mean(errs))
  return np.mean(per) if per else 0.0


def np_triplet(a, p, margin, mining):
  a, p = a.astype(np.float64), p.astype(np.float64)
  b, out = len(a), []
  for i in range(b):
    d_ap = np.linalg.norm(a[i] - p[i])
    negs = [np.linalg.norm(a[i] - x[k]) for k in range(b) if k != i for x in (a, p)]
    if mining == 'hardest':
      d_an = min(negs)
    else:
      farther = [d for d in negs if d > d_ap]
      d_an = min(farther) if farther else max(negs)
    out.append(max(0.0, d_ap - d_an + margin))
  return np.mean(out)


@pytest.mark.parametrize('tau', [0.07, 0.5])
def test_info_nce_matches_numpy_and_simclr(tau):
  rng = np.random.default_rng(0)
  z1, z2 = _unit(rng, 8, 16), _unit(rng, 8, 16)
  got = float(losses.info_nce(z1, z2, tau))
  assert got == pytest.approx(np_info_nce(z1, z2, tau), abs=TOL, rel=TOL)
  # simclr tf2 sums the two views' means; ours is the mean over all 2B rows.
  assert got == pytest.approx(np_simclr_tf2(z1, z2, tau) / 2, abs=TOL, rel=TOL)


def test_weighted_info_nce_matches_numpy_and_zero_weight_excludes():
  rng = np.random.default_rng(1)
  z1, z2 = _unit(rng, 6, 8), _unit(rng, 6, 8)
  w = rng.uniform(0.0, 1.5, size=(12, 12)).astype(np.float32)
  w[0, 3] = w[4, 10] = 0.0
  ref = np_info_nce(z1, z2, 0.1, np.where(np.eye(12, k=6) + np.eye(12, k=-6) > 0, 1.0, w))
  assert float(losses.info_nce(z1, z2, 0.1, w)) == pytest.approx(ref, abs=TOL, rel=TOL)
  # Weights on the positive and the diagonal are ignored (positive fixed to 1).
  w2 = w.copy()
  w2[np.arange(12), (np.arange(12) + 6) % 12] = 7.0
  w2[np.arange(12), np.arange(12)] = 3.0
  assert float(losses.info_nce(z1, z2, 0.1, w2)) == pytest.approx(ref, abs=TOL, rel=TOL)


def test_structure_weights_match_numpy_and_gamma_zero_is_plain():
  rng = np.random.default_rng(2)
  b, k = 6, 5
  c = rng.uniform(size=(b, k, 2)).astype(np.float32)
  vis = rng.uniform(size=(b, k)) < 0.6
  vis[0] = False  # no shared landmark with anyone: weight 1
  got = np.asarray(losses.structure_neg_weights(c, vis, 0.5, 0.3))
  np.testing.assert_allclose(got, np_structure_weights(c, vis, 0.5, 0.3), atol=TOL)
  assert got.shape == (2 * b, 2 * b)
  np.testing.assert_array_equal(got[0], 1.0)
  ones = losses.structure_neg_weights(c, vis, 0.0, 0.3)
  np.testing.assert_array_equal(np.asarray(ones), 1.0)
  z1, z2 = _unit(rng, b, 8), _unit(rng, b, 8)
  assert float(losses.info_nce(z1, z2, 0.07, ones)) == pytest.approx(
    float(losses.info_nce(z1, z2, 0.07)), abs=1e-6
  )
  weighted = losses.info_nce(z1, z2, 0.07, got)
  assert float(weighted) == pytest.approx(np_info_nce(z1, z2, 0.07, got), abs=TOL, rel=TOL)


def _random_linear(rng, b):
  ang = rng.uniform(-0.3, 0.3, b)
  s = rng.uniform(0.8, 1.3, (b, 2))
  cos, sin = np.cos(ang), np.sin(ang)
  rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1)
  return (rot * s[:, None, :]).astype(np.float32)


def test_spatial_matches_numpy_zero_when_equivariant_and_monotone():
  rng = np.random.default_rng(3)
  b, k = 5, 6
  ref = rng.uniform(size=(b, k, 2)).astype(np.float32)
  lin = _random_linear(rng, b)
  t = rng.uniform(-0.2, 0.2, (b, 1, 2)).astype(np.float32)
  a_inv = np.linalg.inv(lin).astype(np.float32)
  equi = np.einsum('bcd,bkd->bkc', lin, ref) + t
  vis_p = rng.uniform(size=(b, k)) < 0.8
  vis_r = rng.uniform(size=(b, k)) < 0.8
  vis_p[1] = False  # a sample with no pair: left out of the mean
  assert float(losses.spatial_consistency(equi, vis_p, ref, vis_r, a_inv)) < 1e-10
  noise = rng.normal(size=equi.shape).astype(np.float32)
  prev = -1.0
  for eps in (0.01, 0.02, 0.05, 0.1, 0.2):
    pred = equi + eps * noise
    got = float(losses.spatial_consistency(pred, vis_p, ref, vis_r, a_inv))
    assert got == pytest.approx(np_spatial(pred, vis_p, ref, vis_r, a_inv), abs=TOL, rel=TOL)
    assert got > prev
    prev = got
  none = np.zeros((b, k), bool)
  assert float(losses.spatial_consistency(equi + noise, none, ref, vis_r, a_inv)) == 0.0


@pytest.mark.parametrize('mining', ['hardest', 'semihard'])
def test_triplet_matches_numpy(mining):
  rng = np.random.default_rng(4)
  a = _unit(rng, 8, 6)
  p = (a + 0.4 * rng.normal(size=a.shape)).astype(np.float32)
  for margin in (0.2, 1.0):
    got = float(losses.triplet(a, p, margin, mining))
    assert got == pytest.approx(np_triplet(a, p, margin, mining), abs=TOL, rel=TOL)


def test_gradients_are_finite():
  rng = np.random.default_rng(5)
  b, k = 4, 4
  z1, z2 = _unit(rng, b, 8), _unit(rng, b, 8)
  w = np.array(
    losses.structure_neg_weights(rng.uniform(size=(b, k, 2)), np.ones((b, k), bool), 1.0, 0.5)
  )  # gamma 1: some weights reach 0
  w[0, 1] = 0.0
  z2[1] = z1[1]  # identical pair: distance 0 in the triplet loss
  ref = rng.uniform(size=(b, k, 2)).astype(np.float32)
  vis = np.ones((b, k), bool)
  a_inv = np.linalg.inv(_random_linear(rng, b))
  fns = [
    lambda x: losses.info_nce(x, z2, 0.07),
    lambda x: losses.info_nce(x, z2, 0.07, w),
    lambda x: losses.triplet(x, z2, 0.5, 'hardest'),
    lambda x: losses.triplet(x, z2, 0.5, 'semihard'),
    lambda x: losses.spatial_consistency(x[:, : k * 2].reshape(b, k, 2), vis, ref, vis, a_inv),
  ]
  for fn in fns:
    g = jax.jit(jax.grad(fn))(jnp.asarray(z1))
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.any(np.asarray(g) != 0)
