"""What the 2D X-ray converters share: flags, label tables, file checks and the record itself.

Every radiograph goes through the same ops (``data_prep.ops.xray``: grey read, uint8 rescale, CLAHE,
square resize) so that CheXpert, MIMIC-CXR, COVIDx, bone age and MedMNIST images look alike to the
X-ray encoder (paper Table 2: CLAHE, 1024x1024).
"""

from __future__ import annotations

from collections.abc import Iterator
import csv
import gzip
import io
import os

from absl import app, flags
import numpy as np

from aacp_jax import task_specs
from data_prep import runner

IMAGE_EXTS = ('.jpg', '.jpeg', '.png')
# Smaller than this is a thumbnail or a broken export, not a radiograph (MedMNIST's 28 px excepted).
MIN_SIDE = 16
# A strip (e.g. a 1-row image, or rows and columns swapped in a raw export) is not a radiograph.
MAX_ASPECT = 4.0
# CheXpert and MIMIC-CXR label columns (the CheXpert labeller's 14 observations), in file order:
# the task table's, since the chexpert task reads what this writes.
CHEXPERT_LABELS = task_specs.CHEXPERT_LABELS
# The labeller writes 1.0 positive, 0.0 negative, -1.0 uncertain and leaves a blank when the report
# does not mention the finding; blank reads as 0 (records.py: 0 = negative or not mentioned).
_VALUE = {'1': 1, '1.0': 1, '0': 0, '0.0': 0, '-1': -1, '-1.0': -1, '': 0}
LABEL_VALUES = _VALUE  # the same coding for any multi-label CSV (data_prep.dicom_xray)


def define_xray_flags() -> None:
  """Flags the X-ray converters share (idempotent, like ``runner.define_flags``)."""
  runner.define_flags(default_image_size=1024)
  if 'clahe' not in flags.FLAGS:
    flags.DEFINE_bool('clahe', True, 'Apply CLAHE (paper Table 2); --noclahe skips it.')
  if 'frontal_only' not in flags.FLAGS:
    flags.DEFINE_bool(
      'frontal_only',
      False,
      'CheXpert/MIMIC-CXR: keep only frontal (PA/AP) views; '
      'the others are counted in the manifest meta as skipped, not rejected.',
    )


def run_command(build, *extra_flags: str, **extra_values) -> None:
  """`python -m data_prep.<X-ray dataset>`: the shared flags, then `build(options)`; the exit status
  is the runner's (0 all converted, 1 something rejected). `extra_flags` names flags passed on to
  `options.extra`. Flags are defined only here, never at import (tests and workers import the module)."""
  define_xray_flags()

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    f = flags.FLAGS
    extra = {name: f[name].value for name in extra_flags}
    extra.update({k: fn(f) for k, fn in extra_values.items()})
    return build(runner.options_from_flags(clahe=f.clahe, **extra))

  app.run(main)


def chexpert_labels(row: dict, where: str) -> list[int]:
  """The 14 observations of a CheXpert-style CSV row as -1/0/1; ``runner.Reject`` otherwise."""
  check_row(row, where)
  out = []
  for name in CHEXPERT_LABELS:
    if name not in row:
      raise runner.Reject('missing_label', f'{where}: no column {name!r}')
    value = row[name].strip()
    if value not in _VALUE:
      raise runner.Reject(
        'unknown_label', f'{where}: {name!r} is {value!r}, expected 1, 0, -1 or blank'
      )
    out.append(_VALUE[value])
  return out


def check_row(row: dict, where: str) -> None:
  """``runner.Reject`` for a CSV row with fewer or more fields than the header.

  ``csv.DictReader`` fills the columns of a row cut short with None and files surplus fields under
  the key None; read as blanks or ignored, either would give a wrong label, not a reject.
  """
  short = [k for k, v in row.items() if k is not None and v is None]
  if short:
    raise runner.Reject(
      'missing_label',
      f'{where}: the row ends before column {short[0]!r} '
      f'({len(short)} of {len(row) - (None in row)} fields missing: cut short?)',
    )
  if row.get(None):
    raise runner.Reject(
      'format', f'{where}: {len(row[None])} more field(s) than the header (an unquoted comma?)'
    )


