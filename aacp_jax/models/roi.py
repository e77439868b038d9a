"""ROI attention (paper 3.4.1): a light conv head scoring each location, and attention pooling."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Floor on the attention mass: a map that is ~0 everywhere still pools to a finite vector.
MASS_EPS = 1e-6


class ROIAttention(nn.Module):
    """3x3 conv (no bias) -> BN -> ReLU -> 1x1 conv -> sigmoid: (B, H, W, C) -> (B, H, W) in (0, 1).

    Sigmoid (not a softmax over positions) so each location gets an independent "clinically
    relevant" score, as the paper's segmentation-style description; the pooling normalises.
    The map is float32 whatever the compute dtype.
    """

    features: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                    param_dtype=jnp.float32, name="conv")(x.astype(self.dtype))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, param_dtype=jnp.float32, use_fast_variance=False,
                         name="bn")(x)
        x = nn.Conv(1, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                    name="score")(nn.relu(x))
        return jax.nn.sigmoid(x[..., 0].astype(jnp.float32))


def resize_map(attention: jax.Array, height: int, width: int) -> jax.Array:
    """(B, h, w) -> (B, height, width) by bilinear resampling (antialiased when shrinking)."""
    b = attention.shape[0]
    return jax.image.resize(attention.astype(jnp.float32), (b, height, width), method="linear")


def attention_pool(feature_map: jax.Array, attention: jax.Array) -> jax.Array:
    """Attention-weighted mean of a (B, H, W, C) map with a (B, h, w) map -> (B, C) float32.

      f_b = sum_{y,x} a_byx F_byx / (sum_{y,x} a_byx + eps)

    The attention map is brought to the feature map's grid first: c4's map on c5 is 2x finer, and
    each c5 cell gets the mean score of the c4 cells it covers (bilinear when not a multiple).
    A uniform map gives global average pooling (up to eps), which is about where a fresh head
    starts (sigmoid of small scores ~ 0.5 everywhere).
    """
    _, h, w, _ = feature_map.shape
    a = _to_grid(attention.astype(jnp.float32), h, w)
    f = jnp.einsum("bhw,bhwc->bc", a, feature_map.astype(jnp.float32))
    return f / (jnp.sum(a, axis=(1, 2))[:, None] + MASS_EPS)


def _to_grid(attention: jax.Array, height: int, width: int) -> jax.Array:
    b, h, w = attention.shape
    if h % height == 0 and w % width == 0:
        return attention.reshape(b, height, h // height, width, w // width).mean(axis=(2, 4))
    return resize_map(attention, height, width)
