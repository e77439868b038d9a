"""Frozen-feature protocols: k-NN and few-shot against brute-force references, nested
patient-level label fractions, seed aggregation, and the end-to-end protocol results."""

import numpy as np
import pytest

from aacp_jax.eval import aggregate, few_shot, fractions, knn, metrics, protocols, report


def knn_loop(f_fit, y_fit, f_test, k, tau, num_classes):
  """solo-learn's weighted vote, one test point at a time."""
  out = []
  for x in f_test:
    sims = [float(np.dot(x, f) / (np.linalg.norm(x) * np.linalg.norm(f))) for f in f_fit]
    top = sorted(range(len(sims)), key=lambda j: (-sims[j], j))[:k]
    votes = np.zeros(num_classes)
    for j in top:
      votes[y_fit[j]] += np.exp(sims[j] / tau)
    out.append(votes / votes.sum())
  return np.array(out)


def clustered(rng, n, num_classes=3, dim=6, spread=1.0):
  y = rng.integers(0, num_classes, n)
  centres = rng.normal(size=(num_classes, dim)) * 2
  return centres[y] + spread * rng.normal(size=(n, dim)), y


@pytest.mark.parametrize('k,tau', [(20, 0.07), (5, 0.5), (1, 0.07)])
def test_knn_matches_the_explicit_loop(k, tau):
  rng = np.random.default_rng(0)
  f_fit, y_fit = clustered(rng, 60)
  f_test, _ = clustered(rng, 25)
  model = knn.fit_knn(f_fit, y_fit, k=k, tau=tau)
  ref = knn_loop(f_fit, y_fit, f_test, k, tau, 3)
  np.testing.assert_allclose(model.scores(f_test), ref, rtol=1e-9, atol=1e-12)
  np.testing.assert_array_equal(model.predict(f_test), ref.argmax(1))


def test_knn_is_cosine_scale_invariant_and_chunked(monkeypatch):
  rng = np.random.default_rng(1)
  f_fit, y_fit = clustered(rng, 40)
  f_test, _ = clustered(rng, 30)
  model = knn.fit_knn(f_fit, y_fit)
  full = model.scores(f_test)
  np.testing.assert_allclose(knn.fit_knn(f_fit * 7.0, y_fit).scores(f_test * 0.1), full)
  monkeypatch.setattr(knn, '_MAX_MATRIX', 100)  # A few test rows per chunk.
  np.testing.assert_allclose(model.scores(f_test), full)


def test_knn_multilabel_votes_per_label():
  rng = np.random.default_rng(2)
  f_fit, f_test = rng.normal(size=(30, 4)), rng.normal(size=(5, 4))
  labels = (rng.random((30, 3)) < 0.4).astype(int)
  model = knn.fit_knn(f_fit, labels, k=7, tau=0.1)
  idx, sims = model.neighbours(f_test)
  for i in range(5):
    w = np.exp(sims[i] / 0.1)
    np.testing.assert_allclose(
      model.scores(f_test)[i], (w[:, None] * labels[idx[i]]).sum(0) / w.sum()
    )
  assert model.predict(f_test).shape == (5, 3)


def test_knn_refuses_nan_features():
  with pytest.raises(ValueError, match='knn: 1 NaN'):
    knn.fit_knn(np.array([[1.0, np.nan], [0.0, 1.0]]), np.array([0, 1]))


@pytest.mark.parametrize('n,dim', [(40, 6), (12, 30)])  # N >= D and D > N: both branches.
def test_least_squares_matches_solve_and_lstsq(n, dim):
  rng = np.random.default_rng(3)
  x, y = clustered(rng, n, dim=dim)
  l2 = 3.0
  model = few_shot.fit_least_squares(x, y, l2=l2, num_classes=3)
  design = np.c_[(x - x.mean(0)) / (x.std(0) + 1e-5), np.full(n, 100.0)]
  targets = 2.0 * np.eye(3)[y] - 1.0
  ref = np.linalg.solve(design.T @ design + l2 * np.eye(dim + 1), design.T @ targets)
  np.testing.assert_allclose(model.weights, ref, rtol=1e-7, atol=1e-9)
  # The same W as plain least squares on the system augmented with sqrt(l2) I.
  aug_x = np.r_[design, np.sqrt(l2) * np.eye(dim + 1)]
  aug_y = np.r_[targets, np.zeros((dim + 1, 3))]
  np.testing.assert_allclose(
    model.weights, np.linalg.lstsq(aug_x, aug_y, rcond=None)[0], rtol=1e-6, atol=1e-9
  )
  x_new = rng.normal(size=(5, dim))
  z = np.c_[(x_new - x.mean(0)) / (x.std(0) + 1e-5), np.full(5, 100.0)]
  np.testing.assert_allclose(model.scores(x_new), z @ ref, rtol=1e-6, atol=1e-8)


