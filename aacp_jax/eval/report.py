"""Test-set scores to metrics with patient-bootstrap CIs, and the protocols' common result.

`classification_metrics` picks the metrics by the label layout: binary (accuracy, balanced
accuracy, AUROC, AP, and sensitivity/specificity when a threshold is stated), multi-class
(accuracy, balanced accuracy, macro one-vs-rest AUROC and AP), multi-label (macro AUROC and
AP). Every value is a `bootstrap.CI` whose resampling unit is the patient when `groups` is given.
"""

import dataclasses
import functools
from typing import Any

import numpy as np

from aacp_jax.eval import bootstrap, metrics


@dataclasses.dataclass
class Evaluation:
  """A protocol's outcome: the fitted predictor, its test scores and metrics (name -> CI)."""

  predictor: Any
  scores: np.ndarray
  metrics: dict
  info: dict = dataclasses.field(default_factory=dict)

  def rows(self, **keys) -> list:
    """Long rows for `aggregate.aggregate_seeds`: keys + metric, value, low, high."""
    return [
      {**keys, 'metric': m, 'value': ci.estimate, 'low': ci.low, 'high': ci.high}
      for m, ci in self.metrics.items()
    ]


def _argmax_metric(fn, y, s):
  return fn(y, s.argmax(1))


def classification_metrics(
  y,
  scores,
  *,
  groups=None,
  threshold: float | None = None,
  n_bootstrap: int = 1000,
  seed: int = 0,
) -> dict:
  """{metric: CI} for class ids y (N,) with scores (N, C), or multi-hot y (N, C)."""
  y, scores = np.asarray(y), metrics.check_no_nan('classification_metrics', scores)
  if scores.ndim != 2 or len(scores) != len(y):
    raise ValueError(
      f'classification_metrics: scores of shape (N, C) expected for labels {y.shape}, '
      f'got {scores.shape} (binary tasks too: column 1 is the positive class)'
    )
  ci = functools.partial(bootstrap.bootstrap_ci, groups=groups, n=n_bootstrap, seed=seed)
  if y.ndim == 2:
    return {
      'auroc': ci(metrics.auroc_multilabel, y, scores),
      'auprc': ci(metrics.average_precision_multilabel, y, scores),
    }
  out = {
    'accuracy': ci(functools.partial(_argmax_metric, metrics.accuracy), y, scores),
    'balanced_accuracy': ci(
      functools.partial(_argmax_metric, metrics.balanced_accuracy), y, scores
    ),
  }
  if scores.shape[1] == 2:
    positive = scores[:, 1]
    out['auroc'] = ci(metrics.auroc, y, positive)
    out['auprc'] = ci(metrics.average_precision, y, positive)
    if threshold is not None:
      out['sensitivity'] = ci(
        functools.partial(metrics.sensitivity, threshold=threshold), y, positive
      )
      out['specificity'] = ci(
        functools.partial(metrics.specificity, threshold=threshold), y, positive
      )
  else:
    out['auroc'] = ci(metrics.auroc_ovr, y, scores)
    out['auprc'] = ci(metrics.average_precision_ovr, y, scores)
  return out


def regression_metrics(target, pred, *, groups=None, n_bootstrap: int = 1000, seed: int = 0):
  """{'mae': CI, 'rmse': CI} with patient-bootstrap intervals."""
  ci = functools.partial(bootstrap.bootstrap_ci, groups=groups, n=n_bootstrap, seed=seed)
  return {'mae': ci(metrics.mae, target, pred), 'rmse': ci(metrics.rmse, target, pred)}
