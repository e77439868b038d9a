"""Evaluation metrics against scikit-learn (when installed) and NumPy brute-force references:
ties, multi-class, multi-label, empty masks, NaN scores, and the patient bootstrap."""

import numpy as np
import pytest

from aacp_jax.eval import bootstrap, dice, metrics

try:
  from sklearn import metrics as skm
except ImportError:  # scikit-learn is the optional `eval` extra; the brute-force checks remain.
  skm = None

needs_sklearn = pytest.mark.skipif(skm is None, reason='scikit-learn not installed')


def auroc_pairs(y, s):
  """P(s+ > s-) + 1/2 P(s+ = s-) by counting every positive/negative pair."""
  pos, neg = s[y == 1], s[y == 0]
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return wins / (len(pos) * len(neg))


def ap_thresholds(y, s):
  """Average precision by explicit loop over the distinct thresholds, highest first."""
  total, prev_recall = 0.0, 0.0
  for t in sorted(set(s.tolist()), reverse=True):
    called = s >= t
    tp = np.sum(called & (y == 1))
    recall = tp / np.sum(y == 1)
    total += (recall - prev_recall) * tp / called.sum()
    prev_recall = recall
  return total


def tied_binary(rng, n=60):
  y = rng.integers(0, 2, n)
  return y, np.round(rng.normal(size=n) + y, 1)  # Rounding to 0.1 makes many ties.


@pytest.mark.parametrize('seed', range(5))
def test_binary_auroc_and_ap_with_ties(seed):
  y, s = tied_binary(np.random.default_rng(seed))
  assert len(np.unique(s)) < len(s)  # The case under test: ties, across classes too.
  np.testing.assert_allclose(metrics.auroc(y, s), auroc_pairs(y, s), rtol=1e-12)
  np.testing.assert_allclose(metrics.average_precision(y, s), ap_thresholds(y, s), rtol=1e-12)
  if skm is not None:
    np.testing.assert_allclose(metrics.auroc(y, s), skm.roc_auc_score(y, s), rtol=1e-12)
    np.testing.assert_allclose(
      metrics.average_precision(y, s), skm.average_precision_score(y, s), rtol=1e-12
    )


def test_all_tied_scores_give_chance_auroc_and_prevalence_ap():
  y = np.array([0, 1, 1, 0, 1])
  assert metrics.auroc(y, np.zeros(5)) == 0.5
  np.testing.assert_allclose(metrics.average_precision(y, np.zeros(5)), 3 / 5)


@pytest.mark.parametrize('seed', range(3))
def test_macro_one_vs_rest_auroc_and_ap(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 4, 80)
  logits = np.round(np.eye(4)[y] + rng.normal(size=(80, 4)), 1)
  proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # sklearn wants rows summing to 1
  ref_auc = np.mean([auroc_pairs((y == c).astype(int), proba[:, c]) for c in range(4)])
  ref_ap = np.mean([ap_thresholds((y == c).astype(int), proba[:, c]) for c in range(4)])
  np.testing.assert_allclose(metrics.auroc_ovr(y, proba), ref_auc, rtol=1e-12)
  np.testing.assert_allclose(metrics.average_precision_ovr(y, proba), ref_ap, rtol=1e-12)
  if skm is not None:
    np.testing.assert_allclose(
      metrics.auroc_ovr(y, proba),
      skm.roc_auc_score(y, proba, multi_class='ovr', average='macro'),
      rtol=1e-12,
    )
    np.testing.assert_allclose(
      metrics.average_precision_ovr(y, proba),
      skm.average_precision_score(np.eye(4)[y], proba, average='macro'),
      rtol=1e-12,
    )


@pytest.mark.parametrize('seed', range(3))
def test_macro_multilabel_auroc_and_ap(seed):
  rng = np.random.default_rng(seed)
  labels = (rng.random((70, 5)) < [0.1, 0.3, 0.5, 0.2, 0.6]).astype(int)
  labels[:2] = 1 - labels[:2]  # Every label has both values.
  labels[0], labels[1] = 1, 0
  scores = np.round(labels + rng.normal(size=(70, 5)), 1)
  per = [auroc_pairs(labels[:, c], scores[:, c]) for c in range(5)]
  np.testing.assert_allclose(metrics.auroc_per_class(labels, scores, multilabel=True), per)
  np.testing.assert_allclose(metrics.auroc_multilabel(labels, scores), np.mean(per), rtol=1e-12)
  if skm is not None:
    np.testing.assert_allclose(
      metrics.auroc_multilabel(labels, scores),
      skm.roc_auc_score(labels, scores, average='macro'),
      rtol=1e-12,
    )
    np.testing.assert_allclose(
      metrics.average_precision_multilabel(labels, scores),
      skm.average_precision_score(labels, scores, average='macro'),
      rtol=1e-12,
    )


