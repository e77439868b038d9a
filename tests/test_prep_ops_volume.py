"""data_prep.ops: DICOM headers, CT volumes, HU, canonical orientation, 1 mm resampling, slabs."""

import copy
import dataclasses
import gzip
import os

import nibabel as nib
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
import pytest
import SimpleITK as sitk

from data_prep import ops
from data_prep.ops import dicom

CT_SMALL = get_testdata_file('CT_small.dcm')
MR_SMALL = get_testdata_file('MR_small.dcm')


def _image(array_zyx, spacing, origin=(0.0, 0.0, 0.0), direction=np.eye(3)):
  img = sitk.GetImageFromArray(np.asarray(array_zyx))
  img.SetSpacing([float(s) for s in spacing])
  img.SetOrigin([float(o) for o in origin])
  img.SetDirection(np.asarray(direction, float).ravel().tolist())
  return img


def _write_series(
  folder,
  stored,
  *,
  spacing=(0.8, 0.7),
  step=2.5,
  origin=(-10.0, -20.0, 30.0),
  orientation=(1, 0, 0, 0, 1, 0),
  slopes=None,
  intercept=-1024.0,
):
  """One CT series from CT_small's header: slice k of ``stored`` at origin + k * step along the normal,
  files named in reverse order so sorting by name would be wrong."""
  base = pydicom.dcmread(CT_SMALL)
  normal = np.cross(orientation[:3], orientation[3:])
  paths = []
  for k, plane in enumerate(stored):
    ds = copy.deepcopy(base)
    ds.Rows, ds.Columns = plane.shape
    ds.PixelSpacing = [spacing[0], spacing[1]]
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = (np.asarray(origin) + k * step * normal).tolist()
    ds.RescaleSlope = 1.0 if slopes is None else slopes[k]
    ds.RescaleIntercept = intercept
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.PixelData = np.ascontiguousarray(plane, np.int16).tobytes()
    path = os.path.join(folder, f'IM{len(stored) - k:04d}.dcm')
    ds.save_as(path)
    paths.append(path)
  return paths


def test_to_hu_applies_slope_intercept_rounds_and_clips():
  stored = np.array([0, 1000, 2049, 9000, -50, 3], np.int32)
  got = ops.to_hu(stored, slope=0.5, intercept=-1024)
  want = np.clip(np.rint(stored * 0.5 - 1024), -1024, 3071).astype(np.int16)
  assert got.dtype == np.int16
  np.testing.assert_array_equal(got, want)
  assert got[0] == -1024 and got[3] == 3071 and got[5] == -1022  # -1022.5 rounds half to even


def test_read_header_ct_small_has_geometry_and_no_identifying_fields():
  h = ops.read_header(CT_SMALL)
  ds = pydicom.dcmread(CT_SMALL)
  assert (h.rows, h.columns, h.frames, h.samples) == (128, 128, 1, 1)
  assert h.modality == 'CT' and h.photometric == 'MONOCHROME2'
  assert (h.slope, h.intercept) == (1.0, -1024.0)
  np.testing.assert_allclose(h.pixel_spacing, [float(v) for v in ds.PixelSpacing])
  np.testing.assert_allclose(h.position, [float(v) for v in ds.ImagePositionPatient])
  assert h.subject_id == str(ds.PatientID) and h.series_uid == str(ds.SeriesInstanceUID)
  fields = {f.name for f in dataclasses.fields(h)}
  assert not fields & {'patient_name', 'birth_date', 'accession', 'study_date', 'institution'}
  # The repr (logs, tracebacks) carries neither raw identifier nor the patient's name.
  assert str(ds.PatientID) not in repr(h) and str(ds.PatientName) not in repr(h)
  assert h.series_uid not in repr(h)


def test_mr_small_header_and_normalisation():
  h = ops.read_header(MR_SMALL)
  ds = pydicom.dcmread(MR_SMALL)
  assert h.modality == 'MR' and (h.rows, h.columns) == (ds.Rows, ds.Columns)
  np.testing.assert_allclose(h.orientation, [float(v) for v in ds.ImageOrientationPatient])
  pixels = ds.pixel_array.astype(np.float32)
  z = ops.instance_normalise(pixels)
  assert abs(z[pixels != 0].mean()) < 1e-4 and abs(z[pixels != 0].std() - 1) < 1e-4


