"""Evaluation input: whole splits at the training size (the augmentation's own resample), and
frozen-encoder embeddings of them in fixed-size jitted batches."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aacp_jax import augment, augment_defaults
from aacp_jax.augment import intensity
from aacp_jax.data import pipeline


@functools.partial(jax.jit, static_argnames=('model', 'modality', 'aug_cfg', 'key'))
def _embed_batch(variables, images, *, model, modality, aug_cfg, key):
  x = augment.preprocess(images.astype(jnp.float32), modality, aug_cfg)
  out = model.apply(variables, {modality: x}, train=False)
  return out[modality][key]


def embed(
  model,
  variables,
  images: np.ndarray,
  modality: str,
  aug_cfg,
  *,
  batch_size: int = 128,
  key: str = 'features',
) -> np.ndarray:
  """Backbone features ('features') or projections ('z') for `images` (N, H, W, C) raw values.

  The last batch is padded to the fixed size so the function compiles once per shape.
  """
  # FrozenConfigDict is hashable, as jit's static arguments must be.
  cfg = ml_collections.FrozenConfigDict(aug_cfg)
  fn = lambda chunk: _embed_batch(
    variables, chunk, model=model, modality=modality, aug_cfg=cfg, key=key
  )
  return in_batches(fn, images, batch_size)


def in_batches(fn, images: np.ndarray, batch_size: int) -> np.ndarray:
  """np.concatenate of fn(batch) over fixed-size batches of `images`; the last one is padded
  (and the padding's outputs dropped), so a jitted `fn` compiles once per image shape."""
  outs = []
  for start in range(0, len(images), batch_size):
    chunk = images[start : start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    outs.append(np.asarray(fn(chunk))[: batch_size - pad])
  return np.concatenate(outs)


def load_split(
  root: str,
  split: str,
  modality: str,
  image_size: int,
  *,
  aug_cfg=None,
  chunk: int = 32,
  verify: bool = True,
) -> dict[str, np.ndarray]:
  """``pipeline.load_split_arrays`` with records of other sizes resized on the device by the
  training views' resample (identity transform, same fill), so probes and the detector see what
  an un-augmented training view would show; masks by nearest neighbour (label-exact).

  Records already at ``image_size`` come back as stored. Chunks of ``chunk`` records (the last
  one padded) keep it to one compilation per split shape.
  """
  fill = intensity.fill_value(modality, aug_cfg or augment_defaults.default_config())

  def resize(images, extent, size, order):
    outs = []
    for start in range(0, len(images), chunk):
      x, e = images[start : start + chunk], extent[start : start + chunk]
      pad = chunk - len(x)
      if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        e = np.concatenate([e, np.repeat(e[-1:], pad, axis=0)])
      out = augment.resize(x, e, size, fill=fill if order == 1 else 0, order=order)
      outs.append(np.asarray(out)[: chunk - pad])
    return np.concatenate(outs)

  return pipeline.load_split_arrays(root, split, modality, image_size, verify=verify, resize=resize)
