"""Table and figure writers on a small synthetic results.jsonl: every number recomputed here
with NumPy from the rows, the paired Δ CI against `bootstrap.paired_bootstrap`."""

import json
import os
import re
import zlib

import numpy as np
import pytest

from aacp_jax import task_specs
from aacp_jax.eval import bootstrap, metrics
from aacp_jax.study import execute, figures, runner, tables

TASK = task_specs.get('phantom_ct_cls')
N_BOOT = 200
SKILL = {'full': 0.9, 'simclr': 0.6, 'random': 0.3}  # how far scores separate the classes


def heldout(n=40):
  truth = np.array([0, 1] * (n // 2))
  subjects = np.repeat([f's{i}' for i in range(n // 2)], 2)
  return truth, subjects


def synthetic_rows(methods=('full', 'simclr', 'random'), seeds=(0, 1, 2), fractions=(10.0, 100.0)):
  """Rows as execute.finetune_cell writes them, with scores kept for the references."""
  truth, subjects = heldout()
  rows, scores = [], {}
  for method in methods:
    for fraction in fractions:
      for seed in seeds:
        rng = np.random.default_rng(zlib.crc32(f'{method} {fraction} {seed}'.encode()))
        skill = SKILL[method] * (fraction / 100) ** 0.3
        p1 = np.clip(truth * skill + rng.uniform(0, 1, len(truth)), 0, 2) / 2
        s = np.stack([1 - p1, p1], 1).astype(np.float32)
        scores[method, fraction, seed] = s
        rows.append(
          {
            'kind': 'finetune',
            'status': 'ok',
            'method': method,
            'task': TASK.name,
            'fraction': fraction,
            'shots': 0,
            'labels': f'{fraction:g} %',
            'seed': seed,
            'metric': 'auroc',
            'estimate': float(metrics.auroc(truth, s[:, 1])),
            'replicates': execute.replicates(TASK, s, truth, subjects, N_BOOT),
            'test_id': execute.test_id(subjects),
          }
        )
  rows.append({'kind': 'finetune', 'status': 'failed', 'method': 'full', 'error': 'x'})
  return rows, scores


def write_jsonl(path, rows):
  with open(path, 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')


def numbers(text):
  return re.findall(r'[-+]?\d+\.\d{3}', text)


def printed(values):
  return [f'{v:.3f}' for v in values]


def test_table5_every_number_comes_from_the_rows(tmp_path):
  rows, _ = synthetic_rows()
  write_jsonl(tmp_path / 'results.jsonl', rows)
  rows = runner.read_results(str(tmp_path / 'results.jsonl'))
  text = tables.table5(rows, ['full', 'simclr', 'random', 'imagenet'])
  assert '| task | labels | metric | full | simclr | random |' in text  # imagenet had no rows
  for fraction in (10.0, 100.0):
    line = next(line for line in text.splitlines() if f'| {fraction:g} % |' in line)
    want = []
    for method in ('full', 'simclr', 'random'):
      group = [r for r in rows if r.get('method') == method and r.get('fraction') == fraction]
      est = np.array([r['estimate'] for r in group])
      reps = np.mean([[np.nan if v is None else v for v in r['replicates']] for r in group], 0)
      lo, hi = np.quantile(reps[np.isfinite(reps)], [0.025, 0.975])
      want += [est.mean(), est.std(ddof=1), lo, hi]
    assert numbers(line) == printed(want)
    assert line.count('(3)') == 3


def test_seed_mean_ci_is_bootstraps_with_the_same_resamples():
  rows, scores = synthetic_rows(methods=('full',), fractions=(100.0,))
  truth, subjects = heldout()
  (s,) = tables.summarise(rows)
  ref = bootstrap.seed_mean_ci(
    lambda y, sc: metrics.auroc(y, sc[:, 1]),
    truth,
    [scores['full', 100.0, seed] for seed in (0, 1, 2)],
    groups=subjects,
    n=N_BOOT,
  )
  assert (s['low'], s['high']) == pytest.approx((ref.low, ref.high), abs=1e-12)
  assert s['mean'] == pytest.approx(ref.estimate, abs=1e-12)


def test_table6_delta_ci_is_the_paired_bootstrap():
  truth, subjects = heldout()
  fn = lambda y, sc: metrics.auroc(y, sc[:, 1])
  # One seed: exactly bootstrap.paired_bootstrap on the two cells' scores.
  rows, scores = synthetic_rows(seeds=(0,), fractions=(100.0,))
  ok = tables.ok_rows(rows)
  d = tables.delta(
    [r for r in ok if r['method'] == 'simclr'], [r for r in ok if r['method'] == 'full']
  )
  ref = bootstrap.paired_bootstrap(
    fn, truth, scores['simclr', 100.0, 0], scores['full', 100.0, 0], groups=subjects, n=N_BOOT
  )
  assert (d['delta'], d['low'], d['high']) == pytest.approx(
    (ref.difference, ref.low, ref.high), abs=1e-12
  )
  # Three seeds: the NumPy reference, seed means of the same patient resamples.
  rows, scores = synthetic_rows(fractions=(100.0,))
  text = tables.table6(rows, ['full', 'simclr', 'random'], reference='full')
  for method in ('simclr', 'random'):
    diffs, est = [], []
    for idx in bootstrap.resample_indices(len(truth), subjects, n=N_BOOT, seed=0):
      a = np.mean([fn(truth[idx], scores[method, 100.0, s][idx]) for s in (0, 1, 2)])
      b = np.mean([fn(truth[idx], scores['full', 100.0, s][idx]) for s in (0, 1, 2)])
      diffs.append(a - b)
    diffs = np.array(diffs)
    lo, hi = np.quantile(diffs[np.isfinite(diffs)], [0.025, 0.975])
    for s in (0, 1, 2):
      est.append(fn(truth, scores[method, 100.0, s]) - fn(truth, scores['full', 100.0, s]))
    line = next(line for line in text.splitlines() if f'| {method} |' in line)
    mine = [r['estimate'] for r in tables.ok_rows(rows) if r['method'] == method]
    want = [np.mean(mine), np.std(mine, ddof=1), np.mean(est), lo, hi]
    assert numbers(line) == printed(want)
  assert '| full | auroc |' in text and text.count('| – | – |') == 1


def test_data_needed_on_synthetic_curves():
  def summary(method, fraction, mean, metric='auroc'):
    return {
      'task': 't',
      'method': method,
      'fraction': fraction,
      'shots': 0,
      'mean': mean,
      'metric': metric,
    }

  s = [summary('random', 10, 0.6), summary('random', 100, 0.7)]
  s += [summary('a', 1, 0.5), summary('a', 10, 0.8), summary('a', 100, 0.9)]
  s += [summary('b', 1, 0.75), summary('b', 10, 0.8)]
  s += [summary('c', 10, 0.6), summary('c', 100, 0.65)]
  got = {r['method']: r['fraction'] for r in tables.data_needed(s)}
  # a: 0.5 -> 0.8 between 1 and 10 %; 0.7 is 2/3 of the way in log10: 10^(2/3).
  assert got['a'] == pytest.approx(10 ** (2 / 3))
  assert got['b'] == 1.0 and got['c'] is None and got['random'] == 100.0
  # Lower is better (MAE): reaching the target means going below it.
  low = [
    summary('random', 100, 2.0, 'mae'),
    summary('a', 10, 3.0, 'mae'),
    summary('a', 100, 1.0, 'mae'),
  ]
  got = {r['method']: r['fraction'] for r in tables.data_needed(low)}
  assert got['a'] == pytest.approx(10**1.5)


def test_figures_are_written(tmp_path):
  from aacp_jax.eval import plots

  rows, _ = synthetic_rows()
  summaries = tables.summarise(rows)
  (png,) = figures.label_efficiency(summaries, str(tmp_path / 'label_efficiency.png'), note='test')
  needed = tables.data_needed(summaries)
  figures.data_needed(needed, str(tmp_path / 'data_needed.png'), note='test')
  rng = np.random.default_rng(0)
  feats = {f'step {s}': rng.normal(size=(24, 8)) + s for s in (40, 80, 120)}
  modality = np.array(['ct'] * 12 + ['xray'] * 12)
  region = np.array(['chest', 'abdomen'] * 6 + ['chest'] * 12)
  plots.embedding_panels(feats, modality, region, path=str(tmp_path / 'embeddings.png'), note='t')
  plots.attention_grid(
    rng.uniform(size=(2, 32, 32, 3)),
    rng.uniform(size=(2, 4, 4)),
    ['ct / chest', 'ct / abdomen'],
    path=str(tmp_path / 'attention.png'),
    note='t',
  )
  for name in ('label_efficiency.png', 'data_needed.png', 'embeddings.png', 'attention.png'):
    assert os.path.getsize(tmp_path / name) > 1000, name
  assert figures.pick_steps([10, 20, 30, 40, 50], 3) == [10, 30, 50]
  assert figures.pick_steps([10, 20], 3) == [10, 20]


def test_cluster_reports_separate_what_is_separable():
  rng = np.random.default_rng(0)
  region = np.array(['chest', 'abdomen'] * 10)
  label = np.array([0] * 10 + [1] * 10)
  ct = rng.normal(size=(20, 4)) * 0.01 + (region == 'chest')[:, None] * 5.0
  xray = rng.normal(size=(20, 4)) * 0.01 + 50.0
  data = {
    'ct': {'region': region, 'label': label},
    'xray': {'region': np.array(['chest'] * 20), 'label': -np.ones(20, int)},
  }
  rep = figures.cluster_reports({'ct': ct, 'xray': xray}, data)
  assert rep['modality']['purity'] == 1.0 and rep['region']['ct']['purity'] == 1.0
  assert list(rep['region']) == ['ct'] and list(rep['label']) == [
    'ct'
  ]  # xray: one region, no labels
  assert rep['label']['ct']['purity'] == pytest.approx(0.5)  # labels unrelated to the clusters
