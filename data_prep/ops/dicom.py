"""DICOM headers without identifiers, and which transfer syntaxes each pixel decoder can read.

``read_header`` asks pydicom for an explicit list of tags (``specific_tags``), so names, birth dates,
accession numbers and the like are never even parsed into memory, let alone returned. The only
identifiers it returns are the patient id (for the runner's salted hash) and the series UID (for
grouping slices); both are documented as never to be written.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Iterable

import pydicom
from pydicom.errors import InvalidDicomError

from data_prep.ops.errors import PrepError, one_line

# Geometry and pixel-format tags only; PatientID and SeriesInstanceUID are read for hashing/grouping.
_TAGS = (
  'PatientID',
  'SeriesInstanceUID',
  'Modality',
  'Rows',
  'Columns',
  'NumberOfFrames',
  'SamplesPerPixel',
  'PhotometricInterpretation',
  'BitsAllocated',
  'BitsStored',
  'PixelRepresentation',
  'RescaleSlope',
  'RescaleIntercept',
  'PixelSpacing',
  'ImagerPixelSpacing',
  'ImagePositionPatient',
  'ImageOrientationPatient',
  'SliceThickness',
  'WindowCenter',
  'WindowWidth',
  'SpecificCharacterSet',
)

# Native (not encapsulated) pixel data: its byte size follows from the header.
_NATIVE = ('1.2.840.10008.1.2', '1.2.840.10008.1.2.1', '1.2.840.10008.1.2.2')
_UNCOMPRESSED = _NATIVE + ('1.2.840.10008.1.2.1.99',)  # the last one is deflated as a whole file
# What the GDCM inside SimpleITK decodes (checked on pydicom-data's files in the tests): JPEG
# baseline/extended/lossless, JPEG-LS, JPEG 2000 and RLE. Video, HTJ2K and JPIP are not.
SITK_SYNTAXES = _UNCOMPRESSED + (
  '1.2.840.10008.1.2.4.50',
  '1.2.840.10008.1.2.4.51',
  '1.2.840.10008.1.2.4.57',
  '1.2.840.10008.1.2.4.70',
  '1.2.840.10008.1.2.4.80',
  '1.2.840.10008.1.2.4.81',
  '1.2.840.10008.1.2.4.90',
  '1.2.840.10008.1.2.4.91',
  '1.2.840.10008.1.2.5',
)


@dataclasses.dataclass(frozen=True)
class DicomHeader:
  """Geometry and pixel format of one DICOM file. ``subject_id`` and ``series_uid`` are raw
  identifiers: hash them (subject) or use them in memory only (grouping); never write either."""

  path: str
  subject_id: str | None
  series_uid: str | None
  modality: str
  transfer_syntax: str
  rows: int
  columns: int
  frames: int
  samples: int
  photometric: str
  bits_allocated: int
  bits_stored: int
  pixel_representation: int
  slope: float
  intercept: float
  pixel_spacing: tuple[float, float] | None  # (row, col) mm: PixelSpacing, else ImagerPixelSpacing
  position: tuple[float, float, float] | None  # ImagePositionPatient, LPS mm
  orientation: tuple[float, ...] | None  # ImageOrientationPatient: row then column direction
  slice_thickness: float | None
  window_center: float | None
  window_width: float | None

  def __repr__(self):
    # Keep raw identifiers out of logs and tracebacks that print the object.
    return f'DicomHeader({self.path!r}, {self.modality}, {self.rows}x{self.columns}, {self.transfer_syntax})'


def _first(value):
  if value is None:
    return None
  if isinstance(value, pydicom.multival.MultiValue):
    return float(value[0]) if len(value) else None
  return float(value)


def _floats(value, n):
  if value is None:
    return None
  out = tuple(float(v) for v in value)
  return out if len(out) == n else None


def check_regular_file(path: str) -> None:
  """PrepError ``not_a_file`` for a directory (or device) named like a file, ``missing_file`` for
  nothing there, ``empty`` for 0 bytes: three different fixes, so three different kinds."""
  if os.path.exists(path) and not os.path.isfile(path):
    what = 'a directory' if os.path.isdir(path) else 'not a regular file'
    raise PrepError('not_a_file', f'{path}: {what}, where a file was expected')
  if not os.path.isfile(path):
    raise PrepError('missing_file', f'{path}: no such file')
  if os.path.getsize(path) == 0:
    raise PrepError('empty', f'{path}: empty file (0 bytes)')


def read_header(path: str) -> DicomHeader:
  """The header of one DICOM file; PrepError ``missing_file`` / ``not_a_file`` / ``empty`` /
  ``corrupt`` / ``truncated`` otherwise."""
  check_regular_file(path)
  try:
    with open(path, 'rb') as fp:
      ds = pydicom.dcmread(fp, specific_tags=list(_TAGS), stop_before_pixels=True)
      # pydicom stops with the file positioned on the Pixel Data tag: what follows must hold the pixels.
      pixels_at = fp.tell()
    meta = ds.file_meta
    syntax = str(meta.TransferSyntaxUID)
    header = DicomHeader(
      path=path,
      subject_id=str(ds.PatientID) if ds.get('PatientID') not in (None, '') else None,
      series_uid=str(ds.SeriesInstanceUID) if ds.get('SeriesInstanceUID') else None,
      modality=str(ds.get('Modality', '')),
      transfer_syntax=syntax,
      rows=int(ds.Rows),
      columns=int(ds.Columns),
      frames=int(ds.get('NumberOfFrames') or 1),
      samples=int(ds.get('SamplesPerPixel') or 1),
      photometric=str(ds.get('PhotometricInterpretation', '')),
      bits_allocated=int(ds.BitsAllocated),
      bits_stored=int(ds.get('BitsStored') or ds.BitsAllocated),
      pixel_representation=int(ds.get('PixelRepresentation') or 0),
      slope=float(ds.get('RescaleSlope') or 1.0),
      intercept=float(ds.get('RescaleIntercept') or 0.0),
      pixel_spacing=_floats(ds.get('PixelSpacing') or ds.get('ImagerPixelSpacing'), 2),
      position=_floats(ds.get('ImagePositionPatient'), 3),
      orientation=_floats(ds.get('ImageOrientationPatient'), 6),
      slice_thickness=_first(ds.get('SliceThickness')),
      window_center=_first(ds.get('WindowCenter')),
      window_width=_first(ds.get('WindowWidth')),
    )
  except InvalidDicomError as e:
    raise PrepError('corrupt', f'{path}: not a DICOM file ({one_line(e)})') from None
  except AttributeError as e:
    # A missing Rows/Columns/BitsAllocated or file meta: the file has no readable image.
    raise PrepError(
      'corrupt', f'{path}: DICOM header lacks an image description ({one_line(e)})'
    ) from None
  except (EOFError, OSError, ValueError, TypeError, KeyError) as e:
    raise PrepError('corrupt', f'{path}: unreadable DICOM header ({one_line(e)})') from None
  if syntax in _NATIVE:
    # Native pixels have a known size; fewer bytes after the tag (8-byte element header at least)
    # means the file was cut off in transfer.
    need = (
      header.rows * header.columns * header.frames * header.samples * header.bits_allocated // 8
    )
    have = os.path.getsize(path) - pixels_at - 8
    if have < need:
      raise PrepError(
        'truncated', f'{path}: {max(have, 0)} bytes of pixels, the header needs {need}'
      )
  return header


def pydicom_syntaxes() -> tuple[str, ...]:
  """Transfer syntaxes pydicom can decode with the plugins installed here (JPEG lossless needs pylibjpeg or gdcm)."""
  from pydicom.pixels import get_decoder
  from pydicom.uid import AllTransferSyntaxes

  out = []
  for uid in AllTransferSyntaxes:
    try:
      if get_decoder(uid).is_available:
        out.append(str(uid))
    except NotImplementedError:
      pass
  return tuple(out)


def check_transfer_syntax(header: DicomHeader, *, decoder: str = 'sitk') -> None:
  """Raises PrepError ``unsupported`` when ``decoder`` ('sitk' or 'pydicom') cannot read the pixels."""
  if decoder == 'sitk':
    supported = SITK_SYNTAXES
  elif decoder == 'pydicom':
    supported = pydicom_syntaxes()
  else:
    raise ValueError(f'decoder must be sitk or pydicom, not {decoder!r}')
  if header.transfer_syntax not in supported:
    name = pydicom.uid.UID(header.transfer_syntax).name
    raise PrepError(
      'unsupported',
      f'{header.path}: transfer syntax {header.transfer_syntax} ({name}) '
      f'cannot be decoded by {decoder}',
    )


def group_series(paths: Iterable[str]):
  """Reads every header; returns ``({series_uid: [DicomHeader, ...]}, [(path, kind, reason), ...])``.

  Files without a series UID are rejected (``corrupt``): grouping them by guess could splice two scans.
  Lists are in path order; ``read_dicom_series`` sorts them by position.
  """
  series = collections.defaultdict(list)
  rejects = []
  for path in sorted(paths):
    try:
      header = read_header(path)
    except PrepError as e:
      rejects.append((path, e.kind, e.reason))
      continue
    if header.series_uid is None:
      rejects.append((path, 'corrupt', f'{path}: no SeriesInstanceUID'))
      continue
    series[header.series_uid].append(header)
  return dict(series), rejects
