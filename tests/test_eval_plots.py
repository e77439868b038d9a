"""The notebook library's plots, clusters and input checks on small synthetic inputs."""

import os
import types

import ml_collections
import numpy as np
import pytest

from aacp_jax.eval import clusters, notebook, plots


def _png(path):
  assert os.path.getsize(path) > 5000, f'{path}: {os.path.getsize(path)} bytes'
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_label_efficiency_png(tmp_path):
  rows = []
  for method, base in (('aacp', 0.8), ('simclr', 0.7)):
    for task in ('ct', 'xray'):
      for fraction in (1, 10, 100):
        for seed in (0, 1):
          v = base + 0.05 * np.log10(fraction) + 0.01 * seed
          rows.append(
            dict(method=method, task=task, fraction=fraction, seed=seed, metric='auroc',
                 value=v, low=v - 0.05, high=v + 0.05)
          )  # fmt: skip
  fig = plots.label_efficiency(rows, path=tmp_path / 'le.png', note='test_eval_plots')
  assert len(fig.axes) == 2
  _png(tmp_path / 'le.png')
  agg = [dict(method='a', task='t', fraction=f, metric='auroc', mean=0.7, std=0.02, n_seeds=3)
         for f in (1, 5, 50)]  # fmt: skip
  plots.label_efficiency(agg, path=tmp_path / 'agg.png')
  _png(tmp_path / 'agg.png')


def test_embeddings_png(tmp_path):
  rng = np.random.default_rng(0)
  f = np.concatenate([rng.normal(0, 1, (20, 8)), rng.normal(3, 1, (20, 8))])
  modality = np.repeat(['ct', 'xray'], 20)
  region = np.tile(['chest', 'abdomen'], 20)
  fig = plots.embeddings(f, modality, region, path=tmp_path / 'emb.png')
  assert len(fig.axes) == 2
  _png(tmp_path / 'emb.png')


def test_attention_overlay_png(tmp_path):
  yy, xx = np.mgrid[:64, :64]
  image = (np.hypot(yy - 32, xx - 32) < 20) * 300.0 - 100.0 + 0 * yy
  image = np.repeat(image[..., None], 3, axis=-1)
  attention = np.random.default_rng(0).uniform(size=(4, 4))
  mask = np.hypot(yy - 32, xx - 32) < 10
  plots.attention_overlay(image, attention, mask, path=tmp_path / 'att.png', window='abdomen')
  _png(tmp_path / 'att.png')
  with pytest.raises(ValueError, match='expected one of'):
    plots.attention_overlay(image, attention, window='nonsense')


def test_roc_curves_png(tmp_path):
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 100)
  fig = plots.roc_curves(
    y, {'good': y + rng.normal(0, 0.7, 100), 'random': rng.normal(size=100)}, tmp_path / 'r.png'
  )
  assert 'AUROC' in fig.axes[0].get_legend().get_texts()[0].get_text()
  _png(tmp_path / 'r.png')


def test_roc_curve_area_matches_auroc():
  # The drawn curve's trapezoid area is the mid-rank AUROC, ties included.
  y = np.array([0, 1, 0, 1, 1, 0, 1])
  s = np.array([0.1, 0.4, 0.4, 0.8, 0.2, 0.2, 0.9])
  fig = plots.roc_curves(y, {'s': s})
  fpr, tpr = fig.axes[0].lines[0].get_data()
  area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
  from aacp_jax.eval import metrics

  assert area == pytest.approx(metrics.auroc(y, s))


def _brute_purity(assignment, labels):
  total = 0
  for c in set(assignment.tolist()):
    members = [labels[i] for i in range(len(labels)) if assignment[i] == c]
    total += max(members.count(v) for v in set(members))
  return total / len(labels)


def test_purity_reference():
  assignment = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
  labels = np.array([5, 5, 7, 7, 7, 5, 9, 9, 9, 5])
  # Clusters: {5,5,7} -> 2, {7,7,5} -> 2, {5,9,9,9} -> 3: 7 / 10.
  assert clusters.purity(assignment, labels) == pytest.approx(0.7)
  assert clusters.purity(assignment, labels) == _brute_purity(assignment, labels.tolist())


def test_kmeans_purity_against_numpy_reference():
  from sklearn.cluster import KMeans

  rng = np.random.default_rng(0)
  centres = np.array([[0, 0], [6, 0], [0, 6]])
  labels = rng.integers(0, 3, 60)
  f = centres[labels] + rng.normal(0, 2.0, (60, 2))
  got = clusters.kmeans_purity(f, labels, seed=0)
  assignment = KMeans(n_clusters=3, n_init=10, random_state=0).fit_predict(f)
  assert got == pytest.approx(_brute_purity(assignment, labels.tolist()))
  report = clusters.cluster_report(f, labels, names=['a', 'b', 'c'])
  assert report['purity'] == pytest.approx(got)
  assert sum(c['size'] for c in report['clusters']) == 60
  assert {c['majority'] for c in report['clusters']} <= {'a', 'b', 'c'}


def _fake_pretrained(**model):
  config = ml_collections.ConfigDict(
    {'modalities': ('ct', 'xray'), 'data': {'image_size': 32}, 'model': {'fpn': False, **model}}
  )
  return notebook.Pretrained(config, types.SimpleNamespace(in_channels=None), {}, 0)


def test_embed_refuses_wrong_input_in_one_line():
  pre = _fake_pretrained()
  with pytest.raises(ValueError) as e:
    notebook.embed(pre, np.zeros((2, 32, 32, 3), np.uint8), 'xray')
  assert 'expected 1 channel(s), given 3' in str(e.value) and '\n' not in str(e.value)
  with pytest.raises(ValueError, match='divisible by 32'):
    notebook.embed(pre, np.zeros((2, 40, 40, 1), np.uint8), 'xray')
  with pytest.raises(ValueError, match="encoders for \\['ct', 'xray'\\]"):
    notebook.embed(pre, np.zeros((2, 32, 32, 3), np.float16), 'mri')
  with pytest.raises(ValueError, match='fpn head'):
    notebook.embed(_fake_pretrained(fpn=True), np.zeros((2, 64, 64, 1), np.uint8), 'xray')


def test_load_pretrained_and_encoder_refuse_in_one_line(tmp_path):
  with pytest.raises(ValueError) as e:
    notebook.load_pretrained(str(tmp_path / 'absent'))
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match="'mri'.*\\['ct', 'xray'\\]"):
    notebook.encoder(_fake_pretrained(), 'mri')
