"""Evaluation library: AUROC against a brute-force reference, CIs, probes, the metric writer."""

import os

import numpy as np

from aacp_jax.eval import metrics, probe
from aacp_jax.metrics import MetricWriter, read_jsonl


def auroc_bruteforce(y, s):
  pos, neg = s[y == 1], s[y == 0]
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_definition_with_ties():
  rng = np.random.default_rng(0)
  for _ in range(20):
    y = rng.integers(0, 2, 57)
    s = np.round(rng.normal(size=57) + y, 1)  # Rounding creates ties.
    np.testing.assert_allclose(metrics.auroc(y, s), auroc_bruteforce(y, s), rtol=1e-12)
  assert np.isnan(metrics.auroc(np.ones(4), np.arange(4.0)))


def test_bootstrap_ci_brackets_the_estimate():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 2, 200)
  s = y + rng.normal(size=200)
  lo, hi = metrics.bootstrap_ci(metrics.auroc, y, s, n=300)
  assert lo < metrics.auroc(y, s) < hi and hi - lo < 0.2


def test_linear_probe_separates_informative_features_and_not_noise():
  rng = np.random.default_rng(2)
  y_fit, y_test = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
  informative = lambda y: np.c_[y * 1.5 + rng.normal(size=len(y)), rng.normal(size=(len(y), 7))]
  r = probe.linear_probe(informative(y_fit), y_fit, informative(y_test), y_test, bootstrap=100)
  assert r['auroc'] > 0.8 and r['accuracy'] > r['chance_accuracy'] + 0.15
  noise = probe.linear_probe(
    rng.normal(size=(200, 8)), y_fit, rng.normal(size=(200, 8)), y_test, bootstrap=100
  )
  assert 0.35 < noise['auroc'] < 0.65


def test_metric_writer_appends_jsonl_and_tensorboard(tmp_path):
  w = MetricWriter(str(tmp_path), enabled=True)
  w.write(10, {'loss': np.float32(1.5), 'images_per_sec': 3.0})
  w.close()
  w = MetricWriter(str(tmp_path), enabled=True)  # A resumed run appends.
  w.write(20, {'loss': 1.0})
  w.close()
  rows = read_jsonl(os.path.join(tmp_path, 'metrics.jsonl'))
  assert [r['step'] for r in rows] == [10, 20] and rows[0]['loss'] == 1.5
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tensorboard'))