def test_ct_small_series_through_slabs(tmp_path):
  """The real CT_small slice as a two-slice series 5 mm apart: 1 mm slabs keep its HU statistics."""
  ds = pydicom.dcmread(CT_SMALL)
  hu = ops.to_hu(ds.pixel_array, float(ds.RescaleSlope), float(ds.RescaleIntercept))
  paths = _write_series(
    str(tmp_path),
    [ds.pixel_array] * 2,
    spacing=[float(v) for v in ds.PixelSpacing],
    step=5.0,
    intercept=float(ds.RescaleIntercept),
  )
  image = ops.read_dicom_series([ops.read_header(p) for p in paths])
  slabs = list(ops.ct_slabs(image, slab=4, stride=4))
  side = int(np.floor(127 * float(ds.PixelSpacing[0]))) + 1  # 1 mm samples over the 84 mm field
  assert [s.start for s in slabs] == [0, 2] and slabs[0].image.shape == (side, side, 4)
  for channel in range(4):  # every 1 mm slice between the two identical slices is that slice
    got = slabs[0].image[..., channel]
    assert abs(got.mean() - hu.mean()) < 5 and got.min() >= hu.min() and got.max() <= hu.max()


def test_read_header_rejects_missing_foreign_and_truncated_files(tmp_path):
  with pytest.raises(ops.PrepError) as e:
    ops.read_header(str(tmp_path / 'nope.dcm'))
  assert e.value.kind == 'missing_file'
  foreign = tmp_path / 'notes.dcm'
  foreign.write_bytes(b'this is not a DICOM file\n' * 20)
  with pytest.raises(ops.PrepError) as e:
    ops.read_header(str(foreign))
  assert e.value.kind == 'corrupt' and 'notes.dcm' in str(e.value) and '\n' not in str(e.value)
  cut = tmp_path / 'cut.dcm'
  cut.write_bytes(open(CT_SMALL, 'rb').read()[:-5000])
  with pytest.raises(ops.PrepError) as e:
    ops.read_header(str(cut))
  assert e.value.kind == 'truncated' and 'cut.dcm' in str(e.value)


def test_transfer_syntax_checks_name_the_syntax():
  h = ops.read_header(CT_SMALL)
  ops.check_transfer_syntax(h, decoder='sitk')
  ops.check_transfer_syntax(h, decoder='pydicom')
  mpeg = dataclasses.replace(h, transfer_syntax='1.2.840.10008.1.2.4.100')
  with pytest.raises(ops.PrepError) as e:
    ops.check_transfer_syntax(mpeg, decoder='sitk')
  assert (
    e.value.kind == 'unsupported' and 'MPEG2' in str(e.value) and 'CT_small.dcm' in str(e.value)
  )


def test_sitk_reads_the_compressed_syntaxes_it_claims():
  import data_store

  data = os.path.join(os.path.dirname(data_store.__file__), 'data')
  for name in (
    'JPEG-LL.dcm',
    'emri_small_jpeg_ls_lossless.dcm',
    'emri_small_jpeg_2k_lossless.dcm',
    'emri_small_RLE.dcm',
  ):
    h = ops.read_header(os.path.join(data, name))
    assert h.transfer_syntax in dicom.SITK_SYNTAXES, name
    assert sitk.ReadImage(h.path).GetSize()[:2] == (h.columns, h.rows), name


def test_ct_small_hu_through_sitk_matches_pydicom():
  """The real CT_small.dcm: SimpleITK's GDCM applies the modality LUT as pydicom does."""
  ds = pydicom.dcmread(CT_SMALL)
  want = ops.to_hu(ds.pixel_array, float(ds.RescaleSlope), float(ds.RescaleIntercept))
  got = ops.to_hu(sitk.GetArrayFromImage(sitk.ReadImage(CT_SMALL))[0])
  np.testing.assert_array_equal(got, want)


def test_dicom_series_round_trip_per_slice_rescale_and_geometry(tmp_path):
  rng = np.random.default_rng(0)
  stored = rng.integers(0, 3000, size=(5, 12, 10)).astype(np.int16)
  slopes = [1.0, 0.5, 2.0, 1.0, 1.5]
  paths = _write_series(str(tmp_path), stored, slopes=slopes)
  junk = tmp_path / 'junk.dcm'
  junk.write_bytes(b'\0' * 300)
  series, rejects = ops.group_series(paths + [str(junk)])
  assert len(series) == 1 and len(next(iter(series.values()))) == 5
  assert [(p, kind) for p, kind, _ in rejects] == [(str(junk), 'corrupt')]
  image = ops.read_dicom_series(next(iter(series.values())))
  want = np.stack([ops.to_hu(stored[k], slopes[k], -1024) for k in range(5)])
  np.testing.assert_array_equal(sitk.GetArrayFromImage(image), want)
  assert image.GetPixelID() == sitk.sitkInt16
  np.testing.assert_allclose(image.GetSpacing(), (0.7, 0.8, 2.5))
  np.testing.assert_allclose(image.GetOrigin(), (-10.0, -20.0, 30.0))
  np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel())


