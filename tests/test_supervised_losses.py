"""Fine-tuning losses against NumPy float64 references."""

import jax
import numpy as np
import pytest

from aacp_jax import supervised_losses as sl


def _log_softmax(x):
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_softmax_cross_entropy_with_and_without_weights():
  rng = np.random.default_rng(0)
  logits, labels = rng.normal(size=(6, 4)) * 3, rng.integers(0, 4, 6)
  w = np.array([1.0, 0.0, 2.0, 0.5, 0.0, 1.0])
  nll = -_log_softmax(logits)[np.arange(6), labels]
  with jax.enable_x64(True):
    np.testing.assert_allclose(sl.softmax_cross_entropy(logits, labels), nll.mean(), rtol=1e-12)
    got = sl.softmax_cross_entropy(logits, labels, w)
    np.testing.assert_allclose(got, (w * nll).sum() / w.sum(), rtol=1e-12)
  assert sl.softmax_cross_entropy(logits, labels).dtype == np.float32


@pytest.mark.parametrize('policy', ['ignore', 'zeros', 'ones'])
def test_multilabel_bce_uncertainty_policies(policy):
  rng = np.random.default_rng(1)
  logits, labels = rng.normal(size=(5, 3)) * 2, rng.integers(-1, 2, (5, 3))
  sig = 1 / (1 + np.exp(-logits))
  y = np.where(labels == -1, {'ignore': 0, 'zeros': 0, 'ones': 1}[policy], labels)
  ll = -(y * np.log(sig) + (1 - y) * np.log(1 - sig))
  m = (labels != -1) if policy == 'ignore' else np.ones_like(labels, bool)
  with jax.enable_x64(True):
    got = sl.multilabel_bce(logits, labels, policy)
  np.testing.assert_allclose(got, ll[m].mean(), rtol=1e-10)
  with pytest.raises(ValueError, match='policy'):
    sl.multilabel_bce(logits, labels, 'u-ones')


def test_regression_losses():
  rng = np.random.default_rng(2)
  pred, target = rng.normal(size=9) * 2, rng.normal(size=9)
  r = pred - target
  a = np.abs(r)
  ref = {
    'l1': a.mean(),
    'mse': (r**2).mean(),
    'huber': np.where(a <= 0.7, 0.5 * r**2, 0.7 * (a - 0.35)).mean(),
  }
  with jax.enable_x64(True):
    for kind, want in ref.items():
      np.testing.assert_allclose(
        sl.regression_loss(pred, target, kind, delta=0.7), want, rtol=1e-12
      )


def test_segmentation_loss_ce_plus_batch_dice():
  rng = np.random.default_rng(3)
  logits, mask = rng.normal(size=(2, 5, 4, 3)) * 2, rng.integers(0, 3, (2, 5, 4))
  logp = _log_softmax(logits)
  y = np.eye(3)[mask]
  ce = -(y * logp).sum(-1).mean()
  p = np.exp(logp)
  dice = [
    (2 * (p * y)[..., c].sum() + 1.0) / (p[..., c].sum() + y[..., c].sum() + 1.0) for c in (1, 2)
  ]
  with jax.enable_x64(True):
    loss, parts = sl.segmentation_loss(logits, mask, dice_weight=0.5)
  np.testing.assert_allclose(parts['seg_ce'], ce, rtol=1e-12)
  np.testing.assert_allclose(parts['seg_dice'], 1 - np.mean(dice), rtol=1e-12)
  np.testing.assert_allclose(loss, ce + 0.5 * (1 - np.mean(dice)), rtol=1e-12)
  # A confident, correct prediction: both parts near 0.
  loss, _ = sl.segmentation_loss(100.0 * np.eye(3)[mask], mask)
  assert float(loss) < 1e-3
