"""Reading the augmentation config (its defaults: `aacp_jax/augment_defaults.py`): CT windows."""

from aacp_jax.modalities import CT_WINDOWS, MODALITIES, check_modality  # noqa: F401


def ct_window(cfg) -> tuple[float, float]:
  w = cfg.ct_window
  if isinstance(w, str):
    if w not in cfg.ct_windows:
      raise ValueError(f'unknown CT window {w!r}; known: {sorted(cfg.ct_windows)}')
    w = cfg.ct_windows[w]
  lo, hi = float(w[0]), float(w[1])
  if not hi > lo:
    raise ValueError(f'CT window must have high > low, got {w!r}')
  return lo, hi
