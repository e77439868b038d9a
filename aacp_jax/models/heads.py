"""The projection head on pooled backbone features, and the landmark head on a stage map."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacp_jax import precision
from aacp_jax.models.layers import batch_norm, param_dtype

# Floor on the norm in `l2_normalize`: a zero vector maps to zero instead of NaN (and its gradient
# stays finite), which matters for padded or dead rows in a global batch.
NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
  """x / max(||x||, eps) in float32 (float64 for float64 x)."""
  x = precision.upcast(x)
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


class Projector(nn.Module):
  """SimCLR-style MLP: [Dense -> BN -> ReLU] for every hidden width, then a final Dense.

  With the default features=(2048, 2048, 512): Dense(2048)-BN-ReLU-Dense(2048)-BN-ReLU-Dense(512).
  Hidden Dense layers have no bias because the BN that follows cancels it (as SimCLR). BatchNorm
  reduces over the batch axis of the global array, so statistics are global-batch under jit.

  `__call__(x, train)` -> (B, features[-1]) float32, unit L2 norm.
  """

  features: Sequence[int] = (2048, 2048, 512)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if len(self.features) < 1:
      raise ValueError('Projector needs at least one layer width')
    x = x.astype(self.dtype)
    for i, f in enumerate(self.features[:-1]):
      x = nn.Dense(
        f, use_bias=False, dtype=self.dtype, param_dtype=param_dtype(self.dtype), name=f'dense{i}'
      )(x)
      x = batch_norm(train, self.dtype, f'bn{i}')(x)
      x = nn.relu(x)
    x = nn.Dense(
      self.features[-1],
      dtype=self.dtype,
      param_dtype=param_dtype(self.dtype),
      name=f'dense{len(self.features) - 1}',
    )(x)
    return l2_normalize(x)


def spatial_soft_argmax(heatmaps: jax.Array) -> jax.Array:
  """(B, H, W, K) logits -> (B, K, 2) float32 expected normalised (y, x) in [0, 1].

  Softmax over the H*W positions of each landmark's map (float32; float64 for float64 maps),
  then the expectation of the pixel-centre coordinates ((i + 0.5) / H, (j + 0.5) / W), matching
  the records' edge-to-edge normalisation (pixel i of S covers [i/S, (i+1)/S)).
  """
  b, h, w, k = heatmaps.shape
  logits = precision.upcast(heatmaps).reshape(b, h * w, k)
  prob = jax.nn.softmax(logits, axis=1).reshape(b, h, w, k)
  ys = (jnp.arange(h, dtype=logits.dtype) + 0.5) / h
  xs = (jnp.arange(w, dtype=logits.dtype) + 0.5) / w
  y = jnp.einsum('bhwk,h->bk', prob, ys)
  x = jnp.einsum('bhwk,w->bk', prob, xs)
  return jnp.stack([y, x], axis=-1)


class LandmarkHead(nn.Module):
  """Light landmark head on a stride-8 feature map (ResNet `c3`).

  3x3 conv (no bias) -> BN -> ReLU -> 1x1 conv to `num_landmarks` heatmaps -> spatial
  soft-argmax. `__call__(x (B, H, W, C), train)` -> (B, K, 2) float32 normalised (y, x).
  """

  num_landmarks: int
  features: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.astype(self.dtype)
    x = nn.Conv(
      self.features,
      (3, 3),
      padding='SAME',
      use_bias=False,
      dtype=self.dtype,
      param_dtype=param_dtype(self.dtype),
      name='conv',
    )(x)
    x = batch_norm(train, self.dtype, 'bn')(x)
    x = nn.relu(x)
    x = nn.Conv(
      self.num_landmarks,
      (1, 1),
      dtype=self.dtype,
      param_dtype=param_dtype(self.dtype),
      name='heatmap',
    )(x)
    return spatial_soft_argmax(x)