def test_draw_shots_per_class_nested_and_one_per_patient():
  rng = np.random.default_rng(4)
  y = rng.integers(0, 3, 90)
  one = few_shot.draw_shots(y, 1, seed=2)
  five = few_shot.draw_shots(y, 5, seed=2)
  assert np.bincount(y[five], minlength=3).tolist() == [5, 5, 5] and set(one) <= set(five)
  assert not np.array_equal(five, few_shot.draw_shots(y, 5, seed=3))
  subjects = np.arange(90) // 3  # Three images per patient.
  drawn = few_shot.draw_shots(y, 5, seed=0, subjects=subjects)
  for c in range(3):
    assert len(set(subjects[drawn[y[drawn] == c]])) == 5
  with pytest.raises(ValueError, match=r'few_shot: class 1 has 2 examples, fewer than 5 shots'):
    few_shot.draw_shots(np.r_[np.zeros(10, int), [1, 1]], 5)


def test_few_shot_protocol_reads_out_clusters_per_seed():
  rng = np.random.default_rng(5)
  f, y = clustered(rng, 300, spread=0.5)
  f_fit, y_fit, f_test, y_test = f[:200], y[:200], f[200:], y[200:]
  runs = protocols.run_few_shot(f_fit, y_fit, f_test, y_test, seeds=(0, 1), n_bootstrap=50)
  assert [r.info['seed'] for r in runs] == [0, 1]
  for r in runs:
    assert len(r.info['fit_indices']) == 15 and r.metrics['accuracy'].estimate > 0.9
    np.testing.assert_array_equal(r.predictor.predict(f_test), r.scores.argmax(1))
  rows = [
    row
    for r in runs
    for row in r.rows(method='m', task='t', fraction='5-shot', seed=r.info['seed'])
  ]
  acc = [a for a in aggregate.aggregate_seeds(rows) if a['metric'] == 'accuracy'][0]
  assert acc['n_seeds'] == 2 and acc['seeds'] == [0, 1]


def test_knn_protocol_returns_predictor_scores_and_patient_cis():
  rng = np.random.default_rng(6)
  f, y = clustered(rng, 160, num_classes=2)
  f_fit, y_fit, f_test, y_test = f[:100], y[:100], f[100:], y[100:]
  r = protocols.run_knn(
    f_fit, y_fit, f_test, y_test, test_groups=np.arange(60) // 2, n_bootstrap=50
  )
  assert r.scores.shape == (60, 2) and set(r.metrics) == {
    'accuracy',
    'balanced_accuracy',
    'auroc',
    'auprc',
  }
  ci = r.metrics['auroc']
  assert ci.low <= ci.estimate <= ci.high and ci.n_valid == 50
  np.testing.assert_array_equal(r.predictor.predict(f_test), r.scores.argmax(1))


def patients(rng, n_patients=200, per=(1, 6)):
  """Each patient: a label (imbalanced, 3 classes) and 1-5 images carrying it."""
  label = rng.choice(3, n_patients, p=[0.6, 0.3, 0.1])
  sizes = rng.integers(*per, n_patients)
  subjects = np.repeat(np.array([f'p{i:03d}' for i in range(n_patients)]), sizes)
  return subjects, np.repeat(label, sizes), label


