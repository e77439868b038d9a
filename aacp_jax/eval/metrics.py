"""Classification metrics with bootstrap confidence intervals (NumPy only, notebook-friendly)."""

import numpy as np


def auroc(y: np.ndarray, score: np.ndarray) -> float:
  """Area under the ROC curve = P(score of a positive > score of a negative), ties counted 1/2.

  Computed from mid-ranks (Mann-Whitney U), O(n log n). NaN when a class is missing.
  """
  y = np.asarray(y).astype(bool)
  score = np.asarray(score, dtype=np.float64)
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    return float('nan')
  order = np.argsort(score, kind='mergesort')
  ranks = np.empty(len(score), dtype=np.float64)
  sorted_scores = score[order]
  # Mid-ranks for ties: every member of a tie group gets the group's average rank.
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  mid = first + (counts + 1) / 2.0
  ranks[order] = np.repeat(mid, counts)
  u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
  return float(np.mean(np.asarray(y) == np.asarray(pred)))


def bootstrap_ci(metric, *arrays, n: int = 1000, alpha: float = 0.05, seed: int = 0):
  """Percentile bootstrap (resampling examples) of `metric(*arrays)`; returns (low, high)."""
  rng = np.random.default_rng(seed)
  size = len(arrays[0])
  values = []
  for _ in range(n):
    idx = rng.integers(0, size, size)
    v = metric(*(a[idx] for a in arrays))
    if np.isfinite(v):
      values.append(v)
  if not values:
    return (float('nan'), float('nan'))
  lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
  return (float(lo), float(hi))


def chance_accuracy(y_fit: np.ndarray, y_test: np.ndarray) -> float:
  """Accuracy of always predicting the majority class of the fitting set."""
  values, counts = np.unique(y_fit, return_counts=True)
  return accuracy(y_test, np.full_like(y_test, values[np.argmax(counts)]))