def read_csv(path: str) -> Iterator[tuple[int, dict]]:
  """``(line number, row)`` of a CSV, gzipped or not; a missing file is a one-line error."""
  if not os.path.exists(path) and os.path.exists(path + '.gz'):
    path += '.gz'
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: label file not found (see README, "Real data")')
  raw = gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')
  with raw, io.TextIOWrapper(raw, encoding='utf-8-sig', newline='') as f:
    for i, row in enumerate(csv.DictReader(f), start=2):
      yield i, {k.strip() if k else k: v for k, v in row.items()}


def find_csv(root: str, name: str) -> str | None:
  for candidate in (name, name + '.gz'):
    if os.path.exists(os.path.join(root, candidate)):
      return os.path.join(root, candidate)
  return None


def walk_images(root: str, folder: str) -> list[str]:
  """Image paths under ``root/folder``, relative to ``root``, sorted (inputs with no label row)."""
  out = []
  for base, dirs, names in os.walk(os.path.join(root, folder)):
    dirs.sort()
    out += [
      os.path.relpath(os.path.join(base, n), root)
      for n in sorted(names)
      if n.lower().endswith(IMAGE_EXTS)
    ]
  return out


def check_pixels(pixels: np.ndarray, where: str, min_side: int = MIN_SIDE) -> np.ndarray:
  if pixels.ndim != 2:
    raise runner.Reject('dimensions', f'{where}: shape {pixels.shape}, expected one grey 2D image')
  h, w = pixels.shape
  if min(h, w) < min_side or max(h, w) > MAX_ASPECT * min(h, w):
    raise runner.Reject(
      'dimensions',
      f'{where}: {h}x{w} pixels is not a radiograph (sides >= '
      f'{min_side}, aspect <= {MAX_ASPECT:g})',
    )
  if np.issubdtype(pixels.dtype, np.floating) and not np.isfinite(pixels).all():
    raise runner.Reject('nan', f'{where}: non-finite pixel values')
  if pixels.min() == pixels.max():
    # A blank export: CLAHE would turn it into an all-white record.
    raise runner.Reject('empty', f'{where}: every pixel is {pixels.flat[0]} (a blank image)')
  return pixels


def read_image(options: runner.Options, rel: str) -> np.ndarray:
  """Grey pixels of ``--input/rel`` through the ops reader, with the runner's reject kinds."""
  from data_prep.ops import xray  # pylint: disable=g-import-not-at-top  # heavy (skimage) imports.

  path = os.path.join(options.input, rel)
  if not os.path.lexists(path):
    raise runner.Reject('missing_file', f'{rel}: file not found')
  # Directory, 0-byte and DICOM checks live in the reader (one place for every X-ray path).
  return check_pixels(np.asarray(xray.read_image_file(path)), rel)


def xray_record(
  pixels: np.ndarray,
  options: runner.Options,
  *,
  region: str = 'chest',
  spacing=(0.0, 0.0),
  size: int | None = None,
  **labels,
) -> dict:
  """The X-ray record for ``pixels``: ops applied, labels attached (subject/landmarks: the runner).

  ``spacing`` 0 means unknown (JPG/PNG exports carry none). ``labels``: any of ``label`` (int),
  ``labels`` (list of -1/0/1), ``target`` (float).
  """
  from data_prep.ops import xray  # pylint: disable=g-import-not-at-top

  image, spacing = xray.prepare_xray(
    pixels,
    np.asarray(spacing, np.float32),
    size=size or options.image_size,
    use_clahe=bool(options.extra.get('clahe', True)),
  )
  r = {
    'image': np.asarray(image, np.uint8).reshape(image.shape[0], image.shape[1], 1),
    'modality': 'xray',
    'region': region,
    'spacing': np.asarray(spacing, np.float32),
  }
  if labels.get('label') is not None:
    r['label'] = np.array(labels['label'], np.int32)
  if labels.get('labels') is not None:
    r['labels'] = np.asarray(labels['labels'], np.int8)
  if labels.get('target') is not None:
    r['target'] = np.array(labels['target'], np.float32)
  return r
