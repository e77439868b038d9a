"""Augmentation config: every probability and range in one ConfigDict (paper 3.2.2, 3.5.3).

The paper's defaults, JAX-free (ml_collections only) so that config files can import them without
loading JAX; experiments pass them as `config.augment`, and `aacp_jax.augment` falls back to them
when called without a config (notebooks, tests).
"""

import ml_collections

from aacp_jax.modalities import CT_WINDOWS


def default_config() -> ml_collections.ConfigDict:
  """Paper settings; values without a number in the paper are marked 'ours'."""
  c = ml_collections.ConfigDict()
  # False = the `simclr` / `no_anatomy_aug` ablation: random resized crop + flip for every
  # modality, landmarks ignored for placement (still tracked so the spatial loss can run).
  c.anatomy_aware = True
  # Modalities whose views are left-right symmetric enough to flip (chest X-ray). Never CT/MRI:
  # flipping destroys laterality (paper 3.5.3).
  c.symmetric_modalities = ('xray',)

  # Spatial ops (all composed into one affine + one elastic field, resampled once).
  c.crop = dict(enabled=True, area=(0.5, 1.0), ratio=(3 / 4, 4 / 3), margin=0.05)  # ours
  c.rotation = dict(p=0.5, max_deg=15.0)
  c.translation = dict(p=0.5, max_frac=0.10)  # p ours; paper gives only "up to 10 %"
  c.scale = dict(p=0.4, range=(0.9, 1.1))  # independent per axis: anisotropic
  c.flip = dict(p=0.3)
  # Coarse control grid of `grid`x`grid` random displacements, smoothed by a Gaussian of `sigma`
  # control cells, std `alpha` (normalised image units) per control point, bilinear in between.
  # `inverse_iters` fixed-point steps move landmarks (1 = first-order inverse).
  c.elastic = dict(p=0.3, alpha=0.02, sigma=1.0, grid=5, inverse_iters=3)  # magnitudes ours
  c.simclr = dict(area=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5)  # SimCLR / torchvision

  # Intensity normalisation (the deterministic part; `preprocess` applies only this).
  c.ct_window = 'pretrain'  # a name from ct_windows, or a (low, high) pair in HU
  c.ct_windows = dict(CT_WINDOWS)
  c.ct_fill_hu = -1000.0  # air: what lies outside the field of view in raw HU
  c.xray_scale = 1.0 / 255.0
  # MRI records are already instance-normalised (records contract): passthrough.

  # Random intensity ops, in normalised units, after the spatial resample.
  c.brightness = dict(p=0.5, max_delta=0.1)  # additive, U(-d, d); magnitude ours
  c.contrast = dict(p=0.5, range=(0.8, 1.2))  # scale about the image mean; range ours
  c.noise = dict(p=0.2, std=0.03)  # additive Gaussian; std ours
  c.clip_unit = True  # clip CT / X-ray to [0, 1] after brightness/contrast (before noise)
  c.cutout = dict(p=0.25, size=0.2, fill=0.0)  # square side = size * image side; p ours
  return c
