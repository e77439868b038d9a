"""Table 5, Table 6 and "data needed to match", from results.jsonl rows alone.

Every number is a function of the rows: mean and std over seeds of each row's `estimate`; the
95 % CI of the seed mean is the 2.5/97.5 % quantile over replicates of the seeds' mean replicate
(`bootstrap.seed_mean_ci`'s definition: one patient resample, every seed scored on it); the CI
of a Table 6 difference is the same quantile of (method's seed-mean replicate - reference's),
paired because replicate i resamples the same patients in every cell of a task (`test_id`).
"""

from __future__ import annotations

import math

import numpy as np

LOWER_IS_BETTER = ('mae', 'rmse')


def ok_rows(rows) -> list:
  return [r for r in rows if r.get('kind') == 'finetune' and r.get('status') == 'ok']


def _replicate_matrix(group) -> np.ndarray:
  return np.asarray(
    [[np.nan if v is None else v for v in r['replicates']] for r in group], np.float64
  )


def _quantiles(values) -> tuple:
  values = values[np.isfinite(values)]
  if not len(values):
    return float('nan'), float('nan')
  lo, hi = np.quantile(values, [0.025, 0.975])
  return float(lo), float(hi)


def _groups(rows) -> dict:
  """(task, labels, method) -> its rows sorted by seed, in first-appearance order."""
  out = {}
  for r in ok_rows(rows):
    out.setdefault((r['task'], r['labels'], r['method']), []).append(r)
  return {k: sorted(v, key=lambda r: r['seed']) for k, v in out.items()}


def summarise(rows) -> list[dict]:
  """One summary per (task, labels, method): mean ± std over seeds and the seed-mean CI."""
  out = []
  for (task, labels, method), group in _groups(rows).items():
    est = [r['estimate'] for r in group]
    lo, hi = _quantiles(np.mean(_replicate_matrix(group), 0))
    out.append(
      {
        'task': task,
        'labels': labels,
        'fraction': group[0]['fraction'],
        'shots': group[0]['shots'],
        'method': method,
        'metric': group[0]['metric'],
        'mean': float(np.mean(est)),
        'std': float(np.std(est, ddof=1)) if len(est) > 1 else float('nan'),
        'n_seeds': len(est),
        'seeds': [r['seed'] for r in group],
        'low': lo,
        'high': hi,
      }
    )
  return out


def _fmt(x) -> str:
  return '–' if x is None or not math.isfinite(x) else f'{x:.3f}'


def _label_order(s) -> tuple:
  return (s['shots'] != 0, s['fraction'] or 0.0)  # fractions ascending, then k-shot


def table5(rows, methods, note: str = '') -> str:
  """Tasks x methods: per task and label setting, `mean ± std [CI] (n)` of each method."""
  summaries = summarise(rows)
  methods = [m for m in methods if any(s['method'] == m for s in summaries)]
  by = {(s['task'], s['labels'], s['method']): s for s in summaries}
  lines = [
    '| task | labels | metric | ' + ' | '.join(methods) + ' |',
    '|---|---|---|' + '---|' * len(methods),
  ]
  settings = {}
  for s in summaries:
    settings.setdefault((s['task'], s['labels']), s)
  tasks = list(dict.fromkeys(s['task'] for s in summaries))
  for task in tasks:
    keys = sorted((k for k in settings if k[0] == task), key=lambda k: _label_order(settings[k]))
    for k in keys:
      cells = []
      for m in methods:
        s = by.get((k[0], k[1], m))
        cells.append(
          '–'
          if s is None
          else f'{_fmt(s["mean"])} ± {_fmt(s["std"])} [{_fmt(s["low"])}, {_fmt(s["high"])}] '
          f'({s["n_seeds"]})'
        )
      lines.append(f'| {task} | {k[1]} | {settings[k]["metric"]} | ' + ' | '.join(cells) + ' |')
  text = '\n'.join(lines)
  legend = (
    '\n\nmean ± std over seeds [95 % patient-bootstrap CI of the seed mean] (seeds); '
    'every number is computed from results.jsonl (aacp_jax/study/tables.py).'
  )
  return text + legend + (f'\n{note}' if note else '')


