"""Vision Transformer (Dosovitskiy et al. 2021) as MAE uses it (He et al. 2022), and the MAE model.

- `ViT`: patch embedding (a p x p stride-p conv; its input channels are the input's: CT 64, MRI 3,
  X-ray 1), a class token, 2-D position embeddings (fixed sin-cos as MAE, or learned as timm's
  ViT), `depth` pre-norm blocks x + MHSA(LN(x)), x + MLP(LN(x)) (GELU, exact erf), a final
  LayerNorm. Initialisation as MAE's: xavier-uniform Linear weights (the patch conv's too, on its
  flattened kernel), zero biases, N(0, 0.02) class token. ViT-B/16 is the default.
- `random_masking` / `unshuffle`: MAE's per-sample random masking by argsort of uniform noise.
- `MAEDecoder`: MAE's light decoder (a projection, mask tokens, fixed sin-cos positions, blocks,
  a linear map to the p²C pixels of each patch).
- `MAEModel`: one ViT encoder and one decoder per modality (`encoder_<m>`, `decoder_<m>`).

Inputs are NHWC. Parameters are float32 (float64 for float64 compute) whatever the compute dtype;
softmax, LayerNorm statistics and pooled features are at least float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aacp_jax import precision
from aacp_jax.models.layers import batch_norm, compute_dtype, param_dtype

POS_EMBEDS = ('sincos', 'learned')
# torch.nn.init.xavier_uniform_ (MAE's Linear init); for the patch conv, on the kernel flattened
# to (p * p * C, width) as MAE's `w.view(w.shape[0], -1)`: fan_in = p²C, fan_out = width.
xavier = nn.initializers.xavier_uniform()
patch_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2))
token_init = nn.initializers.normal(0.02)
LN_EPS = 1e-6  # MAE's partial(nn.LayerNorm, eps=1e-6)


@dataclasses.dataclass(frozen=True)
class Spec:
  """A ViT's shape (hashable, so a module holding it can be a static jit argument).

  ViT-B/16 is the default; MAE's decoder is Spec(depth=8, width=512, heads=16, mlp_dim=2048)."""

  patch_size: int = 16
  depth: int = 12
  width: int = 768
  heads: int = 12
  mlp_dim: int = 3072
  pos_embed: str = 'sincos'


def spec_from(cfg) -> Spec:
  """Spec from a config block (dict or ConfigDict) with the fields of `Spec` (missing: default)."""
  get = lambda k, d: cfg[k] if k in cfg else d
  d = Spec()
  return Spec(
    patch_size=int(get('patch_size', d.patch_size)),
    depth=int(get('depth', d.depth)),
    width=int(get('width', d.width)),
    heads=int(get('heads', d.heads)),
    mlp_dim=int(get('mlp_dim', d.mlp_dim)),
    pos_embed=str(get('pos_embed', d.pos_embed)),
  )


