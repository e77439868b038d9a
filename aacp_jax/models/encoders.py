"""The pre-training model: one ResNet per modality, one shared projector, optional heads
(landmarks, feature pyramid with per-level projections, ROI attention)."""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacp_jax.models.fpn import FPN, LevelHeads
from aacp_jax.models.heads import LandmarkHead, Projector
from aacp_jax.models.layers import DTYPES, compute_dtype  # noqa: F401  (DTYPES re-exported)
from aacp_jax.models.resnet import ResNet, check_depth
from aacp_jax.models.roi import ROIAttention, attention_pool, resize_map


class AACPModel(nn.Module):
  """Per-modality ResNet encoders (`encoder_<m>`) and ONE shared `projector`.

  Attributes:
    modalities: e.g. ('ct', 'mri', 'xray'); each gets its own backbone.
    depth, width: ResNet depth and base width (64 = torchvision).
    projector: projector layer widths; the last one is the embedding size d.
    dtype: compute dtype; params, `features` and `z` are float32 regardless (float64 for
      float64 compute, as every "float32" below).
    in_channels: optional {modality: channels} check (CT 64, MRI 3, X-ray 1); the channel count
      is always taken from the input, so this only turns a silent re-init into an error.
    zero_init_residual: passed to every ResNet.
    landmark_head: add one `LandmarkHead` per modality (`landmarks_<m>`) on the stride-8 stage
      `c3`; the output dicts then also hold 'landmarks' (B_m, K, 2) float32 normalised (y, x).
    num_landmarks: K, the landmark vocabulary size (`aacp_jax.data.landmarks.LANDMARKS`, which
      the caller passes: models do not depend on the data package); needed by landmark_head.
    fpn: add a feature pyramid per modality (`fpn_<m>`, levels p2..p5 at strides 4..32 with
      `fpn_channels`) and per-level projections (`levels_<m>`, GAP + `level_projector` MLP);
      the output dicts then hold 'levels' {'p2'..'p5': (B_m, level_projector[-1]) unit norm}.
    roi_attention: add an `ROIAttention` head per modality (`roi_<m>`) on the stride-16 stage
      `c4`; its sigmoid map, resampled to c5's grid, replaces global average pooling of c5, so
      'features' (and therefore 'z') are attention-pooled; the output holds 'attention'
      (B_m, H/16, W/16) float32. `attention_maps` upsamples it to the input for plots.

  `__call__(images, train)` with images {m: (B_m, H, W, C_m)} for any subset of `modalities`
  -> {m: {'features': (B_m, F) float32 pooled backbone features, 'z': (B_m, d) float32, unit norm}}
  (plus 'landmarks', 'levels', 'attention' when the heads are on).
  Initialise with every modality present so that every encoder gets parameters.
  """

  modalities: Sequence[str] = ('ct', 'mri', 'xray')
  depth: int = 50
  width: int = 64
  projector: Sequence[int] = (2048, 2048, 512)
  dtype: Any = jnp.float32
  in_channels: Mapping[str, int] | None = None
  zero_init_residual: bool = False
  landmark_head: bool = False
  num_landmarks: int | None = None
  fpn: bool = False
  fpn_channels: Sequence[int] = (64, 128, 256, 512)
  level_projector: Sequence[int] = (256, 128)
  roi_attention: bool = False
  roi_features: int = 64

  def setup(self):
    if len(set(self.modalities)) != len(self.modalities) or not all(
      m.isidentifier() for m in self.modalities
    ):
      raise ValueError(f'modalities must be unique identifiers, got {self.modalities}')
    for m in self.modalities:
      channels = None if self.in_channels is None else self.in_channels.get(m)
      # setattr inside setup registers the submodule under exactly this name, so parameters
      # live at params['encoder_ct'] etc. (what convert.py and checkpoints address).
      setattr(
        self,
        f'encoder_{m}',
        ResNet(
          depth=self.depth,
          width=self.width,
          num_classes=None,
          in_channels=channels,
          dtype=self.dtype,
          zero_init_residual=self.zero_init_residual,
        ),
      )
      if self.landmark_head:
        if not self.num_landmarks:
          raise ValueError(
            'landmark_head needs num_landmarks (the landmark vocabulary '
            'size, len(aacp_jax.data.landmarks.LANDMARKS))'
          )
        setattr(
          self, f'landmarks_{m}', LandmarkHead(num_landmarks=self.num_landmarks, dtype=self.dtype)
        )
      if self.fpn:
        setattr(self, f'fpn_{m}', FPN(channels=tuple(self.fpn_channels), dtype=self.dtype))
        setattr(
          self, f'levels_{m}', LevelHeads(features=tuple(self.level_projector), dtype=self.dtype)
        )
      if self.roi_attention:
        setattr(self, f'roi_{m}', ROIAttention(features=self.roi_features, dtype=self.dtype))
    self.head = Projector(features=tuple(self.projector), dtype=self.dtype, name='projector')

  def _encoder(self, modality: str) -> ResNet:
    if modality not in self.modalities:
      raise ValueError(f'unknown modality {modality!r}; model has {tuple(self.modalities)}')
    return getattr(self, f'encoder_{modality}')

  def _features(self, x: jax.Array, modality: str, train: bool):
    """(stages, pooled features, attention map or None) for one modality."""
    stages = self._encoder(modality)(x, train)
    if not self.roi_attention:
      return stages, stages['pooled'], None
    attention = getattr(self, f'roi_{modality}')(stages['c4'], train)
    return stages, attention_pool(stages['c5'], attention), attention

  def __call__(self, images: Mapping[str, jax.Array], train: bool):
    present = [m for m in self.modalities if m in images]
    unknown = sorted(set(images) - set(self.modalities))
    if unknown or not present:
      raise ValueError(
        f'images keys {sorted(images)} must be a non-empty subset of {tuple(self.modalities)}'
      )
    parts = {m: self._features(images[m], m, train) for m in present}
    stages = {m: parts[m][0] for m in present}
    feats = {m: parts[m][1] for m in present}
    # One projector pass over all modalities concatenated: the projector's BatchNorm then sees
    # the same mixed population in training as its running averages describe at eval time.
    # Projecting each modality separately would normalise per modality in training but update
    # one shared set of running stats with a blend of all, a train/eval mismatch.
    z = self.head(jnp.concatenate([feats[m] for m in present], axis=0), train)
    zs = jnp.split(z, list(itertools.accumulate(feats[m].shape[0] for m in present))[:-1])
    out = {m: {'features': feats[m], 'z': zm} for m, zm in zip(present, zs)}
    if self.landmark_head:
      for m in present:
        out[m]['landmarks'] = getattr(self, f'landmarks_{m}')(stages[m]['c3'], train)
    if self.fpn:
      for m in present:
        levels = getattr(self, f'fpn_{m}')(stages[m], train)
        out[m]['levels'] = getattr(self, f'levels_{m}')(levels, train)
    if self.roi_attention:
      for m in present:
        out[m]['attention'] = parts[m][2]
    return out

  def embed(self, x: jax.Array, modality: str, train: bool = False):
    """One modality alone -> {'features', 'z'}; for evaluation, probes and retrieval.

    Usage: `model.apply(variables, x, 'ct', method=AACPModel.embed)`.
    """
    _, features, _ = self._features(x, modality, train)
    return {'features': features, 'z': self.head(features, train)}

  def attention_maps(self, x: jax.Array, modality: str):
    """ROI attention maps (B, H, W) float32 in (0, 1) at the input's resolution, for plotting
    over the image (bilinear upsampling of the stride-16 map). Needs `roi_attention`.

    Usage: `model.apply(variables, x, 'ct', method=AACPModel.attention_maps)`.
    """
    if not self.roi_attention:
      raise ValueError(
        'attention_maps needs a model built with roi_attention=True (config.model.roi_attention)'
      )
    _, _, attention = self._features(x, modality, False)
    return resize_map(attention, x.shape[1], x.shape[2])

  def pyramid(self, x: jax.Array, modality: str, train: bool = False):
    """The modality's FPN levels {'p2'..'p5'} (B, H/s, W/s, C_l). Needs `fpn`."""
    if not self.fpn:
      raise ValueError('pyramid needs a model built with fpn=True (config.model.fpn)')
    return getattr(self, f'fpn_{modality}')(self._encoder(modality)(x, train), train)

  def backbone(self, x: jax.Array, modality: str, train: bool = False):
    """The modality's full ResNet output ('c2'..'c5', 'pooled') for dense/landmark heads."""
    return self._encoder(modality)(x, train)

  @property
  def num_features(self) -> int:
    """Channels of `features` (2048 for ResNet-50 at width 64)."""
    return ResNet(depth=self.depth, width=self.width).num_features


