"""Landmark and organ vocabularies shared by every modality.

One global landmark list (``LANDMARKS``) so that a record of any modality carries the same ``(K, 2)``
arrays; a record marks the landmarks it cannot show as invisible. Cross-modal pseudo-pairing compares
landmarks by index, so the order here is part of the on-disk format: append, never reorder.

Coordinate frames (all coordinates are ``(y, x)``, normalised to ``[0, 1]`` edge to edge, i.e. pixel
``i`` of an ``S``-pixel axis covers ``[i / S, (i + 1) / S)``):

* in-image (``landmarks``): row and column of the stored image. Axial CT/MRI use radiological display:
  rows run anterior -> posterior, columns run patient right -> patient left. Frontal X-ray: rows run
  superior -> inferior, columns patient right -> patient left (the patient's right on the viewer's left).
* canonical frontal frame (``landmarks_canonical``): ``y`` runs superior -> inferior and ``x`` runs
  patient right -> patient left as seen by the viewer, both normalised over the bounding box of the
  imaged body part (torso for chest/abdomen, head for brain, torso for cardiac). A landmark has the same
  canonical position whichever modality or view shows it, which is what cross-modal pairing needs; the
  anterior-posterior coordinate is dropped (frontal projection).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

LANDMARKS: tuple[str, ...] = (
  # chest
  'tracheal_bifurcation',  # carina
  'aortic_arch',  # top of the arch
  'cardiac_apex',
  'lung_apex_right',
  'lung_apex_left',
  'costophrenic_angle_right',
  'costophrenic_angle_left',
  'liver_dome',
  # abdomen
  'kidney_upper_pole_right',
  'kidney_upper_pole_left',
  'spleen_tip',
  'l3_vertebra',  # centre of the L3 vertebral body
  # brain
  'anterior_commissure',
  'posterior_commissure',
  'frontal_pole',
  'occipital_pole',
  # cardiac MRI
  'lv_apex',
  'mitral_valve',
  'rv_insertion_anterior',
  'rv_insertion_inferior',
)

REGION_LANDMARKS: dict[str, tuple[str, ...]] = {
  # The diaphragm is curved: the liver dome and the upper kidney poles show on chest and abdomen views.
  'chest': LANDMARKS[0:8] + ('kidney_upper_pole_right', 'kidney_upper_pole_left'),
  'abdomen': ('costophrenic_angle_right', 'costophrenic_angle_left', 'liver_dome')
  + LANDMARKS[8:12],
  'brain': LANDMARKS[12:16],
  'cardiac': ('cardiac_apex',) + LANDMARKS[16:20],
}

ORGANS: tuple[str, ...] = (
  'lungs',
  'heart',
  'aorta',
  'trachea',
  'liver',
  'kidneys',
  'spleen',
  'bone',
  'brain',
)

# Organs a record of each region shows when its converter does not say (multi-hot 'organs').
REGION_ORGANS: dict[str, tuple[str, ...]] = {
  'chest': ('lungs', 'heart', 'aorta', 'trachea', 'bone'),
  'abdomen': ('liver', 'kidneys', 'spleen', 'bone'),
  'brain': ('brain',),
  'cardiac': ('heart', 'lungs', 'aorta'),
  'hand': ('bone',),
}

REGIONS: tuple[str, ...] = tuple(REGION_LANDMARKS)

_LANDMARK_INDEX = {name: i for i, name in enumerate(LANDMARKS)}
_ORGAN_INDEX = {name: i for i, name in enumerate(ORGANS)}
assert len(_LANDMARK_INDEX) == len(LANDMARKS) and len(_ORGAN_INDEX) == len(ORGANS)
assert all(n in _LANDMARK_INDEX for names in REGION_LANDMARKS.values() for n in names)
assert all(n in _ORGAN_INDEX for names in REGION_ORGANS.values() for n in names)


def landmark_index(name: str) -> int:
  """Index of a landmark name in ``LANDMARKS``; a one-line KeyError lists the vocabulary otherwise."""
  try:
    return _LANDMARK_INDEX[name]
  except KeyError:
    raise KeyError(f'unknown landmark {name!r}; known: {", ".join(LANDMARKS)}') from None


def organ_multi_hot(names: Iterable[str]) -> np.ndarray:
  """``uint8 (len(ORGANS),)`` multi-hot vector of the given organ names."""
  out = np.zeros(len(ORGANS), np.uint8)
  for name in names:
    if name not in _ORGAN_INDEX:
      raise KeyError(f'unknown organ {name!r}; known: {", ".join(ORGANS)}')
    out[_ORGAN_INDEX[name]] = 1
  return out


def empty_landmarks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(landmarks, visible, canonical)`` with nothing visible, the shapes every record uses."""
  k = len(LANDMARKS)
  return np.zeros((k, 2), np.float32), np.zeros((k,), bool), np.zeros((k, 2), np.float32)