def check_spec(spec: Spec, key: str) -> Spec:
  """One-line errors naming `key` (e.g. 'config.model.vit') for a ViT that cannot be built."""
  for name in ('patch_size', 'depth', 'width', 'heads', 'mlp_dim'):
    value = getattr(spec, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{key}.{name}={value!r}: must be an integer >= 1')
  if spec.width % spec.heads:
    raise ValueError(f'{key}.width={spec.width}: not divisible by {key}.heads={spec.heads}')
  if spec.width % 4:
    # Sin-cos positions: half the channels per axis, a sine and a cosine each.
    raise ValueError(f'{key}.width={spec.width}: must be a multiple of 4 (2-D sin-cos positions)')
  if spec.pos_embed not in POS_EMBEDS:
    raise ValueError(f'{key}.pos_embed={spec.pos_embed!r}: expected one of {POS_EMBEDS}')
  return spec


def sincos_2d(width: int, h: int, w: int) -> np.ndarray:
  """MAE's fixed 2-D sin-cos position embedding (get_2d_sincos_pos_embed), (h * w, width) float64.

  Half the channels encode the column x, half the row y, each as
  [sin(pos * omega_k), cos(pos * omega_k)], omega_k = 10000^(-k / (width / 4)), k < width / 4.
  Row-major over the (h, w) grid, as the patch tokens."""
  quarter = width // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)

  def one_axis(pos):
    angles = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  ys, xs = np.meshgrid(
    np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing='ij'
  )
  # MAE's order: the first half from the grid's first coordinate, which there is the column.
  return np.concatenate([one_axis(xs), one_axis(ys)], axis=1)


def patchify(x, patch_size: int):
  """(B, H, W, C) -> (B, (H/p)(W/p), p * p * C): patches row-major, each (p, p, C) flattened, the
  token order of the patch embedding (MAE's `patchify`, NHWC)."""
  b, hh, ww, c = x.shape
  p = patch_size
  x = x.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (hh // p) * (ww // p), p * p * c)


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """K = floor(N (1 - mask_ratio)) (MAE's int()), robust to the ratio's float rounding."""
  return int(math.floor(num_patches * (1.0 - mask_ratio) + 1e-9))


def random_masking(noise, mask_ratio: float):
  """MAE's per-sample random masking from uniform noise (B, N).

  shuffle = argsort(noise) per sample (a random permutation), restore = argsort(shuffle) (its
  inverse), keep = shuffle[:, :K] with K = num_kept(N, mask_ratio): the K patches of lowest
  noise, exactly N - K masked in every sample. Returns (keep (B, K), mask (B, N) float, 1 = masked,
  restore (B, N)): gathering [kept tokens; mask tokens] by `restore` puts every kept token back
  at its patch (`unshuffle`)."""
  n = noise.shape[1]
  k = num_kept(n, mask_ratio)
  if not 0 < k < n:
    raise ValueError(f'mask_ratio={mask_ratio}: keeps {k} of {n} patches; need 0 < kept < {n}')
  shuffle = jnp.argsort(noise, axis=1)
  restore = jnp.argsort(shuffle, axis=1)
  mask = jnp.concatenate([jnp.zeros((noise.shape[0], k)), jnp.ones((noise.shape[0], n - k))], 1)
  mask = jnp.take_along_axis(mask.astype(noise.dtype), restore, axis=1)
  return shuffle[:, :k], mask, restore


def unshuffle(kept, mask_token, restore):
  """kept (B, K, D) tokens in `keep` order, mask_token (D,) -> (B, N, D) in patch order: kept
  token i at patch keep[i], the mask token everywhere else."""
  b, k, d = kept.shape
  n = restore.shape[1]
  fill = jnp.broadcast_to(mask_token.astype(kept.dtype), (b, n - k, d))
  full = jnp.concatenate([kept, fill], axis=1)
  return jnp.take_along_axis(full, restore[..., None], axis=1)


def _dense(features, dtype, name):
  return nn.Dense(
    features,
    kernel_init=xavier,
    bias_init=nn.initializers.zeros,
    dtype=dtype,
    param_dtype=param_dtype(dtype),
    name=name,
  )


def _norm(dtype, name):
  # flax reduces LayerNorm statistics in float32 for bfloat16 inputs (force_float32_reductions).
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype(dtype), name=name)


class Attention(nn.Module):
  """Multi-head self-attention as timm's: one `qkv` Dense (with bias), softmax(q k^T / sqrt(d_h))
  in at least float32, one `proj` Dense."""

  width: int
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, _ = x.shape
    hd = self.width // self.heads
    qkv = _dense(3 * self.width, self.dtype, 'qkv')(x).reshape(b, n, 3, self.heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * (hd**-0.5)
    attn = jax.nn.softmax(precision.upcast(logits), axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(b, n, self.width)
    return _dense(self.width, self.dtype, 'proj')(out)


class Block(nn.Module):
  """Pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x)) with GELU (erf)."""

  width: int
  heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.width, self.heads, self.dtype, name='attn')(
      _norm(self.dtype, 'norm1')(x)
    )
    y = _dense(self.mlp_dim, self.dtype, 'fc1')(_norm(self.dtype, 'norm2')(x))
    y = _dense(self.width, self.dtype, 'fc2')(nn.gelu(y, approximate=False))
    return x + y


class ViT(nn.Module):
  """ViT encoder (see the module docstring); no classifier.

  `__call__(x (B, H, W, C), keep=None)` -> {'latent': (B, 1 + T, D) every token after the final
  norm, class token first; 'tokens': (B, T, D) the patch tokens alone; 'pooled': (B, D) their mean
  (at least float32); 'grid': (B, H/p, W/p, D) the patch tokens on their grid (without `keep`)}.
  `keep` (B, K) int: only those patches enter the blocks (MAE's visible subset), T = K; else
  T = N = (H/p)(W/p). H and W must be multiples of p; a learned position embedding fixes them
  to the init input's.
  """

  spec: Spec = Spec()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, keep=None):
    s = self.spec
    if x.ndim != 4 or x.shape[1] % s.patch_size or x.shape[2] % s.patch_size:
      raise ValueError(
        f'ViT: input {tuple(x.shape)} must be NHWC with H and W multiples of the patch size '
        f'{s.patch_size}'
      )
    h, w = x.shape[1] // s.patch_size, x.shape[2] // s.patch_size
    real = param_dtype(self.dtype)
    t = nn.Conv(
      s.width,
      (s.patch_size, s.patch_size),
      (s.patch_size, s.patch_size),
      padding='VALID',
      kernel_init=patch_init,
      dtype=self.dtype,
      param_dtype=real,
      name='patch_embed',
    )(x.astype(self.dtype))
    t = t.reshape(x.shape[0], h * w, s.width)
    if s.pos_embed == 'learned':
      pos = self.param('pos_embed', token_init, (1 + h * w, s.width), real)
      if pos.shape[0] != 1 + h * w:
        raise ValueError(f'ViT: learned positions for {pos.shape[0] - 1} patches, got {h * w}')
    else:
      # Fixed, not a parameter; the class token's position is 0 (MAE).
      pos = jnp.asarray(np.concatenate([np.zeros((1, s.width)), sincos_2d(s.width, h, w)]), real)
    t = t + pos[1:].astype(self.dtype)
    if keep is not None:
      t = jnp.take_along_axis(t, keep[..., None], axis=1)
    cls = self.param('cls_token', token_init, (s.width,), real) + pos[0]
    cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, s.width))
    z = jnp.concatenate([cls, t], axis=1)
    for i in range(s.depth):
      z = Block(s.width, s.heads, s.mlp_dim, self.dtype, name=f'block{i}')(z)
    z = _norm(self.dtype, 'norm')(z)
    tokens = z[:, 1:]
    out = {'latent': z, 'tokens': tokens, 'pooled': jnp.mean(precision.upcast(tokens), axis=1)}
    if keep is None:
      out['grid'] = tokens.reshape(x.shape[0], h, w, s.width)
    return out


