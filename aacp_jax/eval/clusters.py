"""How well embeddings cluster by label: k-means purity (scikit-learn's KMeans, n_init=10)."""

import numpy as np


def purity(assignment, labels) -> float:
  """Sum over clusters of the cluster's most frequent label count, divided by N."""
  assignment, labels = np.asarray(assignment), np.asarray(labels)
  if len(assignment) != len(labels) or not len(labels):
    raise ValueError(f'purity: {len(assignment)} assignments for {len(labels)} labels')
  _, a = np.unique(assignment, return_inverse=True)
  _, y = np.unique(labels, return_inverse=True)
  table = np.zeros((a.max() + 1, y.max() + 1), int)
  np.add.at(table, (a.reshape(-1), y.reshape(-1)), 1)
  return float(table.max(1).sum() / len(labels))


def _kmeans(features, k, seed):
  from sklearn.cluster import KMeans  # Lazy: scikit-learn is the `eval` extra.

  features = np.asarray(features, np.float64)
  if features.ndim != 2 or np.isnan(features).any():
    raise ValueError(f'kmeans: finite features (N, D) expected, got shape {features.shape}')
  return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)


def kmeans_purity(features, labels, k: int | None = None, seed: int = 0) -> float:
  """Purity of k-means clusters (k = the number of classes by default) against `labels`."""
  k = int(k or len(np.unique(labels)))
  return purity(_kmeans(features, k, seed), labels)


def cluster_report(features, labels, names=None, k: int | None = None, seed: int = 0) -> dict:
  """{'purity', 'k', 'clusters': [{'cluster', 'size', 'majority', 'majority_share'}]};
  `names` maps a label value to a printable name (dict or sequence indexed by label)."""
  labels = np.asarray(labels)
  k = int(k or len(np.unique(labels)))
  assignment = _kmeans(features, k, seed)
  clusters = []
  for c in np.unique(assignment):
    members = labels[assignment == c]
    values, counts = np.unique(members, return_counts=True)
    top = values[counts.argmax()]
    clusters.append(
      {
        'cluster': int(c),
        'size': int(len(members)),
        'majority': names[top.item()] if names is not None else top.item(),
        'majority_share': float(counts.max() / len(members)),
      }
    )
  return {'purity': purity(assignment, labels), 'k': k, 'clusters': clusters}
