"""The pre-training model: one ResNet per modality, one shared projector."""
from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aacp_jax.data.landmarks import LANDMARKS
from aacp_jax.models.heads import LandmarkHead, Projector
from aacp_jax.models.resnet import DEPTHS, ResNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class AACPModel(nn.Module):
    """Per-modality ResNet encoders (`encoder_<m>`) and ONE shared `projector`.

    Attributes:
      modalities: e.g. ('ct', 'mri', 'xray'); each gets its own backbone.
      depth, width: ResNet depth and base width (64 = torchvision).
      projector: projector layer widths; the last one is the embedding size d.
      dtype: compute dtype; params, `features` and `z` are float32 regardless.
      in_channels: optional {modality: channels} check (CT 64, MRI 3, X-ray 1); the channel count
        is always taken from the input, so this only turns a silent re-init into an error.
      zero_init_residual: passed to every ResNet.
      landmark_head: add one `LandmarkHead` per modality (`landmarks_<m>`) on the stride-8 stage
        `c3`; the output dicts then also hold 'landmarks' (B_m, K, 2) float32 normalised (y, x).
      num_landmarks: K, the landmark vocabulary size.

    `__call__(images, train)` with images {m: (B_m, H, W, C_m)} for any subset of `modalities`
    -> {m: {'features': (B_m, F) float32 pooled backbone features, 'z': (B_m, d) float32, unit norm}}
    (plus 'landmarks' when `landmark_head`).
    Initialise with every modality present so that every encoder gets parameters.
    """

    modalities: Sequence[str] = ("ct", "mri", "xray")
    depth: int = 50
    width: int = 64
    projector: Sequence[int] = (2048, 2048, 512)
    dtype: Any = jnp.float32
    in_channels: Mapping[str, int] | None = None
    zero_init_residual: bool = False
    landmark_head: bool = False
    num_landmarks: int = len(LANDMARKS)

    def setup(self):
        if len(set(self.modalities)) != len(self.modalities) or not all(
                m.isidentifier() for m in self.modalities):
            raise ValueError(f"modalities must be unique identifiers, got {self.modalities}")
        for m in self.modalities:
            channels = None if self.in_channels is None else self.in_channels.get(m)
            # setattr inside setup registers the submodule under exactly this name, so parameters
            # live at params['encoder_ct'] etc. (what convert.py and checkpoints address).
            setattr(self, f"encoder_{m}", ResNet(
                depth=self.depth, width=self.width, num_classes=None, in_channels=channels,
                dtype=self.dtype, zero_init_residual=self.zero_init_residual))
            if self.landmark_head:
                setattr(self, f"landmarks_{m}", LandmarkHead(
                    num_landmarks=self.num_landmarks, dtype=self.dtype))
        self.head = Projector(features=tuple(self.projector), dtype=self.dtype, name="projector")

    def _encoder(self, modality: str) -> ResNet:
        if modality not in self.modalities:
            raise ValueError(f"unknown modality {modality!r}; model has {tuple(self.modalities)}")
        return getattr(self, f"encoder_{modality}")

    def __call__(self, images: Mapping[str, jax.Array], train: bool):
        present = [m for m in self.modalities if m in images]
        unknown = sorted(set(images) - set(self.modalities))
        if unknown or not present:
            raise ValueError(f"images keys {sorted(images)} must be a non-empty subset of "
                             f"{tuple(self.modalities)}")
        stages = {m: self._encoder(m)(images[m], train) for m in present}
        feats = {m: stages[m]["pooled"] for m in present}
        # One projector pass over all modalities concatenated: the projector's BatchNorm then sees
        # the same mixed population in training as its running averages describe at eval time.
        # Projecting each modality separately would normalise per modality in training but update
        # one shared set of running stats with a blend of all, a train/eval mismatch.
        z = self.head(jnp.concatenate([feats[m] for m in present], axis=0), train)
        zs = jnp.split(z, list(itertools.accumulate(feats[m].shape[0] for m in present))[:-1])
        out = {m: {"features": feats[m], "z": zm} for m, zm in zip(present, zs)}
        if self.landmark_head:
            for m in present:
                out[m]["landmarks"] = getattr(self, f"landmarks_{m}")(stages[m]["c3"], train)
        return out

    def embed(self, x: jax.Array, modality: str, train: bool = False):
        """One modality alone -> {'features', 'z'}; for evaluation, probes and retrieval.

        Usage: `model.apply(variables, x, 'ct', method=AACPModel.embed)`.
        """
        features = self._encoder(modality)(x, train)["pooled"]
        return {"features": features, "z": self.head(features, train)}

    def backbone(self, x: jax.Array, modality: str, train: bool = False):
        """The modality's full ResNet output ('c2'..'c5', 'pooled') for dense/landmark heads."""
        return self._encoder(modality)(x, train)

    @property
    def num_features(self) -> int:
        """Channels of `features` (2048 for ResNet-50 at width 64)."""
        return ResNet(depth=self.depth, width=self.width).num_features


def build_model(config: Mapping[str, Any], modalities=None) -> AACPModel:
    """AACPModel from a config block (dict or ConfigDict) with keys depth, width, projector,
    dtype ('float32' | 'bfloat16'), modalities; optional in_channels, zero_init_residual,
    landmark_head (default False).
    `modalities` (the experiment's enabled set) overrides the block's own key."""
    def get(key, default=None):
        return config[key] if key in config else default

    dtype = get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    depth = int(get("depth", 50))
    if depth not in DEPTHS:
        raise ValueError(f"model.depth must be one of {sorted(DEPTHS)}, got {depth}")
    in_channels = get("in_channels")
    return AACPModel(
        modalities=tuple(modalities or get("modalities", ("ct", "mri", "xray"))),
        depth=depth,
        width=int(get("width", 64)),
        projector=tuple(int(f) for f in get("projector", (2048, 2048, 512))),
        dtype=DTYPES[dtype],
        in_channels=None if in_channels is None else {k: int(v) for k, v in dict(in_channels).items()},
        zero_init_residual=bool(get("zero_init_residual", False)),
        landmark_head=bool(get("landmark_head", False)),
    )
