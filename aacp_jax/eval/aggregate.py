"""Per-seed results to mean ± std over seeds, in long rows a notebook or pandas reads as is.

A per-seed row is a dict such as {'method': 'aacp', 'task': 'lidc', 'fraction': 10, 'seed': 0,
'metric': 'auroc', 'value': 0.81, 'low': 0.74, 'high': 0.87}. Rows that agree on every key in
`by` form one group; its `value`s over seeds give mean and std.

std is the sample standard deviation over seeds (ddof = 1: seeds are a sample of the draws one
could have made), NaN for a single seed rather than a misleading 0. The per-seed bootstrap
intervals (patients resampled) stay in the per-seed rows: averaging interval ends has no
coverage meaning.
"""

import numpy as np

DEFAULT_BY = ('method', 'task', 'fraction', 'metric')


def mean_std(values) -> tuple[float, float]:
  """(mean, sample std with ddof=1; NaN for one value). NaN values are an error."""
  values = np.asarray(values, np.float64)
  if not len(values):
    raise ValueError('aggregate: no values to average')
  if np.isnan(values).any():
    raise ValueError(f'aggregate: {int(np.isnan(values).sum())} NaN value(s) among {len(values)}')
  std = float(values.std(ddof=1)) if len(values) > 1 else float('nan')
  return float(values.mean()), std


def aggregate_seeds(rows, *, by=DEFAULT_BY, value: str = 'value', seed: str = 'seed') -> list:
  """One row per group: the `by` keys, mean, std, n_seeds and the seeds, in first-seen order.

  A seed that occurs twice in one group is an error: one draw per seed, or the std lies.
  """
  groups: dict = {}
  for r in rows:
    missing = [k for k in (*by, value, seed) if k not in r]
    if missing:
      raise ValueError(f'aggregate: a row lacks {missing}: {r}')
    groups.setdefault(tuple(r[k] for k in by), []).append(r)
  out = []
  for key, members in groups.items():
    seeds = [m[seed] for m in members]
    if len(set(seeds)) != len(seeds):
      raise ValueError(f'aggregate: {dict(zip(by, key))} has seeds {seeds}, one row per seed')
    mean, std = mean_std([m[value] for m in members])
    out.append(
      {**dict(zip(by, key)), 'mean': mean, 'std': std, 'n_seeds': len(seeds), 'seeds': seeds}
    )
  return out
