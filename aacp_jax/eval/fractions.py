"""Label fractions: nested, patient-level, label-stratified subsets of a fitting split.

The unit is the patient (`subject`): a patient's images are all in or all out, so a 1 % subset
is 1 % of the patients, not 1 % of the slices of everyone. Per seed, each stratum's patients are
put in one random order and a fraction p takes the first round(p * n_stratum) of them (half
up). Because every fraction is a prefix of the same orders and the count grows with p, each
smaller fraction is a subset of every larger one (nested), and 100 % is everything.

Strata: a patient's stratum is its most frequent class id (ties: the smallest); for multi-hot
labels (N, C), its rarest positive label over the split (the label with the fewest positive
patients), or "no finding" when it has none, so that a rare label is not lost by chance.
A draw that leaves a class (a label, for multi-hot) with no example is an error naming the
fraction and the class.
"""

import numpy as np

LABEL_PERCENTS = (1, 2, 5, 10, 25, 50, 100)


def patient_strata(subjects, labels) -> tuple[np.ndarray, np.ndarray]:
  """(unique patients, each one's stratum id) as described in the module docstring."""
  subjects, labels = np.asarray(subjects), np.asarray(labels)
  if len(subjects) != len(labels):
    raise ValueError(f'label fractions: {len(subjects)} subjects for {len(labels)} labels')
  patients, inverse = np.unique(subjects, return_inverse=True)
  inverse = inverse.reshape(-1)
  if labels.ndim == 1:
    labels = labels.astype(int)
    if len(labels) and labels.min() < 0:
      raise ValueError(f'label fractions: class ids must be >= 0, found {labels.min()}')
    counts = np.zeros((len(patients), labels.max() + 1), int)
    np.add.at(counts, (inverse, labels), 1)
    return patients, counts.argmax(1)  # argmax takes the first maximum: the smallest class.
  positive = np.zeros((len(patients), labels.shape[1]), bool)
  np.logical_or.at(positive, inverse, labels > 0)
  # Columns rarest first; a patient's stratum is its first (rarest) positive label.
  rarest_first = np.argsort(positive.sum(0), kind='stable')
  ranked = positive[:, rarest_first]
  return patients, np.where(ranked.any(1), rarest_first[ranked.argmax(1)], -1)


def _count(percent: float, n: int) -> int:
  # Half up in exact arithmetic for whole percents: (p n + 50) // 100, no 0.05 * 10 surprises.
  return int((percent * n + 50) // 100)


def draw_fractions(subjects, labels, percents=LABEL_PERCENTS, *, seed: int = 0) -> dict:
  """{percent: sorted example indices} for one seed; nested, per patient, stratified."""
  percents = sorted(float(p) for p in percents)
  if not percents or percents[0] <= 0 or percents[-1] > 100:
    raise ValueError(f'label fractions: percents must lie in (0, 100], got {percents}')
  subjects, labels = np.asarray(subjects), np.asarray(labels)
  patients, strata = patient_strata(subjects, labels)
  rng = np.random.default_rng(seed)
  orders = {s: rng.permutation(np.nonzero(strata == s)[0]) for s in np.unique(strata)}
  patient_of = np.searchsorted(patients, subjects)
  out = {}
  for p in percents:
    chosen = np.zeros(len(patients), bool)
    for order in orders.values():
      chosen[order[: _count(p, len(order))]] = True
    idx = np.nonzero(chosen[patient_of])[0]
    _check_every_class(p, labels, idx, int(chosen.sum()))
    out[int(p) if p == int(p) else p] = idx
  return out


def _check_every_class(percent, labels, idx, n_patients):
  if labels.ndim == 1:
    missing = np.setdiff1d(np.unique(labels), np.unique(labels[idx]))
  else:
    present = (labels[idx] > 0).any(0)
    missing = np.nonzero((labels > 0).any(0) & ~present)[0]
  if len(missing):
    raise ValueError(
      f'label fraction {percent:g} %: class {missing[0].item()} has no example among the '
      f'{n_patients} patients drawn ({len(missing)} class(es) empty); use a larger fraction'
    )


def draw_fractions_per_seed(subjects, labels, percents=LABEL_PERCENTS, seeds=(0, 1, 2)) -> dict:
  """{seed: {percent: indices}}: one independent nested draw per seed."""
  return {s: draw_fractions(subjects, labels, percents, seed=s) for s in seeds}
