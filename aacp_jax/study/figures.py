"""The study's figures and clusters.json: Fig. 3 (label efficiency) and "data needed to match"
from results.jsonl rows; Fig. 2 (embeddings at several checkpoints), the attention maps and the
k-means purity from the pretraining workdirs the rows name. Needs the `eval` extra
(matplotlib, scikit-learn)."""

from __future__ import annotations

import json
import os

import numpy as np

from aacp_jax.study import tables


def label_efficiency(summaries, path: str, note: str = '') -> list[str]:
  """Fig. 3 in one PNG: one panel per task (titled with its primary metric, so tasks of
  different metrics share the figure), the fractions on a log axis, one line per method with
  the seed-mean CI band."""
  from aacp_jax.eval import plots

  rows = [
    {
      'method': s['method'],
      'task': f'{s["task"]} ({s["metric"]})',
      'fraction': s['fraction'],
      'metric': 'primary metric',
      'value': s['mean'],
      'low': s['low'] if np.isfinite(s['low']) else s['mean'],
      'high': s['high'] if np.isfinite(s['high']) else s['mean'],
    }
    for s in summaries
    if not s['shots']
  ]
  plots.label_efficiency(rows, path=path, note=note)
  return [path]


def data_needed(needed, path: str, note: str = '') -> str:
  from aacp_jax.eval import plots

  plots.data_needed(needed, path=path, note=note)
  return path


def _checkpoint_steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def pick_steps(steps, n: int) -> list[int]:
  """n steps evenly spaced over `steps` (sorted), the last one always included."""
  if len(steps) <= n:
    return list(steps)
  idx = np.unique(np.round(np.linspace(0, len(steps) - 1, n)).astype(int))
  return [steps[i] for i in idx]


def _test_images(config, workdir: str, n: int, seed: int = 0):
  """Per modality, `n` test images (stored units), their regions and labels, drawn with a fixed
  seed from the pretraining workdir's own test split."""
  from aacp_jax.data import shards
  from aacp_jax.eval import embed as embed_lib
  from aacp_jax.train import inputs

  root = inputs.prepare_data(config, workdir, seed=int(config.seed))
  out = {}
  for m in config.modalities:
    arrays = embed_lib.load_split(root, 'test', m, int(config.data.image_size))
    source = shards.open_source(root, 'test', m, verify=False)
    regions = np.asarray([str(source[i].get('region', m)) for i in range(len(source))])
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(regions), min(n, len(regions)), replace=False))
    out[m] = {
      'image': arrays['image'][idx],
      'region': regions[idx],
      'label': arrays['label'][idx],
    }
  return out


def cluster_reports(feats: dict, data: dict) -> dict:
  """k-means purity of the projections z: all modalities together by modality, and within
  each modality by region (where it has several) and by label (where every image has one)."""
  from aacp_jax.eval import clusters

  mods = list(data)
  modality = np.concatenate([[m] * len(feats[m]) for m in mods])
  out = {
    'features': 'z',
    'modality': clusters.cluster_report(np.concatenate([feats[m] for m in mods]), modality),
    'region': {},
    'label': {},
  }
  for m in mods:
    if len(set(data[m]['region'])) > 1:
      out['region'][m] = clusters.cluster_report(feats[m], data[m]['region'])
    labels = data[m]['label']
    if (labels >= 0).all() and len(set(labels.tolist())) > 1:
      out['label'][m] = clusters.cluster_report(feats[m], labels)
  return out


def method_purity(pre_dir: str, examples: int) -> dict:
  """clusters.json's per-method entry: the purities alone, at the final checkpoint."""
  from aacp_jax.eval import notebook

  pre = notebook.load_pretrained(pre_dir)
  data = _test_images(pre.config, pre_dir, examples)
  rep = cluster_reports({m: notebook.embed(pre, data[m]['image'], m, key='z') for m in data}, data)
  return {
    'step': pre.step,
    'modality': rep['modality']['purity'],
    'region': {m: r['purity'] for m, r in rep['region'].items()},
    'label': {m: r['purity'] for m, r in rep['label'].items()},
  }


