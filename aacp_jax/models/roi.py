"""ROI attention (paper 3.4.1): a light conv head scoring each location, and attention pooling."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacp_jax import precision
from aacp_jax.models.layers import batch_norm, param_dtype

# Floor on the attention mass: a map that is ~0 everywhere still pools to a finite vector.
MASS_EPS = 1e-6


class ROIAttention(nn.Module):
  """3x3 conv (no bias) -> BN -> ReLU -> 1x1 conv -> sigmoid: (B, H, W, C) -> (B, H, W) in (0, 1).

  Sigmoid (not a softmax over positions) so each location gets an independent "clinically
  relevant" score, as the paper's segmentation-style description; the pooling normalises.
  The map is float32 whatever the compute dtype (float64 for float64 compute).
  """

  features: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(
      self.features,
      (3, 3),
      padding='SAME',
      use_bias=False,
      dtype=self.dtype,
      param_dtype=param_dtype(self.dtype),
      name='conv',
    )(x.astype(self.dtype))
    x = batch_norm(train, self.dtype, 'bn')(x)
    x = nn.Conv(1, (1, 1), dtype=self.dtype, param_dtype=param_dtype(self.dtype), name='score')(
      nn.relu(x)
    )
    return jax.nn.sigmoid(precision.upcast(x[..., 0]))


def resize_map(attention: jax.Array, height: int, width: int) -> jax.Array:
  """(B, h, w) -> (B, height, width) by bilinear resampling (antialiased when shrinking)."""
  b = attention.shape[0]
  return jax.image.resize(precision.upcast(attention), (b, height, width), method='linear')


def attention_pool(feature_map: jax.Array, attention: jax.Array) -> jax.Array:
  """Attention-weighted mean of a (B, H, W, C) map with a (B, h, w) map -> (B, C) float32.

    f_b = sum_{y,x} a_byx F_byx / (sum_{y,x} a_byx + eps)

  The attention map is brought to the feature map's grid first: c4's map on c5 is 2x finer, and
  each c5 cell gets the mean score of the c4 cells it covers (bilinear when not a multiple).
  A uniform map gives global average pooling (up to eps), which is about where a fresh head
  starts (sigmoid of small scores ~ 0.5 everywhere).
  """
  _, h, w, _ = feature_map.shape
  a = _to_grid(precision.upcast(attention), h, w)
  f = jnp.einsum('bhw,bhwc->bc', a, precision.upcast(feature_map))
  return f / (jnp.sum(a, axis=(1, 2))[:, None] + MASS_EPS)


def _to_grid(attention: jax.Array, height: int, width: int) -> jax.Array:
  b, h, w = attention.shape
  if h % height == 0 and w % width == 0:
    return attention.reshape(b, height, h // height, width, w // width).mean(axis=(2, 4))
  return resize_map(attention, height, width)