def test_undefined_metrics_are_nan_and_a_missing_class_makes_the_macro_nan():
  assert np.isnan(metrics.auroc(np.ones(4), np.arange(4.0)))
  assert np.isnan(metrics.average_precision(np.zeros(4), np.arange(4.0)))
  y = np.array([0, 1, 0, 1])  # Class 2 never occurs.
  per = metrics.auroc_per_class(y, np.random.default_rng(0).random((4, 3)))
  assert np.isnan(per[2]) and np.isfinite(per[:2]).all()
  assert np.isnan(metrics.auroc_ovr(y, np.random.default_rng(0).random((4, 3))))


@pytest.mark.parametrize(
  'fn',
  [metrics.auroc, metrics.average_precision, metrics.mae, metrics.rmse],
  ids=lambda f: f.__name__,
)
def test_nan_scores_are_an_error_naming_the_metric_and_count(fn):
  s = np.array([0.1, np.nan, 0.3, np.nan])
  with pytest.raises(ValueError, match=rf'^{fn.__name__}: 2 NaN value\(s\)'):
    fn(np.array([0, 1, 0, 1]), s)


def test_nan_scores_are_an_error_for_macro_and_threshold_metrics():
  s = np.zeros((4, 2))
  s[1, 1] = np.nan
  with pytest.raises(ValueError, match='auroc: 1 NaN'):
    metrics.auroc_ovr(np.array([0, 1, 0, 1]), s)
  with pytest.raises(ValueError, match='sensitivity: 1 NaN'):
    metrics.sensitivity(np.array([0, 1, 0, 1]), s[:, 1], threshold=0.5)


def test_binary_labels_outside_zero_one_are_refused():
  with pytest.raises(ValueError, match=r'auroc: binary labels must be 0 or 1, found \[2\]'):
    metrics.auroc(np.array([0, 2, 1]), np.arange(3.0))


def test_accuracy_and_balanced_accuracy():
  rng = np.random.default_rng(3)
  y = rng.choice(3, 90, p=[0.7, 0.2, 0.1])
  pred = np.where(rng.random(90) < 0.6, y, rng.integers(0, 4, 90))  # Class 3: predicted only.
  ref = np.mean([np.sum((pred == c) & (y == c)) / np.sum(y == c) for c in range(3)])
  np.testing.assert_allclose(metrics.balanced_accuracy(y, pred), ref, rtol=1e-12)
  assert metrics.accuracy(y, pred) == np.mean(y == pred)
  if skm is not None:
    with pytest.warns(UserWarning):  # sklearn warns about the predicted-only class 3
      ref_sk = skm.balanced_accuracy_score(y, pred)
    np.testing.assert_allclose(metrics.balanced_accuracy(y, pred), ref_sk, rtol=1e-12)


def test_sensitivity_specificity_at_a_stated_threshold():
  y = np.array([1, 1, 1, 1, 0, 0, 0])
  s = np.array([0.9, 0.5, 0.4, 0.1, 0.5, 0.2, 0.0])
  # score >= 0.5 is positive: TP = 2 of 4, FP = 1 of 3 (the 0.5 at the threshold counts).
  assert metrics.sensitivity_specificity(y, s, threshold=0.5) == (0.5, 2 / 3)
  if skm is not None:
    tn, fp, fn, tp = skm.confusion_matrix(y, s >= 0.5).ravel()
    assert (tp / (tp + fn), tn / (tn + fp)) == (0.5, 2 / 3)
  assert np.isnan(metrics.specificity(np.ones(3), s[:3], threshold=0.5))


def test_mae_rmse():
  t, p = np.array([1.0, 2.0, 4.0]), np.array([2.0, 2.0, 1.0])
  assert metrics.mae(t, p) == pytest.approx(4 / 3)
  assert metrics.rmse(t, p) == pytest.approx(np.sqrt(10 / 3))
  if skm is not None:
    assert metrics.mae(t, p) == pytest.approx(skm.mean_absolute_error(t, p))
    assert metrics.rmse(t, p) == pytest.approx(np.sqrt(skm.mean_squared_error(t, p)))


def dice_loop(p, t):
  inter = sum(1 for a, b in zip(p.ravel(), t.ravel()) if a and b)
  total = int(p.sum() + t.sum())
  return 1.0 if total == 0 else 2 * inter / total


