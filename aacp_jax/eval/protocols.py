"""Frozen-feature protocols end to end: fit on the fitting split, score the test split, metrics.

Each returns `report.Evaluation` objects (the fitted predictor, the test scores, metrics with
patient-bootstrap CIs), never only a dict, so a notebook can keep predicting with what was fit.
`test_groups` are the test examples' patients (`subject`), the bootstrap's resampling unit.
"""

from aacp_jax.eval import few_shot as few_shot_lib
from aacp_jax.eval import knn as knn_lib
from aacp_jax.eval import report


def run_knn(
  f_fit,
  y_fit,
  f_test,
  y_test,
  *,
  k: int = 20,
  tau: float = 0.07,
  num_classes: int | None = None,
  test_groups=None,
  n_bootstrap: int = 1000,
  seed: int = 0,
) -> report.Evaluation:
  """Weighted cosine k-NN (solo-learn's read-out) of the test features.

  `num_classes` defaults to the fitting labels' largest id + 1; state it when the test split
  holds a class that the fitting split lacks.
  """
  model = knn_lib.fit_knn(f_fit, y_fit, k=k, tau=tau, num_classes=num_classes)
  scores = model.scores(f_test)
  m = report.classification_metrics(
    y_test, scores, groups=test_groups, n_bootstrap=n_bootstrap, seed=seed
  )
  return report.Evaluation(model, scores, m, {'k': k, 'tau': tau, 'n_fit': len(y_fit)})


def run_few_shot(
  f_fit,
  y_fit,
  f_test,
  y_test,
  *,
  shots: int = few_shot_lib.DEFAULT_SHOTS,
  seeds=(0, 1, 2),
  l2: float = few_shot_lib.DEFAULT_L2,
  fit_subjects=None,
  test_groups=None,
  n_bootstrap: int = 1000,
) -> list:
  """One `Evaluation` per seed: `shots` per class drawn by that seed, least squares on them.

  `info['fit_indices']` records which fitting examples each seed drew.
  """
  out = []
  for s in seeds:
    model, idx = few_shot_lib.fit_few_shot(
      f_fit, y_fit, shots=shots, seed=s, l2=l2, subjects=fit_subjects
    )
    scores = model.scores(f_test)
    m = report.classification_metrics(
      y_test, scores, groups=test_groups, n_bootstrap=n_bootstrap, seed=s
    )
    out.append(report.Evaluation(model, scores, m, {'seed': s, 'shots': shots, 'fit_indices': idx}))
  return out