def test_label_fractions_are_nested_per_patient_and_stratified():
  rng = np.random.default_rng(7)
  subjects, labels, patient_label = patients(rng, 1000)
  draws = fractions.draw_fractions(subjects, labels, seed=0)
  assert list(draws) == list(fractions.LABEL_PERCENTS)
  np.testing.assert_array_equal(draws[100], np.arange(len(labels)))
  percents = sorted(draws)
  for small, large in zip(percents, percents[1:]):
    assert set(draws[small]) <= set(draws[large])  # Nested.
  for p, idx in draws.items():
    chosen = set(subjects[idx])
    # Whole patients: every image of a chosen patient is in, no image of another.
    np.testing.assert_array_equal(
      np.isin(subjects, list(chosen)), np.isin(np.arange(len(labels)), idx)
    )
    # Stratified: each class contributes round(p% of its patients), half up.
    per_class = np.bincount(patient_label[[int(s[1:]) for s in chosen]], minlength=3)
    expect = [(p * int(np.sum(patient_label == c)) + 50) // 100 for c in range(3)]
    assert per_class.tolist() == expect, p
  other = fractions.draw_fractions(subjects, labels, seed=1)
  assert not np.array_equal(other[10], draws[10])
  again = fractions.draw_fractions_per_seed(subjects, labels, seeds=(0, 1))
  np.testing.assert_array_equal(again[1][25], other[25])


def test_a_fraction_that_empties_a_class_is_a_one_line_error():
  rng = np.random.default_rng(8)
  subjects, labels, _ = patients(rng, 60)  # About 6 patients of class 2: 1 % gives none.
  with pytest.raises(ValueError, match=r'^label fraction 1 %: class \d has no example among'):
    fractions.draw_fractions(subjects, labels, seed=0)
  assert len(fractions.draw_fractions(subjects, labels, (25, 100), seed=0)) == 2


def test_multilabel_strata_keep_a_rare_label():
  rng = np.random.default_rng(9)
  labels = np.zeros((400, 3), int)
  labels[:, 0] = rng.random(400) < 0.5
  labels[rng.choice(400, 20, replace=False), 2] = 1  # 20 patients with the rare label.
  subjects = np.arange(400)
  _, strata = fractions.patient_strata(subjects, labels)
  assert set(strata[labels[:, 2] == 1]) == {2} and set(np.unique(strata)) <= {-1, 0, 2}
  for seed in range(5):
    idx = fractions.draw_fractions(subjects, labels, (5,), seed=seed)[5]
    assert labels[idx, 2].sum() == 1  # round(5 % of 20) = 1, whatever the seed.


def test_aggregate_seeds_mean_and_sample_std():
  rows = [
    {'method': 'a', 'task': 't', 'fraction': f, 'metric': 'auroc', 'seed': s, 'value': v}
    for f, vals in ((10, (0.6, 0.7, 0.8)), (100, (0.9,)))
    for s, v in enumerate(vals)
  ]
  out = aggregate.aggregate_seeds(rows)
  assert [r['fraction'] for r in out] == [10, 100]
  assert out[0]['mean'] == pytest.approx(0.7) and out[0]['std'] == pytest.approx(0.1)
  assert out[0]['n_seeds'] == 3 and np.isnan(out[1]['std'])
  with pytest.raises(ValueError, match='one row per seed'):
    aggregate.aggregate_seeds(rows + [dict(rows[0])])
  with pytest.raises(ValueError, match='aggregate: 1 NaN'):
    aggregate.aggregate_seeds([{**rows[0], 'value': float('nan')}])


def test_classification_metrics_follow_the_label_layout():
  rng = np.random.default_rng(10)
  y = rng.integers(0, 2, 40)
  s = np.c_[1 - y, y] + rng.normal(size=(40, 2))
  binary = report.classification_metrics(y, s, threshold=0.5, n_bootstrap=20)
  assert set(binary) == {
    'accuracy',
    'balanced_accuracy',
    'auroc',
    'auprc',
    'sensitivity',
    'specificity',
  }
  assert binary['auroc'].estimate == metrics.auroc(y, s[:, 1])
  multi = report.classification_metrics(
    np.eye(3)[rng.integers(0, 3, 40)], rng.random((40, 3)), n_bootstrap=20
  )
  assert set(multi) == {'auroc', 'auprc'}
  with pytest.raises(ValueError, match=r'scores of shape \(N, C\) expected'):
    report.classification_metrics(y, s[:, 1])
  r = report.regression_metrics(np.arange(5.0), np.arange(5.0) + 1, n_bootstrap=20)
  assert r['mae'].estimate == 1.0 and r['rmse'].estimate == 1.0
