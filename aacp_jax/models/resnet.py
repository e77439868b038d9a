"""ResNet v1.5 in Flax linen, topology and initialisation identical to torchvision.

Identical topology (stride on the bottleneck's 3x3 conv, explicit symmetric padding, 1x1 conv + BN
downsample only when the shape changes) is what lets torchvision ImageNet weights import 1:1 via
`aacp_jax.models.convert`; submodule names mirror torchvision's state-dict keys for the same reason
(`layer1.0.conv1` -> `layer1_0/conv1`, `layer1.0.downsample.0` -> `layer1_0/downsample_conv`).

Inputs are NHWC; the input channel count is taken from the input (CT 64, MRI 3, X-ray 1).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacp_jax import precision
from aacp_jax.models.layers import batch_norm, param_dtype

# torchvision: nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu") -> N(0, 2 / fan_out),
# untruncated. Flax's fan_out for an (h, w, in, out) kernel is h * w * out, as in torch.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# (block type, blocks per stage) as torchvision.models.resnet{18,34,50,101,152}.
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
  18: ('basic', (2, 2, 2, 2)),
  34: ('basic', (3, 4, 6, 3)),
  50: ('bottleneck', (3, 4, 6, 3)),
  101: ('bottleneck', (3, 4, 23, 3)),
  152: ('bottleneck', (3, 8, 36, 3)),
}
EXPANSION = {'basic': 1, 'bottleneck': 4}


def check_depth(depth, key: str = 'config.model.depth') -> int:
  """depth as an int, or a one-line error naming `key` when it is not one of DEPTHS."""
  if depth not in DEPTHS:
    raise ValueError(f'{key}={depth}: expected one of {sorted(DEPTHS)}')
  return int(depth)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: 3x3 (stride) -> 3x3, identity or 1x1-conv shortcut."""

  planes: int
  stride: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.relu(_conv_bn(self, x, train, self.planes, 3, self.stride, 'conv1', 'bn1'))
    y = _conv_bn(self, y, train, self.planes, 3, 1, 'conv2', 'bn2', self.zero_init_residual)
    return nn.relu(y + _shortcut(self, x, train, self.planes))


class Bottleneck(nn.Module):
  """torchvision v1.5 Bottleneck: 1x1 -> 3x3 (stride here, unlike v1) -> 1x1 (x4 channels)."""

  planes: int
  stride: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.relu(_conv_bn(self, x, train, self.planes, 1, 1, 'conv1', 'bn1'))
    y = nn.relu(_conv_bn(self, y, train, self.planes, 3, self.stride, 'conv2', 'bn2'))
    y = _conv_bn(self, y, train, self.planes * 4, 1, 1, 'conv3', 'bn3', self.zero_init_residual)
    return nn.relu(y + _shortcut(self, x, train, self.planes * 4))


def _conv_bn(mod: nn.Module, x, train, features, kernel, stride, conv_name, bn_name, zero=False):
  """Conv + BN created inline in `mod` (so params sit at mod/conv_name, mod/bn_name as in torch)."""
  pad = (
    kernel // 2
  )  # torch pads k // 2 on both sides; flax "SAME" would pad asymmetrically at stride 2
  x = nn.Conv(
    features,
    (kernel, kernel),
    (stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=conv_init,
    dtype=mod.dtype,
    param_dtype=param_dtype(mod.dtype),
    name=conv_name,
  )(x)
  return batch_norm(train, mod.dtype, bn_name, zero_scale=zero)(x)


def _shortcut(mod: nn.Module, x, train, out_features):
  if mod.stride == 1 and x.shape[-1] == out_features:
    return x
  return _conv_bn(mod, x, train, out_features, 1, mod.stride, 'downsample_conv', 'downsample_bn')


class ResNet(nn.Module):
  """torchvision ResNet v1.5 (depth 18/34/50/101/152) returning multi-scale stage outputs.

  Attributes:
    depth: one of DEPTHS.
    width: stem channels (64 = torchvision); every stage scales with it (tests use 8 or 16).
    num_classes: adds a linear `fc` head on `pooled` (torchvision init) when set.
    in_channels: optional check only; the channel count is always taken from the input.
    dtype: compute dtype (float32, bfloat16 or float64). Params, `pooled` and `logits` are
      float32 (float64 for float64 compute).
    zero_init_residual: zero the last BN scale of every block (torchvision option, default off).

  `__call__(x, train)` -> {'c2','c3','c4','c5': stage maps at strides 4/8/16/32 (dtype),
  'pooled': (B, F) float32 global average of c5, 'logits': (B, num_classes) float32 if set}
  (float64 instead of float32 for float64 compute).
  """

  depth: int = 50
  width: int = 64
  num_classes: int | None = None
  in_channels: int | None = None
  dtype: Any = jnp.float32
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    check_depth(self.depth, 'ResNet depth')
    if x.ndim != 4:
      raise ValueError(f'ResNet expects NHWC input, got shape {x.shape}')
    if self.in_channels is not None and x.shape[-1] != self.in_channels:
      raise ValueError(f'ResNet built for {self.in_channels} channels, got input {x.shape}')
    kind, blocks = DEPTHS[self.depth]
    block_cls = BasicBlock if kind == 'basic' else Bottleneck

    x = x.astype(self.dtype)
    x = nn.Conv(
      self.width,
      (7, 7),
      (2, 2),
      padding=((3, 3), (3, 3)),
      use_bias=False,
      kernel_init=conv_init,
      dtype=self.dtype,
      param_dtype=param_dtype(self.dtype),
      name='conv1',
    )(x)
    x = nn.relu(batch_norm(train, self.dtype, 'bn1')(x))
    # flax pads max_pool with -inf, as torch's MaxPool2d(3, 2, padding=1) does.
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))

    out = {}
    for stage, n in enumerate(blocks):
      for b in range(n):
        stride = 2 if (stage > 0 and b == 0) else 1
        x = block_cls(
          self.width * 2**stage,
          stride,
          self.zero_init_residual,
          self.dtype,
          name=f'layer{stage + 1}_{b}',
        )(x, train)
      out[f'c{stage + 2}'] = x

    # Pool in float32: the mean over up to 49 x 2048 bf16 values loses precision otherwise.
    pooled = jnp.mean(precision.upcast(x), axis=(1, 2))
    out['pooled'] = pooled
    if self.num_classes is not None:
      # torch.nn.Linear's default init: U(+-1/sqrt(fan_in)) for weight and bias, so a fresh
      # head matches torchvision's statistics, not only its shapes.
      bound = 1.0 / pooled.shape[-1] ** 0.5
      out['logits'] = nn.Dense(
        self.num_classes,
        dtype=pooled.dtype,
        param_dtype=param_dtype(self.dtype),
        name='fc',
        kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform'),
        bias_init=lambda k, shape, dtype: jax.random.uniform(k, shape, dtype, -bound, bound),
      )(pooled)
    return out

  @property
  def num_features(self) -> int:
    """Channels of `pooled` (2048 for ResNet-50 at width 64)."""
    kind, _ = DEPTHS[self.depth]
    return self.width * 8 * EXPANSION[kind]
