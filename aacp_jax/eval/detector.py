"""Landmark detector inference and its figures: load a trained detector workdir, predict on raw
images, score predictions (`data_prep.annotate_landmarks` and `train.landmarks` use these)."""

import functools
import json
import os

import jax
import ml_collections
import numpy as np

from aacp_jax import augment, restore
from aacp_jax.data import landmarks as lm

DETECTOR_FILE = 'detector.json'


@functools.partial(jax.jit, static_argnames=('model', 'modality', 'aug_cfg'))
def _predict(variables, images, *, model, modality, aug_cfg):
  if aug_cfg is not None:  # raw stored values: normalise as training did
    images = augment.preprocess(images, modality, aug_cfg)
  out = model.apply(variables, {modality: images}, train=False)[modality]
  return out['landmarks'], jax.nn.sigmoid(out['visible_logit'])


def predict(variables, raw_images, modality, *, model, aug_cfg, batch_size=64):
  """Raw host images (N, H, W, C) -> (landmarks (N, K, 2), confidence (N, K)) numpy, batched.

  Images are the records' stored values (HU, 0..255, normalised MRI) at the detector's image size;
  the confidence is the predicted probability that the landmark is in the field of view.
  `aug_cfg=None` takes images already normalised (augmentation output).
  """
  aug_cfg = None if aug_cfg is None else ml_collections.FrozenConfigDict(aug_cfg)
  pts, conf = [], []
  for i in range(0, len(raw_images), batch_size):
    chunk = np.asarray(raw_images[i : i + batch_size], np.float32)
    n = len(chunk)
    if n < batch_size:  # one compiled shape for every chunk
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], np.float32)])
    p, c = _predict(variables, chunk, model=model, modality=modality, aug_cfg=aug_cfg)
    pts.append(np.asarray(p)[:n])
    conf.append(np.asarray(c)[:n])
  return np.concatenate(pts), np.concatenate(conf)


def detection_metrics(pred, conf, truth, visible, image_size, *, threshold, radius):
  """Held-out figures of one modality (numpy).

  mre_px / mre_percent: mean radial error over truly visible landmarks, in pixels at `image_size`
  and in % of the image side; detection_rate: fraction of truly visible landmarks predicted visible
  (confidence > threshold) within `radius` (fraction of the side); false_detection_rate: fraction
  of truly invisible landmarks predicted visible.
  """
  err = np.linalg.norm(pred - truth, axis=-1)  # normalised units
  vis = visible.astype(bool)
  called = conf > threshold
  n_vis, n_invis = int(vis.sum()), int((~vis).sum())
  per_landmark = {
    lm.LANDMARKS[k]: round(float(err[:, k][vis[:, k]].mean() * image_size), 3)
    for k in range(vis.shape[1])
    if vis[:, k].any()
  }
  return {
    'images': int(len(pred)),
    'visible_landmarks': n_vis,
    'mre_px': float(err[vis].mean() * image_size) if n_vis else None,
    'mre_percent': float(err[vis].mean() * 100) if n_vis else None,
    'p90_error_px': float(np.percentile(err[vis], 90) * image_size) if n_vis else None,
    'detection_rate': float((called & vis & (err <= radius)).sum() / max(n_vis, 1)),
    'false_detection_rate': float((called & ~vis).sum() / max(n_invis, 1)),
    'mre_px_per_landmark': per_landmark,
  }


def canonical_atlas(train_arrays):
  """Mean canonical (y, x) of every landmark over the annotated split's arrays (one
  `load_split_arrays` dict per modality), or (0, 0) where never seen.

  `annotate_landmarks` gives a detected landmark this position when its record has no canonical
  coordinate of its own (real images: nothing maps them to the canonical frame yet), so
  cross-modal pairing still compares the landmark sets that two images show.
  """
  total = np.zeros((len(lm.LANDMARKS), 2))
  count = np.zeros((len(lm.LANDMARKS),))
  for arrays in train_arrays:
    can = arrays['landmarks_canonical']
    # (0, 0) marks an unknown canonical position (real CT/MRI annotations), not a position.
    known = arrays['landmark_visible'] & (can != 0).any(-1)
    total += (can * known[..., None]).sum(0)
    count += known.sum(0)
  return (total / np.maximum(count, 1)[:, None]).round(6).tolist()


def load_detector(workdir: str):
  """(config, model, variables, atlas) of a trained detector workdir, for inference.

  The parameters and BN statistics of the last checkpoint, on the host (`restore`); the
  canonical atlas from `detector.json`, written when training finished.
  """
  path = os.path.join(workdir, DETECTOR_FILE)
  if not os.path.exists(path):
    raise ValueError(
      f'--checkpoint={workdir}: no {DETECTOR_FILE}; train a detector there with '
      '`python -m aacp_jax.main --config=configs/landmarks.py --workdir=...`'
    )
  with open(path, encoding='utf-8') as f:
    info = json.load(f)
  try:
    restored = restore.load_variables(workdir)
  except ValueError as e:
    raise ValueError(f'--checkpoint={workdir}: {e}') from None
  return (
    restored.config,
    restored.model,
    restored.variables,
    np.asarray(info['canonical_atlas'], np.float32),
  )
