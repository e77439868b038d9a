"""Frozen-encoder embeddings of whole arrays, in fixed-size jitted batches."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aacp_jax import augment


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
  outs = []
  for start in range(0, len(images), batch_size):
    chunk = images[start : start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out = _embed_batch(variables, chunk, model=model, modality=modality, aug_cfg=cfg, key=key)
    outs.append(np.asarray(out)[: batch_size - pad])
  return np.concatenate(outs)