def test_dicom_series_is_sorted_along_the_normal_and_canonicalised(tmp_path):
  """Columns stored patient left→right (row direction -x) and slices listed foot to head: the
  canonical volume has patient right on the left and the top slice first."""
  stored = np.zeros((4, 6, 8), np.int16)
  stored[3, 1, 0] = 2000
  paths = _write_series(
    str(tmp_path), stored, orientation=(-1, 0, 0, 0, 1, 0), step=1.0, intercept=0.0
  )
  series, _ = ops.group_series(paths)
  image = ops.to_canonical(ops.read_dicom_series(next(iter(series.values()))))
  np.testing.assert_allclose(image.GetDirection(), np.diag([1.0, 1.0, -1.0]).ravel())
  arr = sitk.GetArrayFromImage(image)  # (slice S→I, row A→P, col R→L)
  # Stored columns run toward -x (patient right), so stored column 0 is the most leftward: the last
  # canonical column. Normal = (-x) × (+y) = -z: each stored slice is 1 mm lower, stored[3] lowest.
  assert arr[3, 1, 7] == 2000 and (arr == 2000).sum() == 1


@pytest.mark.parametrize('case', ['gap', 'duplicate', 'one_slice', 'mixed_size', 'tilt'])
def test_dicom_series_geometry_rejects(tmp_path, case):
  stored = np.zeros((5, 6, 6), np.int16)
  paths = _write_series(str(tmp_path), stored)
  headers = [ops.read_header(p) for p in paths]
  if case == 'gap':
    headers.pop(2)
  elif case == 'duplicate':
    headers.append(dataclasses.replace(headers[0], path=headers[0].path + '.copy'))
  elif case == 'one_slice':
    headers = headers[:1]
  elif case == 'tilt':  # each slice 0.5 mm further anterior: a 11° gantry tilt
    headers = [
      dataclasses.replace(h, position=(h.position[0], h.position[1] - 0.5 * k, h.position[2]))
      for k, h in enumerate(headers)
    ]
  else:
    headers[1] = dataclasses.replace(headers[1], rows=7)
  with pytest.raises(ops.PrepError) as e:
    ops.read_dicom_series(headers)
  assert (
    e.value.kind
    == {
      'gap': 'geometry',
      'duplicate': 'geometry',
      'one_slice': 'dimensions',
      'mixed_size': 'dimensions',
      'tilt': 'geometry',
    }[case]
  )


def test_read_volume_mhd_and_nifti_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  data = rng.integers(-1024, 2000, size=(7, 9, 11)).astype(np.int16)  # (z, y, x)
  img = _image(data, (0.6, 0.7, 2.0), origin=(5.0, -3.0, 12.0))
  sitk.WriteImage(img, str(tmp_path / 'a.mhd'))
  got = ops.read_volume(str(tmp_path / 'a.mhd'))
  np.testing.assert_array_equal(sitk.GetArrayFromImage(got), data)
  np.testing.assert_allclose(got.GetSpacing(), (0.6, 0.7, 2.0))
  np.testing.assert_allclose(got.GetOrigin(), (5.0, -3.0, 12.0))
  # NIfTI written by nibabel (RAS affine), 4-D with one time point as LiTS-style exports often are.
  affine = np.diag([-0.6, -0.7, 2.0, 1.0])
  affine[:3, 3] = (-5.0, 3.0, 12.0)  # LPS (5, -3, 12)
  nib.save(nib.Nifti1Image(data.transpose(2, 1, 0)[..., None], affine), str(tmp_path / 'a.nii.gz'))
  got = ops.read_volume(str(tmp_path / 'a.nii.gz'))
  assert got.GetDimension() == 3
  np.testing.assert_array_equal(sitk.GetArrayFromImage(got), data)
  np.testing.assert_allclose(got.GetOrigin(), (5.0, -3.0, 12.0), atol=1e-5)
  np.testing.assert_allclose(got.GetSpacing(), (0.6, 0.7, 2.0), atol=1e-6)
  # A 4-D cine (ACDC) is read whole when asked for.
  nib.save(
    nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.int16), np.eye(4)), str(tmp_path / 'cine.nii.gz')
  )
  assert ops.read_volume(str(tmp_path / 'cine.nii.gz'), ndim=4).GetSize() == (4, 5, 6, 3)