def test_dice_per_class_and_per_image_with_empty_masks():
  rng = np.random.default_rng(4)
  truth = rng.integers(0, 3, (4, 9, 9))
  pred = np.where(rng.random((4, 9, 9)) < 0.7, truth, rng.integers(0, 3, (4, 9, 9)))
  truth[0][truth[0] == 2] = 0  # Image 0: class 2 missing from the truth ...
  pred[0][pred[0] == 2] = 1  # ... and from the prediction: empty/empty.
  pred[1][pred[1] == 2] = 0  # Image 1: class 2 missed entirely: 0.
  per_image = dice.dice_per_image(pred, truth, 3)
  ref = [[dice_loop(pred[i] == c, truth[i] == c) for c in range(3)] for i in range(4)]
  np.testing.assert_allclose(per_image, ref, rtol=1e-12)
  assert per_image[0, 2] == 1.0 and per_image[1, 2] == 0.0
  assert np.isnan(dice.dice_per_image(pred, truth, 3, empty=np.nan)[0, 2])
  pooled = dice.dice_per_class(pred, truth, 3)
  np.testing.assert_allclose(pooled, [dice_loop(pred == c, truth == c) for c in range(3)])
  if skm is not None:  # Dice equals F1 on the pixels of one class.
    for c in range(3):
      np.testing.assert_allclose(pooled[c], skm.f1_score((truth == c).ravel(), (pred == c).ravel()))
  assert dice.dice_binary(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
  assert dice.dice_binary(np.ones((3, 3)), np.zeros((3, 3))) == 0.0


def test_patient_bootstrap_resamples_whole_patients():
  groups = np.repeat(['a', 'b', 'c', 'd'], [1, 5, 2, 3])
  for idx in bootstrap.resample_indices(len(groups), groups, n=50, seed=0):
    drawn = groups[idx]
    # Every drawn patient comes with all of its images, a whole number of times.
    for g in np.unique(drawn):
      assert np.sum(drawn == g) % np.sum(groups == g) == 0
      assert set(idx[drawn == g]) == set(np.nonzero(groups == g)[0])
    # As many patients drawn as exist (counted with multiplicity).
    assert sum(np.sum(drawn == g) // np.sum(groups == g) for g in np.unique(drawn)) == 4


def test_one_image_per_patient_matches_the_image_bootstrap():
  rng = np.random.default_rng(5)
  y, s = tied_binary(rng, 80)
  a = bootstrap.bootstrap_ci(metrics.auroc, y, s, n=200, seed=3)
  # Patient ids in any order and spelling: groups are numbered by first appearance.
  ids = np.array([f'p{i}' for i in rng.permutation(80)])
  b = bootstrap.bootstrap_ci(metrics.auroc, y, s, groups=ids, n=200, seed=3)
  assert a == b
  assert metrics.bootstrap_ci(metrics.auroc, y, s, n=200, seed=3) == (a.low, a.high)


def test_correlated_images_widen_the_patient_interval():
  # 20 patients with 10 near-identical images each: 20 independent facts, not 200.
  rng = np.random.default_rng(6)
  patient_y = np.r_[np.zeros(10), np.ones(10)].astype(int)
  patient_s = patient_y * 0.8 + rng.normal(size=20)
  groups = np.repeat(np.arange(20), 10)
  y = patient_y[groups]
  s = patient_s[groups] + 0.01 * rng.normal(size=200)
  by_image = bootstrap.bootstrap_ci(metrics.auroc, y, s, n=300, seed=0)
  by_patient = bootstrap.bootstrap_ci(metrics.auroc, y, s, groups=groups, n=300, seed=0)
  assert by_image.estimate == by_patient.estimate
  assert by_patient.high - by_patient.low > 2 * (by_image.high - by_image.low)


def test_paired_bootstrap_of_two_encoders():
  rng = np.random.default_rng(7)
  y = rng.integers(0, 2, 150)
  groups = np.repeat(np.arange(50), 3)
  good, poor = y + 0.5 * rng.normal(size=150), y + 2.0 * rng.normal(size=150)
  r = bootstrap.paired_bootstrap(metrics.auroc, y, good, poor, groups=groups, n=300, seed=1)
  assert r.difference == pytest.approx(metrics.auroc(y, good) - metrics.auroc(y, poor))
  assert 0 < r.low < r.difference < r.high and r.p_value < 0.01 and r.n_valid == 300
  same = bootstrap.paired_bootstrap(metrics.auroc, y, good, good, n=100)
  assert same.difference == same.low == same.high == 0 and same.p_value == 1.0
  # Paired: the interval of the difference is narrower than either encoder's own interval
  # would suggest when the encoders' errors are shared.
  close = good + 0.05 * rng.normal(size=150)
  d = bootstrap.paired_bootstrap(metrics.auroc, y, good, close, groups=groups, n=300)
  own = bootstrap.bootstrap_ci(metrics.auroc, y, good, groups=groups, n=300)
  assert d.high - d.low < 0.5 * (own.high - own.low)
  with pytest.raises(ValueError, match='same test examples'):
    bootstrap.paired_bootstrap(metrics.auroc, y, good, poor[:-1])


def test_seed_mean_ci_averages_seeds_on_each_patient_resample():
  rng = np.random.default_rng(8)
  y = rng.integers(0, 2, 90)
  groups = np.repeat(np.arange(30), 3)
  runs = [y + rng.normal(size=90) for _ in range(3)]
  one = bootstrap.seed_mean_ci(metrics.auroc, y, runs[:1], groups=groups, n=100)
  assert one == bootstrap.bootstrap_ci(metrics.auroc, y, runs[0], groups=groups, n=100)
  three = bootstrap.seed_mean_ci(metrics.auroc, y, runs, groups=groups, n=100)
  assert three.estimate == pytest.approx(np.mean([metrics.auroc(y, r) for r in runs]))
  assert three.low < three.estimate < three.high
  # Three copies of one run: the mean of equal values is that value on every resample.
  same = bootstrap.seed_mean_ci(metrics.auroc, y, [runs[0]] * 3, groups=groups, n=100)
  assert same == one
