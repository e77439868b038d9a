"""On-device augmentation (paper 3.2.2, 3.5.3): pure JAX, per sample, vmapped, keyed.

Spatial ops compose into one affine + one elastic field and one bilinear resample of all channels;
landmarks move by the same transform. Then intensity normalisation, photometric ops, cutout.
"""

from aacp_jax.augment.config import CT_WINDOWS, MODALITIES, ct_window
from aacp_jax.augment.core import (
  OPS,
  apply_params,
  augment_batch,
  augment_one,
  identity_params,
  preprocess,
  resize,
  sample_params,
)

__all__ = [
  'CT_WINDOWS',
  'MODALITIES',
  'OPS',
  'apply_params',
  'augment_batch',
  'augment_one',
  'ct_window',
  'identity_params',
  'preprocess',
  'resize',
  'sample_params',
]