def _bad_volumes(tmp_path):
  data = np.arange(8 * 9 * 10, dtype=np.int16).reshape(8, 9, 10)
  sitk.WriteImage(_image(data, (1, 1, 1)), str(tmp_path / 'cut.mhd'))
  raw = tmp_path / 'cut.raw'
  raw.write_bytes(raw.read_bytes()[:500])
  nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / 'full.nii.gz'))
  blob = (tmp_path / 'full.nii.gz').read_bytes()
  (tmp_path / 'cut.nii.gz').write_bytes(blob[: len(blob) // 2])
  (tmp_path / 'cut.nii').write_bytes(gzip.decompress(blob)[:900])
  (tmp_path / 'junk.nii.gz').write_bytes(b'\x1f\x8b' + b'junk' * 64)
  (tmp_path / 'junk.mha').write_bytes(b'junk' * 64)
  nan = np.ones((8, 9, 10), np.float32)
  nan[2, 3, 4] = np.nan
  nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / 'nan.nii.gz'))
  sitk.WriteImage(sitk.GetImageFromArray(nan), str(tmp_path / 'nan.mhd'))
  nib.save(nib.Nifti1Image(np.zeros((8, 9), np.int16), np.eye(4)), str(tmp_path / 'flat.nii.gz'))
  nib.save(
    nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.int16), np.eye(4)), str(tmp_path / 'cine.nii.gz')
  )
  (tmp_path / 'orphan.mhd').write_text(
    'NDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = gone.raw\n'
  )
  return {
    'cut.mhd': 'truncated',
    'cut.nii.gz': 'truncated',
    'cut.nii': 'truncated',
    'junk.nii.gz': 'corrupt',
    'junk.mha': 'corrupt',
    'nan.nii.gz': 'nan',
    'nan.mhd': 'nan',
    'flat.nii.gz': 'dimensions',
    'cine.nii.gz': 'dimensions',
    'orphan.mhd': 'missing_file',
    'absent.nii.gz': 'missing_file',
  }


def test_read_volume_rejects_each_bad_input_with_its_kind(tmp_path):
  for name, kind in _bad_volumes(tmp_path).items():
    with pytest.raises(ops.PrepError) as e:
      ops.read_volume(str(tmp_path / name))
    assert e.value.kind == kind, (name, str(e.value))
    named = {'cut.mhd': 'cut.raw', 'orphan.mhd': 'gone.raw'}.get(name, name)
    assert named in str(e.value), str(e.value)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('direction', ['lps', 'ras', 'sagittal'])
def test_box_at_known_mm_survives_orientation_and_resampling(direction):
  """A box at known LPS millimetres, stored with anisotropic spacing in three orientations, lands on
  the right rows (A→P), columns (R→L) and slices (S→I) of the 1 mm canonical slabs, mask aligned."""
  matrices = {
    'lps': np.eye(3),
    'ras': np.diag([-1.0, -1.0, 1.0]),
    # columns along -z, rows along +y, slices along +x: a sagittal acquisition
    'sagittal': np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]),
  }
  size, spacing = (30, 36, 28), (2.2, 0.9, 1.7)  # (x, y, z) index order, as sitk
  img = _image(
    np.full(size[::-1], -1000, np.int16),
    spacing,
    origin=(10.0, -15.0, 40.0),
    direction=matrices[direction],
  )
  centre = np.array(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size]))
  box = centre[:, None] + np.array(
    [[-4.0, 8.0], [-5.0, 3.0], [-6.0, 7.0]]
  )  # LPS mm: x, y, z ranges
  grid_idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing='ij'), -1).reshape(-1, 3)
  points = np.array(img.GetOrigin()) + (grid_idx * spacing) @ matrices[direction].T
  inside = np.all((points >= box[:, 0]) & (points <= box[:, 1]), axis=1)
  arr = np.full(size, -1000, np.int16)
  arr[tuple(grid_idx[inside].T)] = 1000
  image = _image(
    arr.transpose(2, 1, 0), spacing, origin=(10.0, -15.0, 40.0), direction=matrices[direction]
  )
  mask = sitk.Cast(image > 0, sitk.sitkUInt8)
  grid = ops.canonical_grid(image)
  slabs = list(ops.ct_slabs(image, mask=mask, slab=8, stride=8))
  depth = grid.size[2]
  vol = np.zeros((grid.size[1], grid.size[0], depth), np.int16)
  msk = np.zeros(vol.shape, np.uint8)
  for s in slabs:
    assert s.image.dtype == np.int16 and s.image.shape == (grid.size[1], grid.size[0], 8)
    np.testing.assert_array_equal(s.spacing, [1, 1, 1])
    vol[..., s.start : s.start + 8] = s.image
    msk[..., s.start : s.start + 8] = s.mask
  rows, cols, slices = np.nonzero(vol > 0)
  # Expected index ranges: row = y - oy, col = x - ox, slice = oz - z (slices run inferior).
  ox, oy, oz = grid.origin
  tol = max(spacing) / 2 + 1
  for got, lo, hi in (
    (cols, box[0, 0] - ox, box[0, 1] - ox),
    (rows, box[1, 0] - oy, box[1, 1] - oy),
    (slices, oz - box[2, 1], oz - box[2, 0]),
  ):
    assert abs(got.min() - lo) <= tol and abs(got.max() - hi) <= tol, (
      direction,
      got.min(),
      got.max(),
      lo,
      hi,
    )
  assert set(np.unique(msk)) == {0, 1}
  np.testing.assert_allclose(np.argwhere(msk).mean(0), np.argwhere(vol > 0).mean(0), atol=0.75)


