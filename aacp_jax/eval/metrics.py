"""Classification and regression metrics (NumPy only, notebook-friendly).

Conventions, the same for every function:
- labels: binary `y` in {0, 1} (or bool) of shape (N,); multi-class `y` int class ids (N,);
  multi-label `Y` in {0, 1} of shape (N, C). Scores are any real numbers, higher = more positive.
- A NaN score is an error (`ValueError` naming the metric and the NaN count): sorted, it would
  land at one end and silently decide the ranking. Infinite scores rank like any other.
- A metric that is undefined on the data (AUROC or AP with no positive, or no negative) is NaN,
  so a bootstrap can leave such a resample out; macro averages are NaN when any class is.
  `*_per_class` shows which class it is.
"""

import numpy as np

from aacp_jax.eval import bootstrap as bootstrap_lib


def check_no_nan(name: str, x) -> np.ndarray:
  """`x` as a float64 array, or a one-line ValueError when it holds NaN."""
  x = np.asarray(x, dtype=np.float64)
  bad = int(np.isnan(x).sum())
  if bad:
    raise ValueError(f'{name}: {bad} NaN value(s) among {x.size} scores; NaN has no rank')
  return x


def _binary_labels(name: str, y) -> np.ndarray:
  y = np.asarray(y)
  if y.dtype != bool:
    check_no_nan(name, y)
    if not np.isin(y, (0, 1)).all():
      found = np.unique(y[~np.isin(y, (0, 1))])[:5].tolist()
      raise ValueError(f'{name}: binary labels must be 0 or 1, found {found}')
  return y.astype(bool)


def _paired(name: str, y, score, ndim: int):
  score = check_no_nan(name, score)
  if score.ndim != ndim or len(score) != len(np.asarray(y)):
    raise ValueError(
      f'{name}: scores of shape {score.shape} for labels of shape {np.shape(y)}; expected '
      f'{"(N,)" if ndim == 1 else "(N, C)"} with the labels N'
    )
  return score


def _midranks(score: np.ndarray) -> np.ndarray:
  """1-based ranks, every member of a tie group at the group's average rank."""
  order = np.argsort(score, kind='mergesort')
  _, first, counts = np.unique(score[order], return_index=True, return_counts=True)
  ranks = np.empty(len(score), dtype=np.float64)
  ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
  return ranks


def auroc(y, score) -> float:
  """Binary area under the ROC curve.

  AUROC = P(s+ > s-) + 1/2 P(s+ = s-) over positive/negative pairs, from mid-ranks
  (Mann-Whitney U): (sum of positives' ranks - n+(n+ + 1)/2) / (n+ n-). Ties count 1/2, which
  equals scikit-learn's trapezoidal area under its tie-grouped ROC curve. O(N log N).
  NaN when a class is missing.
  """
  y = _binary_labels('auroc', y)
  score = _paired('auroc', y, score, 1)
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    return float('nan')
  u = _midranks(score)[y].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def average_precision(y, score) -> float:
  """Binary area under the precision-recall curve, as scikit-learn's average precision.

  AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds t_n, descending, where a
  score >= t_n is called positive (tied scores enter together), P_n and R_n the precision and
  recall there, R_0 = 0. No interpolation (not the trapezoid, which is optimistic).
  NaN without positives.
  """
  y = _binary_labels('average_precision', y)
  score = _paired('average_precision', y, score, 1)
  n_pos = int(y.sum())
  if n_pos == 0:
    return float('nan')
  order = np.argsort(-score, kind='mergesort')
  s, hit = score[order], y[order]
  # The last position of each run of equal scores is where a threshold lets the run in.
  ends = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
  tp = np.cumsum(hit)[ends]
  precision = tp / (ends + 1.0)
  recall = tp / n_pos
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _per_class(fn, name, labels, scores, multilabel: bool) -> np.ndarray:
  scores = _paired(name, labels, scores, 2)
  labels = np.asarray(labels)
  if multilabel:
    if labels.shape != scores.shape:
      raise ValueError(f'{name}: labels {labels.shape} and scores {scores.shape} differ')
    columns = [labels[:, c] for c in range(scores.shape[1])]
  else:
    if labels.ndim != 1:
      raise ValueError(f'{name}: class ids of shape (N,) expected, got {labels.shape}')
    columns = [labels == c for c in range(scores.shape[1])]
  return np.array([fn(col, scores[:, c]) for c, col in enumerate(columns)])


