"""Weighted k-nearest-neighbour classifier on frozen features (cosine similarity).

The read-out of solo-learn's WeightedKNNClassifier (after Wu et al. 2018, instance
discrimination): features are L2-normalised, a test point's k most similar fitting points vote,
each with weight exp(sim / tau), and a class's score is the sum of its voters' weights:

  score_c(x) = sum_{j in top-k(x)} exp(cos(x, x_j) / tau) [y_j = c],

normalised here to sum to one over classes (the argmax is unchanged, and the scores read as
probabilities for AUROC). Multi-label targets (N, C) vote per label: score_c is the weighted
share of neighbours carrying label c. Defaults k = 20, tau = 0.07 as solo-learn's.
Among equally similar candidates for the k-th place the lower fitting index wins, so the
result is deterministic.
"""

import dataclasses

import numpy as np

from aacp_jax.eval import metrics

# Similarities held at once: test rows per chunk = this // number of fitting points.
_MAX_MATRIX = 5_000_000


def _normalise(name, x):
  x = metrics.check_no_nan(name, x)
  if x.ndim != 2:
    raise ValueError(f'{name}: features of shape (N, D) expected, got {x.shape}')
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class KNNClassifier:
  """A fitted k-NN: the normalised fitting features and their targets (one-hot or multi-hot)."""

  features: np.ndarray
  targets: np.ndarray  # (N, C) float: one-hot class ids, or multi-hot labels.
  k: int
  tau: float
  multilabel: bool

  def _chunks(self, x):
    """(indices, similarities) of the k nearest, most similar first, a block of rows at a time."""
    x = _normalise('knn', x)
    k = min(self.k, len(self.features))
    chunk = max(1, _MAX_MATRIX // len(self.features))
    for start in range(0, max(len(x), 1), chunk):  # An empty x yields one empty block.
      sim = x[start : start + chunk] @ self.features.T
      top = np.argsort(-sim, axis=1, kind='stable')[:, :k]
      yield top, np.take_along_axis(sim, top, axis=1)

  def neighbours(self, x) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosine similarities) of each row's k nearest fitting points, most similar first."""
    idx, sims = zip(*self._chunks(x))
    return np.concatenate(idx), np.concatenate(sims)

  def scores(self, x) -> np.ndarray:
    """(N, C) class (or label) scores in [0, 1]; rows sum to one for class ids."""
    out = []
    for idx, sim in self._chunks(x):
      # exp((s - max s) / tau) is exp(s / tau) up to a per-row factor that the normalisation
      # below removes; it keeps small tau from overflowing.
      w = np.exp((sim - sim[:, :1]) / self.tau)
      out.append(np.einsum('nk,nkc->nc', w, self.targets[idx]) / w.sum(1, keepdims=True))
    return np.concatenate(out)

  def predict(self, x) -> np.ndarray:
    """Class ids (N,) by the largest score, or multi-hot (N, C) labels scoring >= 1/2."""
    s = self.scores(x)
    return (s >= 0.5).astype(np.int32) if self.multilabel else s.argmax(1)


def fit_knn(
  features, labels, *, k: int = 20, tau: float = 0.07, num_classes: int | None = None
) -> KNNClassifier:
  """A k-NN classifier over (features (N, D), labels): class ids (N,) or multi-hot (N, C)."""
  if k < 1 or not tau > 0:
    raise ValueError(f'knn: k must be >= 1 and tau > 0, got k={k}, tau={tau}')
  features = _normalise('knn', features)
  labels = np.asarray(labels)
  if len(labels) != len(features):
    raise ValueError(f'knn: {len(features)} feature rows for {len(labels)} labels')
  multilabel = labels.ndim == 2
  if multilabel:
    if not np.isin(labels, (0, 1)).all():
      raise ValueError(
        'knn: multi-hot labels must be 0 or 1 (map uncertain labels by a policy first)'
      )
    targets = labels.astype(np.float64)
  else:
    num_classes = int(num_classes or labels.max() + 1)
    targets = np.eye(num_classes)[labels.astype(int)]
  return KNNClassifier(features, targets, int(k), float(tau), multilabel)
