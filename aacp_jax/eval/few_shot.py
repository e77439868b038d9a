"""Few-shot read-out: closed-form regularised least squares on frozen features (big_vision).

As big_vision's few-shot evaluator: `shots` fitting examples per class are drawn per seed; the
features are whitened with the shots' mean and std (+1e-5); a constant column of 100 stands in
for the bias (so large that the penalty barely touches it); targets are one-hot mapped to
{-1, +1}; and the weights solve

  W = argmin ||X W - Y||^2 + l2 ||W||^2 = (X^T X + l2 I)^{-1} X^T Y      (N >= D)
                                       = X^T (X X^T + l2 I)^{-1} Y      (D > N, same W),

through one eigendecomposition of the smaller Gram matrix, so any number of l2 values cost one
matrix product each. Prediction is argmax_c (x W)_c. Float64 NumPy: the systems are small
(shots x classes rows) and exactness beats speed here. Default l2 = 2^10, big_vision's.
"""

import dataclasses

import numpy as np

from aacp_jax.eval import metrics

BIAS_CONSTANT = 100.0
DEFAULT_L2 = 2.0**10
DEFAULT_SHOTS = 5


@dataclasses.dataclass(frozen=True)
class LeastSquaresClassifier:
  """A fitted linear read-out: whitening statistics and weights (D + 1, C), bias row last."""

  mean: np.ndarray
  std: np.ndarray
  weights: np.ndarray
  l2: float

  def scores(self, x) -> np.ndarray:
    """(N, C) regression outputs x W (targets were +-1: not probabilities, but they rank)."""
    x = metrics.check_no_nan('few_shot', x)
    return _design(x, self.mean, self.std) @ self.weights

  def predict(self, x) -> np.ndarray:
    return self.scores(x).argmax(1)


def _design(x, mean, std):
  x = (x - mean) / std
  return np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)


class _EigenCache:
  """The eigendecomposition that makes every l2 a cheap product (big_vision's cache)."""

  def __init__(self, x, targets):
    n, d = x.shape
    if n >= d:
      eigs, q = np.linalg.eigh(x.T @ x)
      self.lhs, self.rhs = q, q.T @ (x.T @ targets)
    else:
      eigs, q = np.linalg.eigh(x @ x.T)
      self.lhs, self.rhs = x.T @ q, q.T @ targets
    self.eigs = eigs

  def weights(self, l2: float) -> np.ndarray:
    return (self.lhs / (self.eigs + l2)) @ self.rhs


def fit_least_squares(
  features, labels, *, l2: float = DEFAULT_L2, num_classes: int | None = None
) -> LeastSquaresClassifier:
  """The closed-form read-out of module docstring on all of (features (N, D), class ids (N,))."""
  if not l2 > 0:
    raise ValueError(f'few_shot: l2 must be > 0, got {l2}')
  x = metrics.check_no_nan('few_shot', features)
  labels = np.asarray(labels).astype(int)
  num_classes = int(num_classes or labels.max() + 1)
  mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
  targets = 2.0 * np.eye(num_classes)[labels] - 1.0
  cache = _EigenCache(_design(x, mean, std), targets)
  return LeastSquaresClassifier(mean, std, cache.weights(l2), float(l2))


def draw_shots(labels, shots: int = DEFAULT_SHOTS, *, seed: int = 0, subjects=None) -> np.ndarray:
  """Indices of `shots` examples of each class (sorted), drawn at random by `seed`.

  As big_vision: one permutation per class, its first `shots` taken, so the 5-shot draw holds
  the 1-shot one of the same seed. With `subjects`, at most one image per patient per class is
  taken, so five shots are five patients. A class with fewer than `shots` candidates is an
  error naming it: a silently smaller class would bias the read-out.
  """
  labels = np.asarray(labels).astype(int)
  rng = np.random.default_rng(seed)
  out = []
  for c in range(labels.max() + 1):
    candidates = rng.permutation(np.nonzero(labels == c)[0])
    if subjects is not None:
      _, first = np.unique(np.asarray(subjects)[candidates], return_index=True)
      candidates = candidates[np.sort(first)]
    if len(candidates) < shots:
      unit = 'patients' if subjects is not None else 'examples'
      raise ValueError(
        f'few_shot: class {c} has {len(candidates)} {unit}, fewer than {shots} shots'
      )
    out.append(candidates[:shots])
  return np.sort(np.concatenate(out))


def fit_few_shot(
  features,
  labels,
  *,
  shots: int = DEFAULT_SHOTS,
  seed: int = 0,
  l2: float = DEFAULT_L2,
  subjects=None,
) -> tuple[LeastSquaresClassifier, np.ndarray]:
  """Draw `shots` per class (`draw_shots`) and fit the read-out on them; (predictor, indices)."""
  labels = np.asarray(labels).astype(int)
  idx = draw_shots(labels, shots, seed=seed, subjects=subjects)
  features = np.asarray(features)
  model = fit_least_squares(features[idx], labels[idx], l2=l2, num_classes=labels.max() + 1)
  return model, idx