class MAEDecoder(nn.Module):
  """MAE's decoder: `embed` Dense to the decoder width, a learned `mask_token` for every masked
  patch (`unshuffle`), fixed sin-cos positions (class token's 0), `spec.depth` blocks, a final
  norm, and `pred` Dense to the p²C pixels of each patch.

  `__call__(latent (B, 1 + K, D_enc), restore (B, N), grid (h, w), out_dim)` -> (B, N, out_dim)
  in patch order, the class token dropped (at least float32)."""

  spec: Spec = Spec(depth=8, width=512, heads=16, mlp_dim=2048)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latent, restore, grid, out_dim: int):
    s = self.spec
    real = param_dtype(self.dtype)
    y = _dense(s.width, self.dtype, 'embed')(latent)
    mask_token = self.param('mask_token', token_init, (s.width,), real)
    patches = unshuffle(y[:, 1:], mask_token, restore)
    pos = jnp.asarray(sincos_2d(s.width, *grid), real).astype(self.dtype)
    y = jnp.concatenate([y[:, :1], patches + pos[None]], axis=1)
    for i in range(s.depth):
      y = Block(s.width, s.heads, s.mlp_dim, self.dtype, name=f'block{i}')(y)
    y = _norm(self.dtype, 'norm')(y)
    return precision.upcast(_dense(out_dim, self.dtype, 'pred')(y[:, 1:]))


