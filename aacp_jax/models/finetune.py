"""Fine-tuning models (stage two): a pretrained ResNet encoder plus a classification / regression
head on its pooled features, or a U-Net-style segmentation decoder on its stage maps.

The encoder is `resnet.ResNet` under the name `encoder`, the same module and parameter tree that
`aacp_jax.restore.encoder_variables` returns, so a pretrained encoder's variables drop in at
`variables['params']['encoder']` and `variables['batch_stats']['encoder']`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacp_jax import precision
from aacp_jax.models import resnet, vit
from aacp_jax.models.layers import batch_norm, compute_dtype, param_dtype

HEADS = ('classify', 'segment')
ARCHS = ('resnet', 'vit')
# The decoder reads c5 (stride 32); with sizes divisible by 32 every upsampled map lines up with
# its skip exactly, without crops or pads.
STRIDE = 32


def _upsample(x, factor: int):
  # Bilinear (half-pixel centres, as the records' pixel-centre convention) rather than a transposed
  # conv: no checkerboard artefacts, no parameters, and the 3x3 convs after it learn the rest.
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, h * factor, w * factor, c), 'bilinear')


class UNetDecoder(nn.Module):
  """U-Net decoder on ResNet stage maps: c5 -> stride 16, 8, 4 (skips c4, c3, c2) -> stride 2.

  Each stage: bilinear x2 upsample, concatenate the skip (if any), two 3x3 conv-BN-ReLU at
  `features[i]` channels. `__call__(stages, train)` -> (B, H/2, W/2, features[-1]) in `dtype`.
  """

  features: Sequence[int] = (256, 128, 64, 32)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, stages, train: bool):
    if len(self.features) != 4:
      raise ValueError(f'decoder_features={tuple(self.features)}: expected 4 widths')
    skips = (stages['c4'], stages['c3'], stages['c2'], None)
    x = stages['c5'].astype(self.dtype)
    for i, (f, skip) in enumerate(zip(self.features, skips)):
      x = _upsample(x, 2)
      if skip is not None:
        x = jnp.concatenate([x, skip.astype(self.dtype)], axis=-1)
      for j in range(2):
        x = nn.Conv(
          f,
          (3, 3),
          padding=((1, 1), (1, 1)),
          use_bias=False,  # the BN that follows cancels a bias
          kernel_init=resnet.conv_init,
          dtype=self.dtype,
          param_dtype=param_dtype(self.dtype),
          name=f'stage{i}_conv{j}',
        )(x)
        x = nn.relu(batch_norm(train, self.dtype, f'stage{i}_bn{j}')(x))
    return x


class FineTuneModel(nn.Module):
  """ResNet (or ViT) encoder + head for fine-tuning.

  Attributes:
    depth, width, dtype, zero_init_residual: the encoder's (`resnet.ResNet`).
    head: 'classify' (classification and regression: Dense `head` on the pooled features) or
      'segment' (`decoder` = `UNetDecoder` on c2..c5, then a 1x1 conv `head`).
    num_outputs: classes, or 1 for regression / binary with one logit.
    decoder_features: decoder widths at strides 16, 8, 4, 2 (segment only).
    arch: 'resnet' (the above) or 'vit' (`vit_spec`: a `vit.ViT` named `encoder`, as an MAE
      workdir's `restore.encoder_variables`; 'classify' reads the mean of its patch tokens,
      'segment' runs `vit.TokenDecoder` on its token grid up to full resolution, then the 1x1
      conv `head`; depth, width and zero_init_residual are then unused).

  `__call__(x (B, H, W, C), train)` -> {'logits': (B, num_outputs) or (B, H, W, num_outputs)
  float32, 'features': (B, F) float32 pooled encoder features}. The segmentation head needs H and
  W divisible by 32 (ViT: by the patch size). Params float32 whatever the compute dtype.
  """

  depth: int = 50
  width: int = 64
  dtype: Any = jnp.float32
  zero_init_residual: bool = False
  head: str = 'classify'
  num_outputs: int = 2
  decoder_features: Sequence[int] = (256, 128, 64, 32)
  arch: str = 'resnet'
  vit_spec: vit.Spec = vit.Spec()

  @nn.compact
  def __call__(self, x, train: bool) -> dict:
    if self.head not in HEADS:
      raise ValueError(f'head={self.head!r}: expected one of {HEADS}')
    if self.arch == 'vit':
      return self._vit(x, train)
    if self.head == 'segment' and (x.ndim != 4 or x.shape[1] % STRIDE or x.shape[2] % STRIDE):
      raise ValueError(
        f'segment head: input size {tuple(x.shape[1:3])} must be divisible by {STRIDE}'
      )
    out = resnet.ResNet(
      depth=self.depth,
      width=self.width,
      num_classes=None,
      dtype=self.dtype,
      zero_init_residual=self.zero_init_residual,
      name='encoder',
    )(x, train)
    features = out['pooled']
    real = param_dtype(self.dtype)  # float32 (float64 for float64 compute)
    if self.head == 'classify':
      logits = nn.Dense(self.num_outputs, dtype=real, param_dtype=real, name='head')(features)
    else:
      y = UNetDecoder(self.decoder_features, self.dtype, name='decoder')(out, train)
      # The 1x1 conv at stride 2, then the x2 upsample: both are linear, so this equals
      # upsample-then-conv (up to rounding) at a quarter of the cost. In float32 for exact logits.
      y = nn.Conv(self.num_outputs, (1, 1), dtype=real, param_dtype=real, name='head')(
        precision.upcast(y)
      )
      logits = _upsample(y, 2)
    return {'logits': precision.upcast(logits), 'features': features}

  def _vit(self, x, train: bool) -> dict:
    # A plain ViT has one map (the stride-p token grid), so the decoder upsamples it alone; a
    # pyramid from intermediate blocks (ViTDet, UNETR) would add choices without a skip finer
    # than stride p to feed it.
    out = vit.ViT(self.vit_spec, self.dtype, name='encoder')(x)
    features = out['pooled']
    real = param_dtype(self.dtype)
    if self.head == 'classify':
      logits = nn.Dense(self.num_outputs, dtype=real, param_dtype=real, name='head')(features)
    else:
      y = vit.TokenDecoder(
        self.vit_spec.patch_size, self.decoder_features, self.dtype, name='decoder'
      )(out['grid'], train)
      logits = nn.Conv(self.num_outputs, (1, 1), dtype=real, param_dtype=real, name='head')(
        precision.upcast(y)
      )
    return {'logits': precision.upcast(logits), 'features': features}


def _read(cfg, key, default=None, required=False):
  # ConfigDict and plain dicts alike.
  value = cfg.get(key, None) if hasattr(cfg, 'get') else getattr(cfg, key, None)
  if value is None:
    if required:
      raise ValueError(f'config.model.{key}: missing (needed by the fine-tuning model)')
    return default
  return value


def build_finetune_model(model_cfg, head: str, num_outputs: int) -> FineTuneModel:
  """FineTuneModel from a config block with `depth, width, dtype ('float32'|'bfloat16')` and
  optional `zero_init_residual` (False), `decoder_features` ((256, 128, 64, 32)); with
  `arch='vit'`, `dtype`, `vit` (`vit.spec_from`) and optional `decoder_features` instead."""
  if head not in HEADS:
    raise ValueError(f'head={head!r}: expected one of {HEADS}')
  arch = _read(model_cfg, 'arch', 'resnet')
  if arch not in ARCHS:
    raise ValueError(f'config.model.arch={arch!r}: expected one of {ARCHS}')
  if arch == 'vit':
    return FineTuneModel(
      dtype=compute_dtype(_read(model_cfg, 'dtype', required=True)),
      head=head,
      num_outputs=int(num_outputs),
      decoder_features=tuple(
        int(f) for f in _read(model_cfg, 'decoder_features', (256, 128, 64, 32))
      ),
      arch='vit',
      vit_spec=vit.check_spec(
        vit.spec_from(_read(model_cfg, 'vit', required=True)), 'config.model.vit'
      ),
    )
  return FineTuneModel(
    depth=resnet.check_depth(_read(model_cfg, 'depth', required=True)),
    width=int(_read(model_cfg, 'width', required=True)),
    dtype=compute_dtype(_read(model_cfg, 'dtype', required=True)),
    zero_init_residual=bool(_read(model_cfg, 'zero_init_residual', False)),
    head=head,
    num_outputs=int(num_outputs),
    decoder_features=tuple(
      int(f) for f in _read(model_cfg, 'decoder_features', (256, 128, 64, 32))
    ),
  )