def test_axis_aligned_1mm_volume_maps_voxel_for_voxel():
  rng = np.random.default_rng(2)
  data = rng.integers(-1024, 3000, size=(70, 9, 7)).astype(np.int16)  # (slice S→I, row, col)
  image = _image(data, (1, 1, 1), origin=(-3.0, 4.0, 100.0), direction=np.diag([1.0, 1.0, -1.0]))
  slabs = list(ops.ct_slabs(image))
  assert [s.start for s in slabs] == [0, 6]  # 70 slices: one slab, then one ending on slice 69
  np.testing.assert_array_equal(slabs[0].image, data[:64].transpose(1, 2, 0))
  np.testing.assert_array_equal(slabs[1].image, data[6:].transpose(1, 2, 0))


def test_slab_starts_cover_every_slice():
  assert ops.slab_starts(64) == [0]
  assert ops.slab_starts(130) == [0, 64, 66]
  assert ops.slab_starts(128) == [0, 64]
  assert ops.slab_starts(100, stride=32) == [0, 32, 36]
  with pytest.raises(ops.PrepError) as e:
    ops.slab_starts(63)
  assert e.value.kind == 'dimensions'


def test_slab_content_for_a_known_depth_and_thick_slices():
  """5 mm slices, value = 10 * z mm: the 1 mm slabs interpolate linearly between slices."""
  z = np.arange(30) * 5.0  # 145 mm of slices, LPS z from 0 up to 145
  data = np.broadcast_to((10 * z)[:, None, None], (30, 4, 4)).astype(np.int16)
  image = _image(data, (1.0, 1.0, 5.0))
  slabs = list(ops.ct_slabs(image))
  assert [s.start for s in slabs] == [0, 64, 82]  # 146 slices at 1 mm
  for s in slabs:
    expected_z = 145.0 - (s.start + np.arange(64))  # channel 0 is the most superior
    np.testing.assert_array_equal(s.image[0, 0], np.clip(np.rint(10 * expected_z), -1024, 3071))


def test_short_volume_and_misaligned_mask_are_rejected():
  image = _image(np.zeros((20, 8, 8), np.int16), (1, 1, 2))  # 39 mm of slices
  with pytest.raises(ops.PrepError) as e:
    next(ops.ct_slabs(image, where='short.mhd'))
  assert e.value.kind == 'dimensions' and 'short.mhd' in str(e.value)
  image = _image(np.zeros((80, 8, 8), np.int16), (1, 1, 1))
  mask = _image(np.zeros((80, 8, 8), np.uint8), (1, 1, 1), origin=(0.0, 0.0, 5.0))
  with pytest.raises(ops.PrepError) as e:
    next(ops.ct_slabs(image, mask=mask, where='seg.nii'))
  assert e.value.kind == 'geometry' and 'seg.nii' in str(e.value)


def test_prep_error_is_one_line_with_a_known_kind():
  e = ops.PrepError('corrupt', 'a.nii: bad\n  multi-line ITK text')
  assert (
    isinstance(e, ValueError) and str(e) == 'a.nii: bad multi-line ITK text' and e.kind == 'corrupt'
  )
  with pytest.raises(ValueError):
    ops.PrepError('mystery', 'x')
  again = copy.deepcopy(e)  # goes through __reduce__, as a process pool's copy would
  assert (again.kind, str(again)) == ('corrupt', str(e))
