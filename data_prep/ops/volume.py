"""CT volumes: reading, HU, canonical orientation, 1 mm resampling and 64-slice slabs (SimpleITK).

Canonical order ``CANONICAL = 'LPI'`` (SimpleITK/DICOM "to" letters): column index runs toward the
patient's left (so patient right is on the image's left, the radiological view), row index toward
posterior, slice index toward inferior — the phantoms' frame (x right→left, y anterior→posterior,
z superior→inferior). ``ct_slabs`` never builds the whole 1 mm volume: each 64-slice slab is resampled
straight from the input onto its part of one canonical grid, so orientation and resampling are a single
interpolation and memory stays at the input plus one slab.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from typing import Iterator, Sequence
import zlib

import numpy as np
import SimpleITK as sitk

from data_prep.ops.dicom import DicomHeader, check_regular_file, check_transfer_syntax
from data_prep.ops.errors import PrepError, one_line

CANONICAL = 'LPI'
# int16 HU: air is -1024; 3071 is the 12-bit scanner ceiling (metal beyond it carries no tissue
# information). Values outside the scanner's field (-2000, -3024 padding) become air.
HU_RANGE = (-1024, 3071)
_CANONICAL_DIRECTION = np.diag([1.0, 1.0, -1.0])


def _check_complete(path: str) -> None:
  """ITK reads a cut-off NIfTI without complaint (zeros fill the rest) and zeroes its NaNs, so check
  the byte count (and a float NIfTI's values) here."""
  lower = path.lower()
  if lower.endswith(('.nii', '.nii.gz')):
    import nibabel as nib

    if lower.endswith('.gz'):
      # The gzip stream first: a cut-off .gz may not even hold a whole header.
      have = 0
      try:
        with gzip.open(path, 'rb') as f:
          while chunk := f.read(1 << 22):
            have += len(chunk)
      except EOFError:
        raise PrepError('truncated', f'{path}: gzip stream ends early') from None
      except (OSError, zlib.error) as e:
        raise PrepError('corrupt', f'{path}: bad gzip stream ({one_line(e)})') from None
    else:
      have = os.path.getsize(path)
    try:
      header = nib.load(path).header
    except Exception as e:  # nibabel raises several types for a bad header
      raise PrepError('corrupt', f'{path}: unreadable NIfTI header ({one_line(e)})') from None
    need = (
      int(header.get_data_offset())
      + int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
    )
    if have < need:
      raise PrepError('truncated', f'{path}: {have} bytes, the header needs {need}')
    # nibabel "fixes" pixdim 0 to 1 as it loads, which is the very thing to catch: reread it raw.
    with nib.openers.ImageOpener(path) as f:
      _check_nifti_geometry(type(header).from_fileobj(f, check=False), path)
    if header.get_data_dtype().kind == 'f':
      # ITK's NIfTI reader turns NaN into 0 without a word, so look before it does.
      data = np.asarray(nib.load(path).dataobj)
      if not np.isfinite(data).all():
        raise PrepError('nan', f'{path}: {int((~np.isfinite(data)).sum())} NaN/inf voxels')
  elif lower.endswith('.mhd'):
    fields = {}
    with open(path, 'rb') as f:
      for line in f.read(1 << 16).decode('latin-1').splitlines():
        if '=' in line:
          k, v = line.split('=', 1)
          fields[k.strip()] = v.strip()
    if fields.get('CompressedData', 'False').lower() == 'true':
      return
    data = fields.get('ElementDataFile', '')
    raw = os.path.join(os.path.dirname(path), data)
    if data in ('', 'LOCAL') or not os.path.isfile(raw):
      raise PrepError('missing_file', f'{path}: data file {data!r} not found')
    itemsize = {
      'MET_UCHAR': 1,
      'MET_CHAR': 1,
      'MET_USHORT': 2,
      'MET_SHORT': 2,
      'MET_UINT': 4,
      'MET_INT': 4,
      'MET_FLOAT': 4,
      'MET_DOUBLE': 8,
    }.get(fields.get('ElementType'), 0)
    try:
      dims = [int(d) for d in fields.get('DimSize', '').split()]
    except ValueError:
      raise PrepError('corrupt', f'{path}: bad DimSize {fields.get("DimSize")!r}') from None
    need = int(np.prod(dims)) * itemsize * int(fields.get('ElementNumberOfChannels', '1'))
    if os.path.getsize(raw) < need:
      raise PrepError('truncated', f'{raw}: {os.path.getsize(raw)} bytes, the header needs {need}')


def _check_nifti_geometry(header, path: str) -> None:
  """PrepError ``geometry`` when a NIfTI header gives no voxel size: ITK then reads 1 mm isotropic
  without a word, and every millimetre downstream (slabs, MNI, spacing) would be made up."""
  sform = (
    int(header['sform_code']) > 0 and (np.linalg.norm(header.get_sform()[:3, :3], axis=0) > 0).all()
  )
  spatial = min(3, len(header.get_data_shape()))
  pixdim = np.asarray(header['pixdim'][1 : 1 + spatial], np.float64)
  if not sform and not (np.isfinite(pixdim).all() and (pixdim > 0).all()):
    raise PrepError(
      'geometry',
      f'{path}: no voxel size (pixdim {pixdim.tolist()}, qform_code '
      f'{int(header["qform_code"])}, sform_code {int(header["sform_code"])}); '
      'restore the header from the source data rather than assume 1 mm',
    )


def check_finite(image: sitk.Image, where: str) -> None:
  """PrepError ``nan`` if a float volume holds NaN or infinity (a failed reconstruction or export)."""
  if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
    view = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(view).all():
      raise PrepError('nan', f'{where}: {int((~np.isfinite(view)).sum())} NaN/inf voxels')


def read_volume(path: str, *, ndim: int = 3) -> sitk.Image:
  """A scalar ``ndim``-D volume from .mhd/.mha/.nii/.nii.gz/.nrrd, checked for truncation, NaN and
  (NIfTI) a header that gives the voxel size."""
  check_regular_file(path)
  _check_complete(path)
  try:
    image = sitk.ReadImage(path)
  except RuntimeError as e:
    raise PrepError('corrupt', f'{path}: unreadable volume ({one_line(e)})') from None
  # A NIfTI 3D volume is often stored 4D with one time point.
  if image.GetDimension() == ndim + 1 and image.GetSize()[-1] == 1:
    image = image[(slice(None),) * ndim + (0,)]
  if image.GetDimension() != ndim or image.GetNumberOfComponentsPerPixel() != 1:
    raise PrepError(
      'dimensions',
      f'{path}: a {image.GetDimension()}-D image with '
      f'{image.GetNumberOfComponentsPerPixel()} components, expected a scalar {ndim}-D volume',
    )
  if min(image.GetSize()) < 1 or image.GetNumberOfPixels() == 0:
    raise PrepError('empty', f'{path}: size {image.GetSize()}')
  check_finite(image, path)
  return image


def to_hu(values, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
  """``round(values * slope + intercept)`` clipped to HU_RANGE, as int16 (DICOM modality LUT)."""
  hu = np.asarray(values, dtype=np.float32) * np.float32(slope) + np.float32(intercept)
  return np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)


def _series_geometry(headers: Sequence[DicomHeader]):
  """Sorted headers, spacing (col, row, slice), origin and direction; PrepError ``geometry`` on gaps."""
  first = headers[0]
  where = os.path.dirname(first.path) or first.path
  if len(headers) < 2:
    raise PrepError('dimensions', f'{where}: a series of {len(headers)} slice, not a volume')
  for h in headers:
    if h.frames != 1 or h.samples != 1:
      raise PrepError(
        'unsupported',
        f'{h.path}: {h.frames} frames x {h.samples} samples; '
        'only single-frame greyscale slices are read',
      )
    if (h.rows, h.columns) != (first.rows, first.columns):
      raise PrepError(
        'dimensions',
        f'{h.path}: {h.rows}x{h.columns} slice in a {first.rows}x{first.columns} series',
      )
    if h.position is None or h.orientation is None or h.pixel_spacing is None:
      raise PrepError(
        'geometry', f'{h.path}: no ImagePositionPatient/ImageOrientationPatient/PixelSpacing'
      )
    if not np.allclose(h.orientation, first.orientation, atol=1e-4) or not np.allclose(
      h.pixel_spacing, first.pixel_spacing, rtol=1e-4
    ):
      raise PrepError(
        'geometry', f'{h.path}: orientation or pixel spacing differs within the series'
      )
  row_dir = np.array(first.orientation[:3])
  col_dir = np.array(first.orientation[3:])
  normal = np.cross(row_dir, col_dir)
  if abs(np.linalg.norm(normal) - 1) > 1e-3:
    raise PrepError(
      'geometry',
      f'{where}: ImageOrientationPatient {first.orientation} is not two unit orthogonal directions',
    )
  positions = np.array([h.position for h in headers])
  depth = positions @ normal
  order = np.argsort(depth, kind='stable')
  steps = np.diff(depth[order])
  # Slices must stack along the normal; an in-plane drift per slice is a gantry tilt (a sheared
  # volume that a direction matrix cannot describe).
  drift = positions - positions[order[0]] - np.outer(depth - depth[order[0]], normal)
  if np.abs(drift).max() > 0.5 * min(first.pixel_spacing):
    raise PrepError(
      'geometry',
      f'{where}: slice positions drift {np.abs(drift).max():.2f} mm in-plane '
      '(gantry tilt); sheared series are not resampled',
    )
  if np.any(steps < 1e-3):
    raise PrepError('geometry', f'{where}: two slices at the same position (duplicate slice)')
  step = float(np.median(steps))
  if np.max(np.abs(steps - step)) > 0.1 * step:
    raise PrepError(
      'geometry',
      f'{where}: slice spacing varies from {steps.min():.3f} to '
      f'{steps.max():.3f} mm (missing slices?)',
    )
  sorted_headers = [headers[i] for i in order]
  direction = np.stack([row_dir, col_dir, normal], axis=1)
  spacing = (first.pixel_spacing[1], first.pixel_spacing[0], step)
  return sorted_headers, spacing, sorted_headers[0].position, direction


def read_dicom_series(headers: Sequence[DicomHeader]) -> sitk.Image:
  """One CT series as an int16 HU volume with its DICOM geometry.

  Slices are sorted along the slice normal and read one at a time by SimpleITK's GDCM (which applies
  each slice's own RescaleSlope/Intercept), so memory is one int16 volume plus one slice.
  """
  headers, spacing, origin, direction = _series_geometry(headers)
  volume = np.empty((len(headers), headers[0].rows, headers[0].columns), np.int16)
  for k, h in enumerate(headers):
    check_transfer_syntax(h, decoder='sitk')
    try:
      # A copy, not a view: a view does not keep the temporary image's buffer alive.
      pixels = sitk.GetArrayFromImage(sitk.ReadImage(h.path))
    except RuntimeError as e:
      raise PrepError('corrupt', f'{h.path}: unreadable pixels ({one_line(e)})') from None
    if pixels.shape[-2:] != volume.shape[1:]:
      raise PrepError('dimensions', f'{h.path}: pixels {pixels.shape} do not match Rows/Columns')
    volume[k] = to_hu(pixels.reshape(volume.shape[1:]))
  image = sitk.GetImageFromArray(volume)
  del volume
  image.SetSpacing([float(s) for s in spacing])
  image.SetOrigin([float(o) for o in origin])
  image.SetDirection(direction.ravel().tolist())
  return image


def to_canonical(image: sitk.Image) -> sitk.Image:
  """The same voxels permuted/flipped into CANONICAL order (no interpolation; obliquity is kept)."""
  return sitk.DICOMOrient(image, CANONICAL)


@dataclasses.dataclass(frozen=True)
class Grid:
  """A canonical output grid: origin (LPS mm, centre of voxel 0), spacing (x, y, z), size (x, y, z)."""

  origin: tuple[float, float, float]
  spacing: tuple[float, float, float]
  size: tuple[int, int, int]
  direction: tuple[float, ...] = tuple(float(v) for v in _CANONICAL_DIRECTION.ravel())

  def reference(self, pixel_id=sitk.sitkFloat32) -> sitk.Image:
    ref = sitk.Image([int(s) for s in self.size], pixel_id)
    ref.SetOrigin(self.origin)
    ref.SetSpacing(self.spacing)
    ref.SetDirection(self.direction)
    return ref


def canonical_grid(image: sitk.Image, spacing=1.0) -> Grid:
  """The CANONICAL grid of ``spacing`` mm spanning the physical box of the image's voxel centres,
  centred in it (so an axis-aligned 1 mm input maps voxel-for-voxel onto itself)."""
  spacing = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
  size = image.GetSize()
  corners = np.array(
    [
      image.TransformContinuousIndexToPhysicalPoint(
        [float(c * (n - 1)) for c, n in zip(corner, size)]
      )
      for corner in np.ndindex(2, 2, 2)
    ]
  )
  lo, hi = corners.min(0), corners.max(0)
  count = np.floor((hi - lo) / spacing + 1e-6).astype(int) + 1
  slack = (hi - lo) - (count - 1) * spacing
  origin = lo + slack / 2
  origin[2] = hi[2] - slack[2] / 2  # slices run toward inferior: start at the top
  return Grid(
    tuple(float(o) for o in origin), tuple(float(s) for s in spacing), tuple(int(c) for c in count)
  )


def resample(
  image: sitk.Image,
  spacing=1.0,
  *,
  mask: bool = False,
  grid: Grid | None = None,
  default: float = 0.0,
) -> sitk.Image:
  """``image`` on ``grid`` (default: its canonical grid at ``spacing`` mm). Images: linear, float32;
  masks: nearest neighbour, uint8 (labels must not blend). Points outside the input get ``default``."""
  grid = grid or canonical_grid(image, spacing)
  if mask:
    return sitk.Resample(
      image,
      grid.reference(sitk.sitkUInt8),
      sitk.Transform(),
      sitk.sitkNearestNeighbor,
      0,
      sitk.sitkUInt8,
    )
  return sitk.Resample(
    image, grid.reference(), sitk.Transform(), sitk.sitkLinear, float(default), sitk.sitkFloat32
  )


def slab_starts(depth: int, slab: int = 64, stride: int = 64) -> list[int]:
  """Start slices of ``slab``-slice windows every ``stride`` slices. When they do not end on the last
  slice, one more slab ends exactly there (overlapping its neighbour) so no slice is dropped."""
  if depth < slab:
    raise PrepError(
      'dimensions', f'{depth} slices at the target spacing, fewer than one {slab}-slice slab'
    )
  starts = list(range(0, depth - slab + 1, stride))
  if starts[-1] + slab < depth:
    starts.append(depth - slab)
  return starts


@dataclasses.dataclass(frozen=True)
class Slab:
  image: np.ndarray  # int16 (H, W, slab) HU, rows A→P, columns R→L, channels S→I
  mask: np.ndarray | None  # uint8 (H, W, slab), aligned with image
  spacing: np.ndarray  # float32 (3,): (row, col, slice) mm
  start: int  # first slice on the canonical grid


def _same_space(a: sitk.Image, b: sitk.Image) -> bool:
  if a.GetSize() != b.GetSize():
    return False
  half = 0.5 * min(a.GetSpacing())
  for corner in np.ndindex(2, 2, 2):
    index = [float(c * (n - 1)) for c, n in zip(corner, a.GetSize())]
    pa = np.array(a.TransformContinuousIndexToPhysicalPoint(index))
    pb = np.array(b.TransformContinuousIndexToPhysicalPoint(index))
    if np.abs(pa - pb).max() > half:
      return False
  return True


def align_to(image: sitk.Image, reference: sitk.Image, where: str = 'image') -> sitk.Image:
  """``image`` (a segmentation, or a sequence co-registered with ``reference``) on ``reference``'s
  voxel grid, or PrepError ``geometry``.

  * Same size and every corner voxel within half a voxel of the reference's: the reference's header
    is copied (exporters round spacing and origin; the voxels are the same ones).
  * The same voxel lattice stored in another orientation or axis order (a mask re-saved RAS instead
    of LPS, or with its origin at the other corner): resampled by nearest neighbour, which then only
    permutes voxels, so labels are neither blended nor moved.
  * Anything else (an origin shift, another spacing or tilt): rejected. Copying the header would
    misplace the mask by the difference, and interpolating a label map drawn on other voxels would
    blur its boundaries; which of the two headers is wrong cannot be told from the files.
  """
  if _same_space(reference, image):
    out = sitk.Image(image)
    out.CopyInformation(reference)
    return out

  def to_index(img):  # physical point -> continuous index, as a matrix and an offset
    m = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
    return np.linalg.inv(m), np.asarray(img.GetOrigin())

  inv, origin = to_index(image)
  ref = np.asarray(reference.GetDirection()).reshape(3, 3) * np.asarray(reference.GetSpacing())
  a = inv @ ref
  b = inv @ (np.asarray(reference.GetOrigin()) - origin)
  perm = np.rint(a)
  ok = (
    np.allclose(a, perm, atol=1e-3)
    and (np.abs(perm).sum(0) == 1).all()
    and (np.abs(perm).sum(1) == 1).all()
  )
  if ok:
    corners = np.array(
      [
        [c * (n - 1) for c, n in zip(corner, reference.GetSize())] for corner in np.ndindex(2, 2, 2)
      ],
      np.float64,
    )
    mapped = corners @ a.T + b
    nearest = np.rint(mapped)
    ok = (
      np.abs(mapped - nearest).max() < 0.5
      and (nearest >= 0).all()
      and (nearest <= np.asarray(image.GetSize()) - 1).all()
    )
  if not ok:
    shift = np.abs(np.asarray(image.GetOrigin()) - np.asarray(reference.GetOrigin())).max()
    raise PrepError(
      'geometry',
      f"{where}: its voxel grid is not the volume's (origins "
      f'{shift:.1f} mm apart, or another spacing/orientation); refusing to copy the '
      'header or interpolate labels',
    )
  return sitk.Resample(
    image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID()
  )


def ct_slabs(
  image: sitk.Image,
  *,
  mask: sitk.Image | None = None,
  spacing=1.0,
  slab: int = 64,
  stride: int = 64,
  where: str = '',
) -> Iterator[Slab]:
  """64-slice int16 HU slabs of a CT volume on its canonical ``spacing`` mm grid (see slab_starts)."""
  where = where or 'volume'
  if mask is not None and not _same_space(image, mask):
    raise PrepError(
      'geometry',
      f'{where}: the mask {mask.GetSize()} does not cover the image '
      f'{image.GetSize()} voxel for voxel',
    )
  grid = canonical_grid(image, spacing)
  try:
    starts = slab_starts(grid.size[2], slab, stride)
  except PrepError as e:
    raise PrepError(e.kind, f'{where}: {e.reason}') from None
  axis = np.asarray(grid.direction).reshape(3, 3)[:, 2]
  out_spacing = np.array([grid.spacing[1], grid.spacing[0], grid.spacing[2]], np.float32)
  for start in starts:
    origin = np.asarray(grid.origin) + axis * start * grid.spacing[2]
    sub = Grid(tuple(origin.tolist()), grid.spacing, (grid.size[0], grid.size[1], slab))
    hu = sitk.GetArrayFromImage(resample(image, grid=sub, default=HU_RANGE[0]))
    m = None
    if mask is not None:
      m = sitk.GetArrayFromImage(resample(mask, grid=sub, mask=True)).transpose(1, 2, 0)
      m = np.ascontiguousarray(m)
    yield Slab(np.ascontiguousarray(to_hu(hu).transpose(1, 2, 0)), m, out_spacing.copy(), start)