class MAEModel(nn.Module):
  """Masked autoencoders, one per modality: `encoder_<m>` (ViT) and `decoder_<m>` (MAEDecoder).

  Per-modality decoders: the encoders are per modality, so their latent spaces are unrelated and a
  shared decoder would only couple three reconstructions that have nothing to share; each decoder
  also ends in its modality's p²C pixels (CT: 64 channels).

  `__call__(images {m: (B_m, H, W, C_m)}, train, noise=None)`:
  - noise None -> {m: {'features': (B_m, D) pooled patch tokens of the whole image}} (probes,
    evaluation; `init` also builds the decoders here);
  - noise {m: (B_m, N) uniform} -> {m: {'pred': (B_m, N, p²C_m) at least float32, 'mask':
    (B_m, N) 1 = masked, 'features'}}: the encoder sees the (1 - mask_ratio) visible patches
    (`random_masking`), the decoder predicts every patch.
  `train` is accepted for the pretraining interface (nothing here depends on it: no dropout, no
  BatchNorm).
  """

  modalities: Sequence[str] = ('ct', 'mri', 'xray')
  encoder: Spec = Spec()
  decoder: Spec = Spec(depth=8, width=512, heads=16, mlp_dim=2048)
  mask_ratio: float = 0.75
  dtype: Any = jnp.float32

  def setup(self):
    for m in self.modalities:
      setattr(self, f'encoder_{m}', ViT(self.encoder, self.dtype))
      setattr(self, f'decoder_{m}', MAEDecoder(self.decoder, self.dtype))

  def _reconstruct(self, x, noise, m):
    keep, mask, restore = random_masking(noise, self.mask_ratio)
    enc = getattr(self, f'encoder_{m}')(x, keep)
    p = self.encoder.patch_size
    grid = (x.shape[1] // p, x.shape[2] // p)
    pred = getattr(self, f'decoder_{m}')(enc['latent'], restore, grid, p * p * x.shape[-1])
    return {'pred': pred, 'mask': mask, 'features': enc['pooled']}

  def __call__(self, images: Mapping[str, jax.Array], train: bool = False, noise=None):
    del train
    unknown = sorted(set(images) - set(self.modalities))
    if unknown or not images:
      raise ValueError(
        f'images keys {sorted(images)} must be a non-empty subset of {tuple(self.modalities)}'
      )
    out = {}
    for m in [m for m in self.modalities if m in images]:
      x = images[m]
      if noise is not None:
        out[m] = self._reconstruct(x, noise[m], m)
        continue
      out[m] = {'features': getattr(self, f'encoder_{m}')(x)['pooled']}
      if self.is_initializing():
        # The decoder's parameters are created here, on any noise (zeros: the identity order).
        n = (x.shape[1] // self.encoder.patch_size) * (x.shape[2] // self.encoder.patch_size)
        self._reconstruct(x, jnp.zeros((x.shape[0], n), precision.real()), m)
    return out


def build_mae(model_cfg, mae_cfg, modalities) -> MAEModel:
  """MAEModel from config.model (`dtype`, `vit` block: `spec_from`) and config.mae
  (`mask_ratio`, `decoder` block)."""
  return MAEModel(
    modalities=tuple(modalities),
    encoder=spec_from(model_cfg.vit),
    decoder=spec_from(mae_cfg.decoder),
    mask_ratio=float(mae_cfg.mask_ratio),
    dtype=compute_dtype(model_cfg.dtype),
  )


class TokenDecoder(nn.Module):
  """Segmentation decoder on the ViT's token grid (stride p): log2(p) stages of bilinear x2
  upsampling then two 3x3 conv-BN-ReLU, at `features[-log2(p):]` channels, ending at full
  resolution (SETR's progressive upsampling; no skips: a plain ViT has no finer maps).

  `__call__(grid (B, H/p, W/p, D), train)` -> (B, H, W, features[-1]) in `dtype`."""

  patch_size: int
  features: Sequence[int] = (256, 128, 64, 32)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, grid, train: bool):
    stages = int(round(math.log2(self.patch_size)))
    if 2**stages != self.patch_size or not 1 <= stages <= len(self.features):
      raise ValueError(
        f'segment head: patch size {self.patch_size} must be a power of 2 with at most '
        f'{len(self.features)} stages (decoder_features={tuple(self.features)})'
      )
    x = grid.astype(self.dtype)
    for i, f in enumerate(self.features[-stages:]):
      b, h, w, c = x.shape
      x = jax.image.resize(x, (b, 2 * h, 2 * w, c), 'bilinear')
      for j in range(2):
        x = nn.Conv(
          f,
          (3, 3),
          padding=((1, 1), (1, 1)),
          use_bias=False,  # the BN that follows cancels a bias
          kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
          dtype=self.dtype,
          param_dtype=param_dtype(self.dtype),
          name=f'stage{i}_conv{j}',
        )(x)
        x = nn.relu(batch_norm(train, self.dtype, f'stage{i}_bn{j}')(x))
    return x