def pretrained_figures(pre_dir: str, out_dir: str, *, steps: int, examples: int, note: str = ''):
  """embeddings.png (t-SNE by modality and region at `steps` checkpoints), attention.png (ROI
  attention on two test images per modality, when the model has it) and the final checkpoint's
  k-means purity (returned) of one pretraining workdir."""
  from aacp_jax.eval import embed as embed_lib
  from aacp_jax.eval import notebook, plots

  ckpts = pick_steps(_checkpoint_steps(pre_dir), steps)
  if not ckpts:
    raise ValueError(f'{pre_dir}: no checkpoints to draw embeddings from')
  first = notebook.load_pretrained(pre_dir, step=ckpts[-1])
  data = _test_images(first.config, pre_dir, examples)
  mods = list(data)
  modality = np.concatenate([[m] * len(data[m]['region']) for m in mods])
  region = np.concatenate([data[m]['region'] for m in mods])
  panels, last = {}, None
  for step in ckpts:
    pre = first if step == ckpts[-1] else notebook.load_pretrained(pre_dir, step=step)
    feats = {m: notebook.embed(pre, data[m]['image'], m, key='z') for m in mods}
    panels[f'step {step}'] = np.concatenate([feats[m] for m in mods])
    last = feats
  plots.embedding_panels(
    panels, modality, region, path=os.path.join(out_dir, 'embeddings.png'), note=note
  )
  report = {'workdir': pre_dir, 'step': ckpts[-1], **cluster_reports(last, data)}
  if first.config.model.get('roi_attention', False):
    images, maps, titles = [], [], []
    for m in mods:
      att = embed_lib.embed(
        first.model,
        first.variables,
        data[m]['image'][:2],
        m,
        first.config.augment,
        batch_size=2,
        key='attention',
      )
      for i in range(len(att)):
        images.append(data[m]['image'][i])
        maps.append(np.asarray(att[i]).reshape(att[i].shape[:2]))
        titles.append(f'{m} / {data[m]["region"][i]} (step {ckpts[-1]})')
    plots.attention_grid(
      images, maps, titles, path=os.path.join(out_dir, 'attention.png'), note=note
    )
  return report


def write_all(
  rows, out_dir: str, *, methods, pre_dirs: dict, study, note: str = '', png_note: str = ''
) -> dict:
  """Every figure the study draws; returns {name: path or error line} (a figure that cannot be
  drawn is reported, not fatal: the tables are the result)."""
  # A PNG's footnote is one line under the figure (`png_note`); data_needed.md takes `note`.
  written, md_note, note = {}, note, png_note or note
  summaries = tables.summarise(rows)
  order = {m: i for i, m in enumerate(methods)}
  summaries.sort(key=lambda s: order.get(s['method'], len(order)))
  try:
    for p in label_efficiency(summaries, os.path.join(out_dir, 'label_efficiency.png'), note):
      written[os.path.basename(p)] = p
  except (ImportError, ValueError) as e:
    written['label_efficiency.png'] = f'not drawn: {e}'
  needed = tables.data_needed(summaries, baseline=study.baseline)
  with open(os.path.join(out_dir, 'data_needed.md'), 'w', encoding='utf-8') as f:
    f.write(tables.data_needed_table(needed, md_note) + '\n')
  with open(os.path.join(out_dir, 'data_needed.json'), 'w', encoding='utf-8') as f:
    json.dump(needed, f, indent=1)
  written['data_needed.md'] = os.path.join(out_dir, 'data_needed.md')
  try:
    if needed:
      written['data_needed.png'] = data_needed(
        needed, os.path.join(out_dir, 'data_needed.png'), note
      )
  except (ImportError, ValueError) as e:
    written['data_needed.png'] = f'not drawn: {e}'
  ref = pre_dirs.get(study.reference)
  if ref:
    try:
      report = pretrained_figures(
        ref,
        out_dir,
        steps=int(study.embedding_checkpoints),
        examples=int(study.embedding_examples),
        note=note,
      )
      report = {'method': study.reference, **report, 'methods': {}}
      for method, where in pre_dirs.items():
        report['methods'][method] = method_purity(where, int(study.embedding_examples))
      with open(os.path.join(out_dir, 'clusters.json'), 'w', encoding='utf-8') as f:
        json.dump(report, f, indent=1)
      for name in ('embeddings.png', 'attention.png', 'clusters.json'):
        if os.path.exists(os.path.join(out_dir, name)):
          written[name] = os.path.join(out_dir, name)
    except (ImportError, ValueError) as e:
      written['embeddings.png'] = f'not drawn: {e}'
  return written
