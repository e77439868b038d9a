"""Bootstrap confidence intervals that resample patients, and paired encoder comparisons.

Images of one patient are correlated (slices of one scan, follow-up studies): resampling images
as if independent makes intervals too narrow. Every function here takes `groups` (one patient id
per example, e.g. the records' `subject`) and then resamples whole patients with replacement,
each drawn patient contributing all of its images (the cluster bootstrap). `groups=None` resamples
examples, for test sets with one image per patient.

Intervals are percentiles of the replicate values. Replicates where the metric is undefined
(NaN, e.g. AUROC on a resample with no positive) are left out; `n_valid` says how many remain.
"""

import dataclasses
from typing import Callable, Iterator, NamedTuple

import numpy as np


class CI(NamedTuple):
  """A point estimate on the full test set with its percentile bootstrap interval."""

  estimate: float
  low: float
  high: float
  n_valid: int


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """metric(a) - metric(b) on the same test set, with its paired bootstrap interval.

  `p_value` is the two-sided bootstrap p-value of "no difference": twice the share of
  replicates on the far side of zero from the estimate (plus one, so never 0), capped at 1.
  """

  metric_a: float
  metric_b: float
  difference: float
  low: float
  high: float
  p_value: float
  n_valid: int


def resample_indices(n_examples: int, groups=None, *, n: int = 1000, seed: int = 0) -> Iterator:
  """`n` arrays of example indices, one per bootstrap replicate.

  With `groups`, each replicate draws as many groups as there are, with replacement, and takes
  every example of each drawn group (a group drawn twice comes twice). Without, it draws
  `n_examples` examples. With every example its own group the draws are the same as without.
  """
  rng = np.random.default_rng(seed)
  if groups is None:
    for _ in range(n):
      yield rng.integers(0, n_examples, n_examples)
    return
  groups = np.asarray(groups)
  if len(groups) != n_examples:
    raise ValueError(f'bootstrap: {len(groups)} group ids for {n_examples} examples')
  _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
  # Number the groups in order of first appearance, so groups=arange(n) reproduces groups=None.
  rank = np.empty(len(first), int)
  rank[np.argsort(first, kind='stable')] = np.arange(len(first))
  inverse = rank[inverse.reshape(-1)]
  members = np.argsort(inverse, kind='stable')  # Example indices sorted by group.
  counts = np.bincount(inverse, minlength=len(first))
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  for _ in range(n):
    drawn = rng.integers(0, len(first), len(first))
    sizes = counts[drawn]
    # Position j of the replicate is example starts[g] + (j - offset of g): one vectorised gather.
    offsets = np.repeat(np.cumsum(sizes) - sizes, sizes)
    yield members[np.repeat(starts[drawn], sizes) + np.arange(sizes.sum()) - offsets]


def _percentiles(values, alpha):
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if not len(values):
    return float('nan'), float('nan'), 0
  lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
  return float(lo), float(hi), len(values)


def bootstrap_ci(
  metric: Callable,
  *arrays,
  groups=None,
  n: int = 1000,
  alpha: float = 0.05,
  seed: int = 0,
) -> CI:
  """metric(*arrays) with a (1 - alpha) percentile interval over `n` (patient) resamples."""
  arrays = [np.asarray(a) for a in arrays]
  estimate = float(metric(*arrays))
  values = [
    metric(*(a[idx] for a in arrays))
    for idx in resample_indices(len(arrays[0]), groups, n=n, seed=seed)
  ]
  lo, hi, valid = _percentiles(values, alpha)
  return CI(estimate, lo, hi, valid)


def seed_mean_ci(
  metric: Callable,
  y,
  scores_by_seed,
  *,
  groups=None,
  n: int = 1000,
  alpha: float = 0.05,
  seed: int = 0,
) -> CI:
  """The mean over seeds of metric(y, scores_s), with a patient-bootstrap interval.

  For a curve of seed-averaged results (label efficiency): every replicate resamples the test
  patients once and averages the seeds' metrics on that resample, so the band shows the
  test-set uncertainty of the plotted mean. Seed-to-seed spread is the std of `aggregate`.
  """
  y = np.asarray(y)
  scores = [np.asarray(s) for s in scores_by_seed]
  if not scores or any(len(s) != len(y) for s in scores):
    raise ValueError(f'seed_mean_ci: every seed must score the {len(y)} test examples')

  def mean_metric(idx):
    return float(np.mean([metric(y[idx], s[idx]) for s in scores]))

  estimate = mean_metric(np.arange(len(y)))
  values = [mean_metric(idx) for idx in resample_indices(len(y), groups, n=n, seed=seed)]
  lo, hi, valid = _percentiles(values, alpha)
  return CI(estimate, lo, hi, valid)


def paired_bootstrap(
  metric: Callable,
  y,
  score_a,
  score_b,
  *,
  groups=None,
  n: int = 1000,
  alpha: float = 0.05,
  seed: int = 0,
) -> PairedDifference:
  """Difference metric(y, score_a) - metric(y, score_b) of two encoders on one test set.

  Paired: each replicate scores both encoders on the same resampled patients, so the test
  set's own variation cancels and only the encoders' difference remains in the interval.
  """
  y, score_a, score_b = np.asarray(y), np.asarray(score_a), np.asarray(score_b)
  if len(score_a) != len(y) or len(score_b) != len(y):
    raise ValueError(
      f'paired_bootstrap: {len(y)} labels, {len(score_a)} and {len(score_b)} scores; '
      'both encoders must score the same test examples'
    )
  a, b = float(metric(y, score_a)), float(metric(y, score_b))
  diffs = []
  for idx in resample_indices(len(y), groups, n=n, seed=seed):
    diffs.append(metric(y[idx], score_a[idx]) - metric(y[idx], score_b[idx]))
  diffs = np.asarray(diffs, np.float64)
  diffs = diffs[np.isfinite(diffs)]
  lo, hi, valid = _percentiles(diffs, alpha)
  if valid:
    far = np.sum(diffs <= 0) if a - b > 0 else np.sum(diffs >= 0)
    p = min(1.0, 2.0 * (far + 1) / (valid + 1))
  else:
    p = float('nan')
  return PairedDifference(a, b, a - b, lo, hi, float(p), valid)
