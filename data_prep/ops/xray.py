"""Radiographs: DICOM or PNG/JPG → uint8 (size, size, 1) after photometric fix, rescale, CLAHE and resize.

Order (``prepare_xray``): greyscale with bone bright → uint8 by percentiles → resize the long side to
``size`` keeping the aspect → CLAHE → pad the short side to a square with 0. CLAHE runs after the
resize so its tiles cover the same fraction of anatomy whatever the detector's pixel count (and it costs
a fraction of a full-resolution pass), and before the padding so the black border never enters a tile's
histogram.
"""
from __future__ import annotations

import os

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from skimage import exposure, transform

from data_prep.ops.dicom import check_transfer_syntax, read_header
from data_prep.ops.errors import PrepError, one_line

_PIXEL_TAGS = ('PixelData', 'Rows', 'Columns', 'SamplesPerPixel', 'PhotometricInterpretation',
               'BitsAllocated', 'BitsStored', 'HighBit', 'PixelRepresentation', 'NumberOfFrames',
               'PlanarConfiguration', 'RescaleSlope', 'RescaleIntercept', 'RescaleType',
               'ModalityLUTSequence', 'VOILUTSequence', 'WindowCenter', 'WindowWidth', 'VOILUTFunction')


def read_dicom_xray(path: str, *, voi: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Pixels as float32 (H, W) with the modality LUT, the VOI LUT / window when ``voi`` and present,
  and MONOCHROME1 inverted (reflected within its own range) so that higher is always brighter;
  spacing float32 (row, col) mm from PixelSpacing or ImagerPixelSpacing, (0, 0) when absent or 0."""
  header = read_header(path)
  check_transfer_syntax(header, decoder='pydicom')
  if header.samples != 1 or header.photometric not in ('MONOCHROME1', 'MONOCHROME2'):
    raise PrepError('unsupported', f'{path}: {header.photometric} with {header.samples} samples; '
                    'a radiograph must be MONOCHROME1/2')
  if header.frames != 1:
    raise PrepError('dimensions', f'{path}: {header.frames} frames, a radiograph has one')
  try:
    # Only what decoding and the LUTs need: identifiers are never parsed (as in read_header).
    ds = pydicom.dcmread(path, specific_tags=list(_PIXEL_TAGS))
    pixels = ds.pixel_array
    values = pydicom.pixels.apply_modality_lut(pixels, ds)
    if voi and ('WindowCenter' in ds or 'VOILUTSequence' in ds):
      values = pydicom.pixels.apply_voi_lut(values, ds)
  except (ValueError, RuntimeError, EOFError, OSError, AttributeError, KeyError) as e:
    raise PrepError('corrupt', f'{path}: unreadable pixels ({one_line(e)})') from None
  values = np.asarray(values, np.float32)
  if values.shape != (header.rows, header.columns):
    raise PrepError('dimensions', f'{path}: pixels {values.shape}, header {header.rows}x{header.columns}')
  if not np.isfinite(values).all():
    raise PrepError('nan', f'{path}: non-finite pixel values')
  if header.photometric == 'MONOCHROME1':
    # MONOCHROME1: the minimum is white. Reflecting within the image's range keeps the value range.
    values = values.max() + values.min() - values
  spacing = np.asarray(header.pixel_spacing or (0.0, 0.0), np.float32)
  if not (spacing > 0).all():
    spacing = np.zeros(2, np.float32)
  return values, spacing


def read_image_file(path: str) -> np.ndarray:
  """A PNG/JPG/... as a greyscale (H, W) array: uint8 for 8-bit files, uint16/int32 for deeper ones."""
  if not os.path.isfile(path):
    raise PrepError('missing_file', f'{path}: no such file')
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        array = np.array(img)
      else:
        array = np.array(img.convert('L'))
  except UnidentifiedImageError:
    raise PrepError('corrupt', f'{path}: not an image PIL can identify') from None
  except OSError as e:
    kind = 'truncated' if 'truncated' in str(e).lower() else 'corrupt'
    raise PrepError(kind, f'{path}: {one_line(e)}') from None
  if array.ndim != 2 or min(array.shape) < 2:
    raise PrepError('dimensions', f'{path}: image of shape {array.shape}')
  return array


def to_uint8(x: np.ndarray, *, percentiles=(0.5, 99.5)) -> np.ndarray:
  """uint8 input unchanged; otherwise a linear map of the given percentiles to 0 and 255, clipped
  (robust to a few hot pixels and collimator edges that a min/max stretch would follow)."""
  x = np.asarray(x)
  if x.dtype == np.uint8:
    return x.copy()
  x = x.astype(np.float32)
  if not np.isfinite(x).all():
    raise PrepError('nan', 'to_uint8: non-finite values')
  lo, hi = np.percentile(x, percentiles)
  if hi <= lo:
    lo, hi = float(x.min()), float(x.max())
  if hi <= lo:
    raise PrepError('empty', 'to_uint8: constant image')
  return np.clip((x - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def clahe(u8: np.ndarray, *, clip_limit: float = 0.01, kernel_size=None) -> np.ndarray:
  """Contrast-limited adaptive histogram equalisation (``skimage.exposure.equalize_adapthist``; default
  tiles 1/8 of each side) as uint8."""
  out = exposure.equalize_adapthist(np.asarray(u8, np.uint8), clip_limit=clip_limit, kernel_size=kernel_size)
  return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def resize_long_side(u8: np.ndarray, size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Resize so the long side is ``size`` (aspect kept; anti-aliased when shrinking); returns the image
  and the per-axis scale (new / old pixels), by which the spacing in mm is divided."""
  h, w = u8.shape
  factor = size / max(h, w)
  new = (max(1, round(h * factor)), max(1, round(w * factor)))
  out = transform.resize(u8.astype(np.float32), new, order=1, anti_aliasing=factor < 1,
                         preserve_range=True)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8), np.array([new[0] / h, new[1] / w], np.float32)


def pad_square(u8: np.ndarray, size: int = 1024) -> tuple[np.ndarray, tuple[int, int]]:
  """Centre ``u8`` on a black ``size`` x ``size`` canvas; returns it and the (top, left) offset."""
  h, w = u8.shape
  if h > size or w > size:
    raise ValueError(f'pad_square: {u8.shape} does not fit in {size}')
  top, left = (size - h) // 2, (size - w) // 2
  out = np.zeros((size, size), np.uint8)
  out[top:top + h, left:left + w] = u8
  return out, (top, left)


def prepare_xray(pixels: np.ndarray, spacing=(0.0, 0.0), *, size: int = 1024, use_clahe: bool = True,
                 percentiles=(0.5, 99.5)) -> tuple[np.ndarray, np.ndarray]:
  """Greyscale pixels (bone bright) → (uint8 (size, size, 1), float32 (3,) spacing (row, col, 0) mm)."""
  u8 = to_uint8(pixels, percentiles=percentiles)
  u8, scale = resize_long_side(u8, size)
  if use_clahe:
    u8 = clahe(u8)
  u8, _ = pad_square(u8, size)
  spacing = np.asarray(spacing, np.float32) / scale
  return u8[..., None], np.array([spacing[0], spacing[1], 0.0], np.float32)
