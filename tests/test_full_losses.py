"""Multi-scale contrast, cross-modal pseudo-pairs and their InfoNCE, the lambda_cross curriculum."""

import numpy as np
import pytest

from aacp_jax import losses
from aacp_jax.methods.aacp import cross_modal_schedule, make_cross_schedule
from configs import pretrain
from tests.test_losses import np_info_nce


def unit(rng, *shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_multiscale_is_the_weighted_sum_of_per_level_info_nce():
  rng = np.random.default_rng(0)
  l1 = [unit(rng, 6, d) for d in (4, 8, 8, 16)]
  l2 = [unit(rng, 6, d) for d in (4, 8, 8, 16)]
  weights = (0.5, 0.0, 0.25, 1.0)
  total, per = losses.multiscale_info_nce(l1, l2, weights, 0.2)
  want = [np_info_nce(a, b, 0.2) if w else 0.0 for a, b, w in zip(l1, l2, weights)]
  np.testing.assert_allclose(per, want, rtol=1e-5)
  np.testing.assert_allclose(total, sum(w * l for w, l in zip(weights, want)), rtol=1e-5)
  with pytest.raises(ValueError, match='levels'):
    losses.multiscale_info_nce(l1, l2, weights[:3], 0.2)


def hand_batch():
  """Six samples, K = 3 landmarks, O = 3 organs; modalities ct, ct, mri, xray, xray, mri."""
  ids = np.array([0, 0, 1, 2, 2, 1])
  vis = np.array([[1, 1, 0], [0, 0, 1], [1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]], bool)
  c = np.zeros((6, 3, 2), np.float32)
  c[0, 0], c[0, 1] = (0.30, 0.50), (0.40, 0.50)
  c[1, 2] = (0.80, 0.50)
  c[2, 0] = (0.35, 0.55)  # 0.071 from sample 0's landmark 0
  c[3, 0], c[3, 1] = (0.30, 0.50), (0.60, 0.50)  # landmark 1 is 0.2 from sample 0's
  c[4, 2] = (0.92, 0.50)  # 0.12 from sample 1's landmark 2
  c[5, 0] = (0.35, 0.55)  # the same as sample 2, but also MRI
  organs = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [1, 1, 0], [0, 0, 1]], np.uint8)
  return c, vis, organs, ids


def test_pair_matrix_equals_hand_computed():
  c, vis, organs, ids = hand_batch()
  want = np.array(
    [
      # 0-2, 0-5: landmark 0 within 0.071; 0-3: landmark 1 at 0.2 fails, organ 0 shared -> 0.5;
      # 0-4: no common landmark, organ 0 shared -> 0.5; 0-1 same modality.
      [0, 0, 1, 0.5, 0.5, 1],
      [0, 0, 0, 0, 1, 0],  # 1-4: landmark 2 within 0.12
      [1, 0, 0, 1, 0, 0],  # 2-5 are identical but both MRI: no pair within one modality
      [0.5, 0, 1, 0, 0, 1],  # 3-4 share organ 0 but are both X-ray
      [0.5, 1, 0, 0, 0, 0],
      [1, 0, 0, 1, 0, 0],
    ],
    np.float32,
  )
  got = np.asarray(losses.cross_modal_pairs(c, vis, organs, ids, 0.15))
  np.testing.assert_array_equal(got, want)
  # delta 0.10: the 0.12 landmark pair 1-4 falls back to their shared organ 1.
  tight = want.copy()
  tight[1, 4] = tight[4, 1] = 0.5
  np.testing.assert_array_equal(losses.cross_modal_pairs(c, vis, organs, ids, 0.10), tight)
  # The named set without landmark 1: 0-3 now agree on every common landmark.
  named = np.asarray(
    losses.cross_modal_pairs(c, vis, organs, ids, 0.15, landmark_mask=np.array([1, 0, 1], bool))
  )
  assert named[0, 3] == named[3, 0] == 1
  # Two common landmarks required: only 0-3 have two, and they fail delta.
  two = np.asarray(losses.cross_modal_pairs(c, vis, organs, ids, 0.15, min_common=2))
  assert two.max() == 0.5 and two[0, 2] == 0 and two[0, 3] == 0.5


def np_cross_info_nce(z, ids, p, tau):
  rows = []
  for i in range(len(z)):
    cand = [k for k in range(len(z)) if ids[k] != ids[i]]
    pos = [j for j in cand if p[i, j] > 0]
    if not pos:
      continue
    s = {k: float(z[i] @ z[k]) / tau for k in cand}
    log_den = np.log(sum(np.exp(v) for v in s.values()))
    rows.append(-sum(p[i, j] * (s[j] - log_den) for j in pos) / len(pos))
  return np.mean(rows) if rows else 0.0


def test_cross_modal_info_nce_matches_numpy():
  c, vis, organs, ids = hand_batch()
  p = np.asarray(losses.cross_modal_pairs(c, vis, organs, ids, 0.15))
  z = unit(np.random.default_rng(3), 6, 5)
  np.testing.assert_allclose(
    losses.cross_modal_info_nce(z, ids, p, 0.1), np_cross_info_nce(z, ids, p, 0.1), rtol=1e-5
  )
  # An organ-only positive counts half: scaling its weight to 1 raises that anchor's loss.
  one = np.where(p > 0, 1.0, 0.0)
  assert np_cross_info_nce(z, ids, one, 0.1) != pytest.approx(np_cross_info_nce(z, ids, p, 0.1))
  # No pairs at all (one modality): 0, finite.
  assert float(losses.cross_modal_info_nce(z, np.zeros(6, int), np.zeros((6, 6)), 0.1)) == 0.0


def test_curriculum_at_the_papers_epochs():
  c = pretrain.get_config()
  schedule = cross_modal_schedule(c.loss, steps_per_epoch=10)
  got = [float(schedule(epoch * 10)) for epoch in (0, 50, 75, 100, 150)]
  np.testing.assert_allclose(got, [0, 0, 0.15, 0.3, 0.3], atol=1e-7)
  assert float(losses.curriculum_weight(60.0, 60, 60, 0.3)) == pytest.approx(0.3)


def test_curriculum_scales_with_a_run_cut_by_total_steps():
  # demo: 300 steps of an 8-step epoch = 37.5 epochs instead of 200: the ramp runs over steps
  # 75..150, a quarter and a half of the run, as epochs 50..100 of 200 do.
  c = pretrain.get_config('demo')
  schedule = make_cross_schedule(c, epoch_steps=8, total_steps=300)
  got = [float(schedule(s)) for s in (0, 75, 112.5, 150, 299)]
  np.testing.assert_allclose(got, [0, 0, 0.15, 0.3, 0.3], atol=1e-6)