def build_model(
  config: Mapping[str, Any], modalities=None, num_landmarks: int | None = None
) -> AACPModel:
  """AACPModel from a config block (dict or ConfigDict) with keys depth, width, projector,
  dtype ('float32' | 'bfloat16' | 'float64'), modalities; optional in_channels,
  zero_init_residual, landmark_head, fpn, fpn_channels, level_projector, roi_attention,
  roi_features (heads off by default).
  `modalities` (the experiment's enabled set) overrides the block's own key. `num_landmarks`
  (len(aacp_jax.data.landmarks.LANDMARKS)) is required when landmark_head is on."""

  def get(key, default=None):
    return config[key] if key in config else default

  dtype = compute_dtype(get('dtype', 'float32'))
  depth = check_depth(int(get('depth', 50)), 'model.depth')
  landmark_head = bool(get('landmark_head', False))
  if landmark_head and not num_landmarks:
    raise ValueError(
      'model.landmark_head=True: build_model needs num_landmarks '
      '(len(aacp_jax.data.landmarks.LANDMARKS))'
    )
  in_channels = get('in_channels')
  return AACPModel(
    modalities=tuple(modalities or get('modalities', ('ct', 'mri', 'xray'))),
    depth=depth,
    width=int(get('width', 64)),
    projector=tuple(int(f) for f in get('projector', (2048, 2048, 512))),
    dtype=dtype,
    in_channels=None if in_channels is None else {k: int(v) for k, v in dict(in_channels).items()},
    zero_init_residual=bool(get('zero_init_residual', False)),
    landmark_head=landmark_head,
    num_landmarks=num_landmarks,
    fpn=bool(get('fpn', False)),
    fpn_channels=tuple(int(c) for c in get('fpn_channels', (64, 128, 256, 512))),
    level_projector=tuple(int(f) for f in get('level_projector', (256, 128))),
    roi_attention=bool(get('roi_attention', False)),
    roi_features=int(get('roi_features', 64)),
  )
