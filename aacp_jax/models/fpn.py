"""Feature pyramid (paper 3.2.3) and the small per-level projections for multi-scale contrast."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacp_jax import precision
from aacp_jax.models.heads import Projector
from aacp_jax.models.layers import batch_norm, param_dtype

STAGES = ('c2', 'c3', 'c4', 'c5')
LEVELS = ('p2', 'p3', 'p4', 'p5')  # strides 4, 8, 16, 32 of the input


class FPN(nn.Module):
  """Top-down feature pyramid on the ResNet stages c2..c5 -> p2..p5 at strides 4/8/16/32.

  The paper gives each level its own width ({64, 128, 256, 512}), unlike the usual single-width
  FPN, so the top-down path needs a 1x1 conv to bring the coarser level to the finer level's
  width before the nearest-neighbour upsample and add:

    m5 = lat5(c5);  m_i = lat_i(c_i) + up(td_i(m_{i+1}));  p_i = relu(bn_i(smooth_i(m_i)))

  lat/td are 1x1 convs, smooth a 3x3 conv (removes the upsampling's blockiness), all without
  bias (BN follows). The BN-ReLU output is our reading of the paper's "residual blocks" per
  level: without a nonlinearity, global pooling of a linear pyramid would be a linear map of
  the pooled stages, and the per-level contrast would add nothing a linear layer could not.
  `__call__(stages, train)` -> {'p2'..'p5': (B, H/s, W/s, channels[i]) in `dtype`}.
  """

  channels: Sequence[int] = (64, 128, 256, 512)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, stages, train: bool):
    if len(self.channels) != 4:
      raise ValueError(f'FPN needs 4 level widths, got {tuple(self.channels)}')
    conv = lambda f, k, name: nn.Conv(
      f,
      (k, k),
      padding='SAME',
      use_bias=False,
      dtype=self.dtype,
      param_dtype=param_dtype(self.dtype),
      name=name,
    )
    out, merged = {}, None
    for i in reversed(range(4)):
      lvl = LEVELS[i][1:]
      x = conv(self.channels[i], 1, f'lateral{lvl}')(stages[STAGES[i]].astype(self.dtype))
      if merged is not None:
        top = conv(self.channels[i], 1, f'topdown{lvl}')(merged)
        # Resize to the lateral's exact shape: odd sizes (200: c4 13, c5 7) do not double.
        top = jax.image.resize(top, x.shape, method='nearest')
        x = x + top
      merged = x
      p = conv(self.channels[i], 3, f'smooth{lvl}')(x)
      p = batch_norm(train, self.dtype, f'bn{lvl}')(p)
      out[LEVELS[i]] = nn.relu(p)
    return {k: out[k] for k in LEVELS}


class LevelHeads(nn.Module):
  """One small projection per pyramid level: GAP -> Dense-BN-ReLU-Dense -> unit norm.

  Per-level heads (not one shared) because the levels have different widths and describe
  different scales; the contrastive loss runs on each level separately.
  `__call__(levels, train)` -> {'p2'..'p5': (B, features[-1]) float32, unit norm}.
  """

  features: Sequence[int] = (256, 128)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels, train: bool):
    out = {}
    for name in LEVELS:
      # Pool in float32 (bf16 means over large maps lose digits), as the ResNet does.
      pooled = jnp.mean(precision.upcast(levels[name]), axis=(1, 2))
      out[name] = Projector(features=tuple(self.features), dtype=self.dtype, name=f'head_{name}')(
        pooled, train
      )
    return out
