"""The landmark detector: a small U-Net heatmap network per modality, trained once, then frozen.

Its landmarks are the reference of the spatial-consistency loss and the input of cross-modal
pseudo-pairing (paper 3.2.1), so it is a separate, simple and well-measured model rather than a head
of the encoder being pretrained: a reference that moved with the encoder could collapse with it.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacp_jax import precision
from aacp_jax.models.heads import spatial_soft_argmax
from aacp_jax.models.layers import batch_norm, compute_dtype, param_dtype


class _ConvBN(nn.Module):
  features: int
  dtype: Any = jnp.float32
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(
      self.features,
      (3, 3),
      strides=self.strides,
      padding='SAME',
      use_bias=False,
      dtype=self.dtype,
      param_dtype=param_dtype(self.dtype),
    )(x)
    x = batch_norm(train, self.dtype)(x)
    return nn.relu(x)


class HeatmapNet(nn.Module):
  """U-Net: `levels` 2x downsamplings (two 3x3 conv-BN-ReLU per level, widths width * 2**i; a
  stride-2 stem conv instead of the full-resolution level when the output is coarser),
  then upsampling with skip connections back to stride `2**output_level`.

  `__call__(x (B, H, W, C), train)` -> dict:
    'heatmaps'      (B, H / 2**output_level, W / 2**output_level, K) float32 logits,
    'landmarks'     (B, K, 2) float32 normalised (y, x): soft-argmax of the heatmaps (sub-pixel),
    'visible_logit' (B, K) float32: whether each landmark is in the field of view, from the
                    pooled bottleneck (visibility is a whole-image property: which region, which slab).
  H and W must be divisible by 2**levels.
  """

  num_landmarks: int
  width: int = 16
  levels: int = 3
  output_level: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if not 0 <= self.output_level <= self.levels:
      raise ValueError(f'output_level={self.output_level} must lie in [0, levels={self.levels}]')
    factor = 2**self.levels
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
        f'detector input {x.shape[1]}x{x.shape[2]} is not divisible by 2**levels = {factor}'
      )
    x = x.astype(self.dtype)
    skips = []
    for i in range(self.levels + 1):
      if i == 0 and self.output_level > 0:
        # No skip is read at full resolution, where the compute is largest (a CT slab has
        # 64 channels): a stride-2 stem replaces that level.
        x = _ConvBN(self.width, self.dtype, strides=2, name='stem')(x, train)
        skips.append(None)
        continue
      x = _ConvBN(self.width * 2**i, self.dtype, name=f'down{i}a')(x, train)
      x = _ConvBN(self.width * 2**i, self.dtype, name=f'down{i}b')(x, train)
      if i < self.levels:
        skips.append(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    pooled = jnp.mean(precision.upcast(x), axis=(1, 2))
    visible_logit = nn.Dense(
      self.num_landmarks, param_dtype=param_dtype(self.dtype), name='visible'
    )(pooled)
    for i in reversed(range(self.output_level, self.levels)):
      b, h, w, c = x.shape
      # Nearest-neighbour 2x upsampling, then the skip: cheap and exact in shape.
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = jnp.concatenate([x, skips[i]], axis=-1)
      x = _ConvBN(self.width * 2**i, self.dtype, name=f'up{i}')(x, train)
    heatmaps = precision.upcast(
      nn.Conv(
        self.num_landmarks,
        (1, 1),
        dtype=self.dtype,
        param_dtype=param_dtype(self.dtype),
        name='heatmap',
      )(x)
    )
    return {
      'heatmaps': heatmaps,
      'landmarks': spatial_soft_argmax(heatmaps),
      'visible_logit': precision.upcast(visible_logit),
    }


class LandmarkDetector(nn.Module):
  """One `HeatmapNet` per modality (`net_<modality>`): the input channels and the anatomy differ.

  `__call__(images: {modality: (B, H, W, C) float32 normalised}, train)` -> {modality: HeatmapNet
  output} for the modalities present (init with all of them).
  """

  modalities: Sequence[str]
  num_landmarks: int
  width: int = 16
  levels: int = 3
  output_level: int = 1
  dtype: Any = jnp.float32

  def setup(self):
    self.nets = {
      m: HeatmapNet(
        self.num_landmarks, self.width, self.levels, self.output_level, self.dtype, name=f'net_{m}'
      )
      for m in self.modalities
    }

  def __call__(self, images, train: bool = False):
    unknown = set(images) - set(self.modalities)
    if unknown:
      raise ValueError(
        f'detector has no net for {sorted(unknown)}; it was built for {list(self.modalities)}'
      )
    return {m: self.nets[m](x, train) for m, x in images.items()}


def build_detector(model_cfg, modalities, num_landmarks: int) -> LandmarkDetector:
  return LandmarkDetector(
    tuple(modalities),
    num_landmarks,
    width=int(model_cfg.width),
    levels=int(model_cfg.levels),
    output_level=int(model_cfg.output_level),
    dtype=compute_dtype(model_cfg.dtype),
  )


def heatmap_targets(landmarks: jax.Array, height: int, width: int, sigma: float) -> jax.Array:
  """(B, K, 2) normalised (y, x) -> (B, height, width, K) Gaussian probability maps (each sums to 1).

  p(i, j) ∝ exp(-((y_i - y)² + (x_j - x)²) / (2 σ²)) at pixel centres y_i = (i + 0.5) / height,
  with σ in output pixels; the target distribution of the heatmap cross-entropy.
  """
  landmarks = precision.upcast(landmarks)
  ys = (jnp.arange(height, dtype=landmarks.dtype) + 0.5) / height
  xs = (jnp.arange(width, dtype=landmarks.dtype) + 0.5) / width
  dy = (ys[None, :, None] - landmarks[:, None, :, 0]) * height  # (B, H, K) in output pixels
  dx = (xs[None, :, None] - landmarks[:, None, :, 1]) * width  # (B, W, K)
  logits = -(dy[:, :, None, :] ** 2 + dx[:, None, :, :] ** 2) / (2.0 * sigma**2)
  b, h, w, k = logits.shape
  return jax.nn.softmax(logits.reshape(b, h * w, k), axis=1).reshape(b, h, w, k)
