"""Radiographs: DICOM or PNG/JPG → uint8 (size, size, 1) after photometric fix, rescale, CLAHE and resize.

Order (``prepare_xray``): greyscale with bone bright → uint8 by percentiles → resize the long side to
``size`` keeping the aspect → CLAHE → pad the short side to a square with 0. CLAHE runs after the
resize so its tiles cover the same fraction of anatomy whatever the detector's pixel count (and it costs
a fraction of a full-resolution pass), and before the padding so the black border never enters a tile's
histogram.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
import pydicom
from skimage import exposure, transform

from data_prep.ops.dicom import check_regular_file, check_transfer_syntax, read_header
from data_prep.ops.errors import PrepError, one_line

_PIXEL_TAGS = (
  'PixelData',
  'Rows',
  'Columns',
  'SamplesPerPixel',
  'PhotometricInterpretation',
  'BitsAllocated',
  'BitsStored',
  'HighBit',
  'PixelRepresentation',
  'NumberOfFrames',
  'PlanarConfiguration',
  'RescaleSlope',
  'RescaleIntercept',
  'RescaleType',
  'ModalityLUTSequence',
  'VOILUTSequence',
  'WindowCenter',
  'WindowWidth',
  'VOILUTFunction',
)


def read_dicom_xray(path: str, *, voi: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Pixels as float32 (H, W) with the modality LUT, the VOI LUT / window when ``voi`` and present,
  and MONOCHROME1 inverted (reflected within its own range) so that higher is always brighter;
  spacing float32 (row, col) mm from PixelSpacing or ImagerPixelSpacing, (0, 0) when absent or 0."""
  header = read_header(path)
  check_transfer_syntax(header, decoder='pydicom')
  if header.samples != 1 or header.photometric not in ('MONOCHROME1', 'MONOCHROME2'):
    raise PrepError(
      'unsupported',
      f'{path}: {header.photometric} with {header.samples} samples; '
      'a radiograph must be MONOCHROME1/2',
    )
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
    raise PrepError(
      'dimensions', f'{path}: pixels {values.shape}, header {header.rows}x{header.columns}'
    )
  if not np.isfinite(values).all():
    raise PrepError('nan', f'{path}: non-finite pixel values')
  if header.photometric == 'MONOCHROME1':
    # MONOCHROME1: the minimum is white. Reflecting within the image's range keeps the value range.
    values = values.max() + values.min() - values
  spacing = np.asarray(header.pixel_spacing or (0.0, 0.0), np.float32)
  if not (spacing > 0).all():
    spacing = np.zeros(2, np.float32)
  return values, spacing