def delta(rows_a, rows_b) -> dict:
  """Seed-mean difference a - b and the paired CI over shared replicates (module docstring)."""
  ids = {r['test_id'] for r in rows_a} | {r['test_id'] for r in rows_b}
  if len(ids) != 1:
    raise ValueError(f'table6: cells of one task scored different test sets ({sorted(ids)})')
  ra, rb = _replicate_matrix(rows_a), _replicate_matrix(rows_b)
  if ra.shape[1] != rb.shape[1]:
    raise ValueError(f'table6: {ra.shape[1]} and {rb.shape[1]} replicates; eval.bootstrap differs')
  d = np.mean(ra, 0) - np.mean(rb, 0)
  lo, hi = _quantiles(d)
  value = float(np.mean([r['estimate'] for r in rows_a]) - np.mean([r['estimate'] for r in rows_b]))
  return {'delta': value, 'low': lo, 'high': hi}


def table6(rows, ablations, reference: str = 'full', note: str = '') -> str:
  """Per task and label setting: the reference row, then each ablation's mean ± std and its
  difference from the reference with the paired-bootstrap CI of that difference."""
  groups = _groups(rows)
  lines = [
    f'| task | labels | row | metric | mean ± std (seeds) | Δ vs {reference} | 95 % CI of Δ |',
    '|---|---|---|---|---|---|---|',
  ]
  settings = list(dict.fromkeys((k[0], k[1]) for k in groups))
  for task, labels in settings:
    ref = groups.get((task, labels, reference))
    if ref is None:
      continue
    for m in [reference] + [a for a in ablations if a != reference]:
      g = groups.get((task, labels, m))
      if g is None:
        continue
      est = [r['estimate'] for r in g]
      std = float(np.std(est, ddof=1)) if len(est) > 1 else float('nan')
      head = f'| {task} | {labels} | {m} | {g[0]["metric"]} | '
      body = f'{_fmt(float(np.mean(est)))} ± {_fmt(std)} ({len(est)}) | '
      if m == reference:
        lines.append(head + body + '– | – |')
        continue
      d = delta(g, ref)
      lines.append(head + body + f'{d["delta"]:+.3f} | [{_fmt(d["low"])}, {_fmt(d["high"])}] |')
  legend = (
    f'\n\nΔ = seed mean of the row - seed mean of {reference}; its CI: 2.5/97.5 % quantiles of the '
    'paired patient-bootstrap replicates of Δ (the same resamples in every cell, results.jsonl).'
  )
  return '\n'.join(lines) + legend + (f'\n{note}' if note else '')


def data_needed(summaries, baseline: str = 'random') -> list[dict]:
  """Per task and method: the smallest label fraction at which the method's seed mean reaches
  the baseline's score at its largest fraction (its full-data score), linearly interpolated in
  log10(fraction) between the two measured fractions around the crossing; None if never."""
  out = []
  fr = [s for s in summaries if not s['shots']]
  for task in dict.fromkeys(s['task'] for s in fr):
    base = [s for s in fr if s['task'] == task and s['method'] == baseline]
    if not base:
      continue
    top = max(base, key=lambda s: s['fraction'])
    lower = top['metric'] in LOWER_IS_BETTER
    target = top['mean']
    for method in dict.fromkeys(s['method'] for s in fr if s['task'] == task):
      curve = sorted(
        ((s['fraction'], s['mean']) for s in fr if s['task'] == task and s['method'] == method)
      )
      out.append(
        {
          'task': task,
          'method': method,
          'metric': top['metric'],
          'target': target,
          'baseline_fraction': top['fraction'],
          'fraction': crossing(curve, target, lower),
        }
      )
  return out


def crossing(curve, target: float, lower: bool = False):
  """First fraction where `curve` ((fraction, value) ascending) reaches `target`."""
  good = (lambda v: v <= target) if lower else (lambda v: v >= target)
  prev = None
  for f, v in curve:
    if good(v):
      if prev is None or v == prev[1]:
        return float(f)
      f0, v0 = prev
      t = (target - v0) / (v - v0)
      return float(10 ** (math.log10(f0) + t * (math.log10(f) - math.log10(f0))))
    prev = (f, v)
  return None


def data_needed_table(needed, note: str = '') -> str:
  lines = [
    '| task | method | metric | target (baseline, full data) | label fraction to match |',
    '|---|---|---|---|---|',
  ]
  for r in needed:
    f = 'not reached' if r['fraction'] is None else f'{r["fraction"]:.3g} %'
    lines.append(
      f'| {r["task"]} | {r["method"]} | {r["metric"]} | {r["target"]:.3f} '
      f'({r["baseline_fraction"]:g} %) | {f} |'
    )
  legend = (
    '\n\nThe smallest fraction whose seed mean reaches the baseline at its largest fraction, '
    'interpolated in log10(fraction) between the measured fractions around the crossing.'
  )
  return '\n'.join(lines) + legend + (f'\n{note}' if note else '')
