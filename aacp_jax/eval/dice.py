"""Dice overlap of segmentation masks, per class (NumPy).

Dice(P, T) = 2 |P ∩ T| / (|P| + |T|) for binary masks P (prediction) and T (truth).

Empty/empty convention: when both P and T are empty, Dice = `empty`, 1.0 by default: the
prediction is exactly right (no tumour predicted where there is none), and scoring it 0 would
punish correct negatives while NaN would silently drop them from a mean. Pass `empty=nan` to
leave such cases out of a `np.nanmean` instead (MONAI's `ignore_empty`). A non-empty prediction
against an empty truth (or the reverse) scores 0.
"""

import numpy as np


def dice_binary(pred, truth, *, empty: float = 1.0) -> float:
  """Dice of two boolean masks of the same shape, pooled over all their elements."""
  pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
  if pred.shape != truth.shape:
    raise ValueError(f'dice: prediction {pred.shape} and truth {truth.shape} differ in shape')
  total = int(pred.sum()) + int(truth.sum())
  if total == 0:
    return float(empty)
  return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def dice_per_class(pred, truth, num_classes: int, *, empty: float = 1.0) -> np.ndarray:
  """Dice of each class 0..num_classes-1 of two integer label maps, pooled over all pixels.

  Class 0 (background) is included; drop it with `[1:]` for the usual foreground mean.
  """
  pred, truth = np.asarray(pred), np.asarray(truth)
  return np.array([dice_binary(pred == c, truth == c, empty=empty) for c in range(num_classes)])


def dice_per_image(pred, truth, num_classes: int, *, empty: float = 1.0) -> np.ndarray:
  """(N, num_classes) Dice of each image of label maps (N, ...) and each class.

  The per-case mean `dice_per_image(...).mean(0)` is what segmentation papers usually report;
  pooled Dice (`dice_per_class`) lets large structures weigh more.
  """
  pred, truth = np.asarray(pred), np.asarray(truth)
  if pred.shape != truth.shape:
    raise ValueError(f'dice: prediction {pred.shape} and truth {truth.shape} differ in shape')
  return np.stack([dice_per_class(p, t, num_classes, empty=empty) for p, t in zip(pred, truth)])
