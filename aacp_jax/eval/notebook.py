"""The notebook API: a pretrained workdir's model, embeddings of raw images, and the frozen-feature
protocols, each returning what was fit (predictor, test scores) and not only metrics.

  pre = notebook.load_pretrained('/tmp/aacp_demo')
  train = notebook.load_split(root, 'train', 'ct', pre.config.data.image_size)
  f = notebook.embed(pre, train['image'], 'ct')            # raw stored-unit images in
  ev = notebook.probe(f_fit, y_fit, f_test, y_test, groups=test['subject'])
  ev.predictor(f_new), ev.scores, ev.metrics['auroc']      # CI(estimate, low, high, n_valid)

One convention everywhere: images are (N, H, W, C) in their stored units (HU, 0..255, normalised
MRI); the modality's evaluation preprocessing (`augment.preprocess` with the run's `augment`
config) happens inside `embed`. Image size rule: H and W must be multiples of 32 (the encoder's
total stride) and equal; a size other than the run's `data.image_size` is refused when the model
has FPN or ROI-attention heads (their maps were trained at that size), and allowed otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from aacp_jax import modalities as modalities_lib
from aacp_jax import restore
from aacp_jax.eval import embed as embed_lib
from aacp_jax.eval import probe as probe_lib
from aacp_jax.eval import protocols, report

load_split = embed_lib.load_split


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """config: the run's resolved config; model: its flax Module; variables: {'params',
  'batch_stats'} on the host; step: the checkpoint's step."""

  config: Any
  model: Any
  variables: dict
  step: int

  @property
  def modalities(self) -> tuple:
    return tuple(self.config.modalities)


def load_pretrained(workdir: str, step: int | None = None) -> Pretrained:
  """The newest verifying checkpoint of `workdir` (or `step`); one-line ValueError without a
  workdir, config.json or usable checkpoint (restore.load_variables' messages)."""
  r = restore.load_variables(workdir, step=step)
  return Pretrained(config=r.config, model=r.model, variables=r.variables, step=r.step)


def _check_modality(pretrained: Pretrained, modality: str) -> None:
  if modality not in pretrained.modalities:
    raise ValueError(
      f'modality {modality!r}: the pretrained model has encoders for {list(pretrained.modalities)}'
    )


def encoder(pretrained: Pretrained, modality: str):
  """(ResNet module, {'params', 'batch_stats'}) of one modality's backbone."""
  _check_modality(pretrained, modality)
  restored = restore.Restored(
    pretrained.config, pretrained.model, pretrained.variables, pretrained.step
  )
  return restore.encoder_variables(restored, modality)


def _expected_channels(pretrained: Pretrained, modality: str) -> int:
  given = pretrained.model.in_channels
  if given and modality in given:
    return int(given[modality])
  return modalities_lib.IN_CHANNELS[modality]


def check_images(pretrained: Pretrained, images, modality: str) -> None:
  """One-line ValueError when `images` cannot go through this modality's encoder."""
  _check_modality(pretrained, modality)
  shape = np.shape(images)
  if len(shape) != 4:
    raise ValueError(f'embed {modality}: images of shape (N, H, W, C) expected, got {shape}')
  _, h, w, c = shape
  want = _expected_channels(pretrained, modality)
  if c != want:
    raise ValueError(f'embed {modality}: expected {want} channel(s), given {c} (shape {shape})')
  if h != w or h % 32:
    raise ValueError(
      f'embed {modality}: square images with a side divisible by 32 expected, given {h}x{w}'
    )
  trained = int(pretrained.config.data.image_size)
  model_cfg = pretrained.config.model
  heads = [k for k in ('fpn', 'roi_attention') if model_cfg.get(k, False)]
  if h != trained and heads:
    raise ValueError(
      f"embed {modality}: image size {h} differs from the run's data.image_size={trained} and "
      f'the model has {"/".join(heads)} head(s) trained at that size; resize with load_split'
    )


def embed(
  pretrained: Pretrained, images, modality: str, *, key: str = 'features', batch_size: int = 64
) -> np.ndarray:
  """(N, F) backbone features (`key='features'`) or unit projections (`key='z'`) of raw images
  (N, H, W, C) in stored units; preprocessing is the run's `augment` config's."""
  check_images(pretrained, images, modality)
  if key not in ('features', 'z'):
    raise ValueError(f"embed: key must be 'features' or 'z', got {key!r}")
  images = np.asarray(images)
  # One compiled batch shape; small sets need no larger padding than themselves.
  batch_size = max(1, min(batch_size, len(images)))
  return embed_lib.embed(
    pretrained.model,
    pretrained.variables,
    images,
    modality,
    pretrained.config.augment,
    batch_size=batch_size,
    key=key,
  )


class _Probe:
  """A fitted logistic probe: calling it gives class probabilities (N, C)."""

  def __init__(self, predict_proba, l2: float):
    self._predict = predict_proba
    self.l2 = l2

  def __call__(self, x) -> np.ndarray:
    return self._predict(np.asarray(x))

  def scores(self, x) -> np.ndarray:
    return self(x)

  def predict(self, x) -> np.ndarray:
    return self(x).argmax(1)


def probe(
  f_fit,
  y_fit,
  f_test,
  y_test,
  *,
  groups=None,
  l2: float | None = None,
  threshold: float | None = None,
  n_bootstrap: int = 1000,
  seed: int = 0,
) -> report.Evaluation:
  """Logistic probe (`probe.fit_logistic`, l2 by `probe.choose_l2` on the fitting set unless
  given) -> Evaluation(predictor, test scores (N, C), metrics with CIs, info={'l2', 'n_fit'}).
  `groups`: the test examples' patients, the bootstrap's resampling unit."""
  f_fit, y_fit = np.asarray(f_fit), np.asarray(y_fit).astype(int)
  num_classes = int(max(y_fit.max(), np.asarray(y_test).max()) + 1)
  if l2 is None:
    l2 = probe_lib.choose_l2(f_fit, y_fit, seed=seed)
  predictor = _Probe(probe_lib.fit_logistic(f_fit, y_fit, l2=l2, num_classes=num_classes), l2)
  scores = predictor(f_test)
  m = report.classification_metrics(
    y_test, scores, groups=groups, threshold=threshold, n_bootstrap=n_bootstrap, seed=seed
  )
  return report.Evaluation(predictor, scores, m, {'l2': l2, 'n_fit': len(y_fit)})


def knn(
  f_fit, y_fit, f_test, y_test, *, groups=None, k: int = 20, tau: float = 0.07, **kwargs
) -> report.Evaluation:
  """Weighted cosine k-NN (`protocols.run_knn`); the predictor is the `KNNClassifier`."""
  return protocols.run_knn(f_fit, y_fit, f_test, y_test, k=k, tau=tau, test_groups=groups, **kwargs)


def few_shot(
  f_fit, y_fit, f_test, y_test, *, groups=None, shots: int = 5, seeds=(0, 1, 2), **kwargs
) -> list:
  """Least-squares few-shot read-out (`protocols.run_few_shot`): one Evaluation per seed."""
  return protocols.run_few_shot(
    f_fit, y_fit, f_test, y_test, shots=shots, seeds=seeds, test_groups=groups, **kwargs
  )