def auroc_per_class(labels, scores, *, multilabel: bool = False) -> np.ndarray:
  """Binary AUROC of each column: one-vs-rest on class ids (N,), or per label of (N, C)."""
  return _per_class(auroc, 'auroc', labels, scores, multilabel)


def auroc_ovr(y, scores) -> float:
  """Macro one-vs-rest AUROC: mean over classes c of auroc(y == c, scores[:, c]).

  scikit-learn's roc_auc_score(multi_class='ovr', average='macro'), without its demand that
  rows sum to one. NaN when a class is absent from `y` (it has no positives).
  """
  return float(np.mean(auroc_per_class(y, scores)))


def auroc_multilabel(labels, scores) -> float:
  """Macro multi-label AUROC: mean over labels c of auroc(labels[:, c], scores[:, c])."""
  return float(np.mean(auroc_per_class(labels, scores, multilabel=True)))


def average_precision_per_class(labels, scores, *, multilabel: bool = False) -> np.ndarray:
  """Average precision of each column: one-vs-rest on class ids, or per label of (N, C)."""
  return _per_class(average_precision, 'average_precision', labels, scores, multilabel)


def average_precision_ovr(y, scores) -> float:
  """Macro one-vs-rest average precision (mean over classes of AP(y == c, scores[:, c]))."""
  return float(np.mean(average_precision_per_class(y, scores)))


def average_precision_multilabel(labels, scores) -> float:
  """Macro multi-label average precision, as scikit-learn's average='macro'."""
  return float(np.mean(average_precision_per_class(labels, scores, multilabel=True)))


def accuracy(y, pred) -> float:
  """Share of examples with pred == y."""
  return float(np.mean(np.asarray(y) == np.asarray(pred)))


def balanced_accuracy(y, pred) -> float:
  """Mean over the classes present in `y` of their recall, (1/K) sum_c P(pred = c | y = c).

  As scikit-learn's balanced_accuracy_score (adjusted=False): a predicted class that never
  occurs in `y` lowers the recall of the true classes but adds no term of its own.
  """
  y, pred = np.asarray(y), np.asarray(pred)
  classes = np.unique(y)
  return float(np.mean([np.mean(pred[y == c] == c) for c in classes]))


def _confusion(name, y, score, threshold):
  y = _binary_labels(name, y)
  score = _paired(name, y, score, 1)
  called = score >= threshold
  return y, called


def sensitivity(y, score, *, threshold: float) -> float:
  """TP / (TP + FN) with score >= threshold called positive. NaN without positives."""
  y, called = _confusion('sensitivity', y, score, threshold)
  return float(np.mean(called[y])) if y.any() else float('nan')


def specificity(y, score, *, threshold: float) -> float:
  """TN / (TN + FP) with score >= threshold called positive. NaN without negatives."""
  y, called = _confusion('specificity', y, score, threshold)
  return float(np.mean(~called[~y])) if (~y).any() else float('nan')


def sensitivity_specificity(y, score, *, threshold: float) -> tuple[float, float]:
  """(sensitivity, specificity) at the stated threshold (score >= threshold is positive)."""
  return sensitivity(y, score, threshold=threshold), specificity(y, score, threshold=threshold)


def mae(target, pred) -> float:
  """Mean absolute error, (1/N) sum |pred - target|."""
  target, pred = check_no_nan('mae', target), check_no_nan('mae', pred)
  return float(np.mean(np.abs(pred - target)))


def rmse(target, pred) -> float:
  """Root mean squared error, sqrt((1/N) sum (pred - target)^2)."""
  target, pred = check_no_nan('rmse', target), check_no_nan('rmse', pred)
  return float(np.sqrt(np.mean((pred - target) ** 2)))


def bootstrap_ci(metric, *arrays, n: int = 1000, alpha: float = 0.05, seed: int = 0):
  """Percentile bootstrap (resampling examples) of `metric(*arrays)`; returns (low, high).

  Kept for its callers; `bootstrap.bootstrap_ci(..., groups=subjects)` resamples patients and
  returns the estimate too. The draws are the same, so the intervals are too.
  """
  ci = bootstrap_lib.bootstrap_ci(metric, *arrays, n=n, alpha=alpha, seed=seed)
  return (ci.low, ci.high)


def chance_accuracy(y_fit: np.ndarray, y_test: np.ndarray) -> float:
  """Accuracy of always predicting the majority class of the fitting set."""
  values, counts = np.unique(y_fit, return_counts=True)
  return accuracy(y_test, np.full_like(y_test, values[np.argmax(counts)]))