_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png_shortfall(path: str) -> tuple[int, int] | None:
  """(bytes decoded, bytes the header needs) when a PNG's IDAT stream ends before filling the image.

  PIL decodes such a file without a word and leaves the missing rows 0 (a black band that looks
  like collimation), so the decompressed size is checked against IHDR here. None when complete or
  not a PNG; a damaged stream is left to PIL's own errors.
  """
  with open(path, 'rb') as f:
    if f.read(8) != _PNG_SIGNATURE:
      return None
    inflate, have, need = zlib.decompressobj(), 0, None
    while True:
      head = f.read(8)
      if len(head) < 8:
        break
      length, kind = int.from_bytes(head[:4], 'big'), head[4:]
      data = f.read(length)
      f.seek(4, 1)  # CRC
      if kind == b'IHDR' and len(data) >= 13:
        width, height = int.from_bytes(data[:4], 'big'), int.from_bytes(data[4:8], 'big')
        depth, colour, interlace = data[8], data[9], data[12]
        bits = depth * _PNG_CHANNELS.get(colour, 1)
        # Adam7 passes: (first row, row step, first column, column step).
        passes = (
          [
            (0, 8, 0, 8),
            (0, 8, 4, 8),
            (4, 8, 0, 4),
            (0, 4, 2, 4),
            (2, 4, 0, 2),
            (0, 2, 1, 2),
            (1, 2, 0, 1),
          ]
          if interlace
          else [(0, 1, 0, 1)]
        )
        need = 0
        for r0, dr, c0, dc in passes:
          rows, cols = max(0, -(-(height - r0) // dr)), max(0, -(-(width - c0) // dc))
          if rows and cols:
            need += rows * (1 + -(-(cols * bits) // 8))
      elif kind == b'IDAT':
        try:
          # Bounded output per call: a bomb must not be inflated whole just to be measured.
          chunk = inflate.decompress(data, 1 << 24)
          while chunk:
            have += len(chunk)
            chunk = inflate.decompress(inflate.unconsumed_tail, 1 << 24)
        except zlib.error:
          return None
      elif kind == b'IEND':
        break
  if need is None or have >= need:
    return None
  return have, need


def read_image_file(path: str) -> np.ndarray:
  """A PNG/JPG/TIFF/... as a greyscale (H, W) array, turned as its EXIF Orientation says: uint8 for
  8-bit files, uint16/int32 for deeper ones, float32 for float TIFFs."""
  check_regular_file(path)
  with open(path, 'rb') as f:
    head = f.read(132)
  if head[128:132] == b'DICM':
    # PIL cannot read it, and 'corrupt' would send the user to re-download a file that is fine.
    raise PrepError(
      'unsupported',
      f'{path}: a DICOM file, not PNG/JPG; convert DICOM radiographs '
      'with python -m data_prep.dicom_xray',
    )
  try:
    with warnings.catch_warnings():
      # PIL only warns between MAX_IMAGE_PIXELS and twice that; either way it is no radiograph.
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      with Image.open(path) as img:
        # Before decoding: PIL's own error for a short stream, where it has one, says less.
        shortfall = _png_shortfall(path) if img.format == 'PNG' else None
        if shortfall:
          raise PrepError(
            'truncated',
            f'{path}: PNG data fills {shortfall[0]} of the '
            f'{shortfall[1]} bytes its header declares (the rest would decode black)',
          )
        img.load()
        # Cameras and some exporters store the sensor's orientation plus an EXIF tag saying how to
        # turn it; ignoring the tag would store the radiograph rotated.
        img = ImageOps.exif_transpose(img)
        if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
          array = np.array(img)
        elif img.mode == 'F':
          # Float TIFFs (often 0..1): convert('L') would truncate them to 0 and 1.
          array = np.array(img, np.float32)
        else:
          array = np.array(img.convert('L'))
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise PrepError('decompression_bomb', f'{path}: {one_line(e)}') from None
  except UnidentifiedImageError:
    raise PrepError('corrupt', f'{path}: not an image PIL can identify') from None
  except OSError as e:
    kind = 'truncated' if 'truncated' in str(e).lower() else 'corrupt'
    raise PrepError(kind, f'{path}: {one_line(e)}') from None
  if array.ndim != 2 or min(array.shape) < 2:
    raise PrepError('dimensions', f'{path}: image of shape {array.shape}')
  if array.dtype.kind == 'f' and not np.isfinite(array).all():
    raise PrepError('nan', f'{path}: {int((~np.isfinite(array)).sum())} NaN/inf pixels')
  return array


def to_uint8(x: np.ndarray, *, percentiles=(0.5, 99.5)) -> np.ndarray:
  """uint8 input unchanged; otherwise a linear map of the given percentiles to 0 and 255, clipped
  (robust to a few hot pixels and collimator edges that a min/max stretch would follow)."""
  x = np.asarray(x)
  if x.dtype == np.uint8:
    if x.size and x.min() == x.max():
      # CLAHE would stretch a constant image to all-white: a blank export, not a radiograph.
      raise PrepError('empty', f'to_uint8: constant image (every pixel {int(x.flat[0])})')
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
  out = exposure.equalize_adapthist(
    np.asarray(u8, np.uint8), clip_limit=clip_limit, kernel_size=kernel_size
  )
  return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def resize_long_side(u8: np.ndarray, size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Resize so the long side is ``size`` (aspect kept; anti-aliased when shrinking); returns the image
  and the per-axis scale (new / old pixels), by which the spacing in mm is divided."""
  h, w = u8.shape
  factor = size / max(h, w)
  new = (max(1, round(h * factor)), max(1, round(w * factor)))
  out = transform.resize(
    u8.astype(np.float32), new, order=1, anti_aliasing=factor < 1, preserve_range=True
  )
  return np.clip(np.rint(out), 0, 255).astype(np.uint8), np.array(
    [new[0] / h, new[1] / w], np.float32
  )


def pad_square(u8: np.ndarray, size: int = 1024) -> tuple[np.ndarray, tuple[int, int]]:
  """Centre ``u8`` on a black ``size`` x ``size`` canvas; returns it and the (top, left) offset."""
  h, w = u8.shape
  if h > size or w > size:
    raise ValueError(f'pad_square: {u8.shape} does not fit in {size}')
  top, left = (size - h) // 2, (size - w) // 2
  out = np.zeros((size, size), np.uint8)
  out[top : top + h, left : left + w] = u8
  return out, (top, left)


def prepare_xray(
  pixels: np.ndarray,
  spacing=(0.0, 0.0),
  *,
  size: int = 1024,
  use_clahe: bool = True,
  percentiles=(0.5, 99.5),
) -> tuple[np.ndarray, np.ndarray]:
  """Greyscale pixels (bone bright) → (uint8 (size, size, 1), float32 (3,) spacing (row, col, 0) mm)."""
  u8 = to_uint8(pixels, percentiles=percentiles)
  u8, scale = resize_long_side(u8, size)
  if use_clahe:
    u8 = clahe(u8)
  u8, _ = pad_square(u8, size)
  spacing = np.asarray(spacing, np.float32) / scale
  return u8[..., None], np.array([spacing[0], spacing[1], 0.0], np.float32)
