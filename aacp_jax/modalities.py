"""The imaging modalities: names, ids, encoder inputs, stored dtypes and CT windows.

The one source of these facts (ARCHITECTURE: Records). NumPy only, no JAX: configs and data
preparation import it too.
"""

import numpy as np

MODALITIES = ('ct', 'mri', 'xray')
# Stable integer ids (RNG streams per modality, cross-modal pairing): part of what a run computes,
# so never renumber.
MODALITY_IDS = {'ct': 0, 'mri': 1, 'xray': 2}
# CT: 64 consecutive 1 mm axial slices as channels (2.5D); MRI: T1, T2, FLAIR; X-ray: one channel.
IN_CHANNELS = {'ct': 64, 'mri': 3, 'xray': 1}
# What a record stores: raw HU, instance-normalised MRI, 8-bit radiographs.
RAW_DTYPES = {'ct': np.dtype(np.int16), 'mri': np.dtype(np.float16), 'xray': np.dtype(np.uint8)}

# Named CT windows in HU as (low, high). 'pretrain' is the paper's soft-tissue pre-training window
# (Table 2); the others are the usual radiology presets (width/level: lung 1400/-300,
# bone 1800/400, brain 80/40, mediastinum 350/50).
CT_WINDOWS = {
  'pretrain': (-160.0, 240.0),
  'lung': (-1000.0, 400.0),
  'liver': (-160.0, 240.0),
  'abdomen': (-160.0, 240.0),
  'bone': (-500.0, 1300.0),
  'brain': (0.0, 80.0),
  'mediastinum': (-125.0, 225.0),
}


def check_modality(modality: str) -> None:
  if modality not in MODALITIES:
    raise ValueError(f'unknown modality {modality!r}; expected one of {MODALITIES}')
