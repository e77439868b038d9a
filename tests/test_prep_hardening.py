"""Bad real-world inputs that used to become wrong records (issue 15, items 1 and 2).

Each case is planted next to good files in the dataset's own layout; the run must reject it with a
precise kind (or, where the file is fine, write the correct record) and convert the good files.
"""

import os
import shutil
import struct
import zlib

import nibabel as nib
import numpy as np
from PIL import Image
import pydicom
import pytest
import SimpleITK as sitk

from data_prep import acdc, brats, chexpert, lits, runner
from data_prep import xray_common as xc
from data_prep.ops import xray
from tests.test_prep_volume_datasets import RAS_4MM, options, records, rejects, write_nifti
from tests.test_prep_volume_mri import _acdc_case, _brats_case
from tests.test_prep_xray_datasets import SIZE, _chexpert_row, _options, _records, _rejects, _save

HEADER = 'Path,Sex,Age,Frontal/Lateral,AP/PA,' + ','.join(xc.CHEXPERT_LABELS)
BAD = 'train/patient00100/study1/view1_frontal'


def _png(width, height, rows, *, interlace=0):
  """A grey 8-bit PNG whose IHDR says width x height but whose IDAT holds only ``rows`` rows."""

  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

  raw = b''.join(b'\x00' + bytes((40 + i) % 256 for i in range(width)) for _ in range(rows))
  return (
    b'\x89PNG\r\n\x1a\n'
    + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, interlace))
    + chunk(b'IDAT', zlib.compress(raw))
    + chunk(b'IEND', b'')
  )


def _chexpert(tmp_path, plant, ext='.jpg', row=None):
  """Two good patients plus one planted file at BAD + ext (``plant(path)`` writes it); returns
  (exit status, {key: kind}, records, the planted key)."""
  root, out = tmp_path / 'CheXpert-v1.0-small', tmp_path / 'out'
  lines = []
  for p in range(2):
    rel = f'train/patient{p:05d}/study1/view1_frontal.jpg'
    _save(str(root / rel), seed=p)
    lines.append(_chexpert_row(f'CheXpert-v1.0-small/{rel}', [1] * 14))
  rel = BAD + ext
  os.makedirs(root / os.path.dirname(rel), exist_ok=True)
  plant(str(root / rel))
  lines.append(row or _chexpert_row(f'CheXpert-v1.0-small/{rel}', [1] * 14))
  (root / 'train.csv').write_text('\n'.join([HEADER] + lines) + '\n')
  status = chexpert.build(_options(root, out, clahe=True))
  got = _records(out)
  assert sum(len(v) for v in got.values()) >= 2  # the good files always convert
  return status, _rejects(out), got, rel


def _only(got, tmp_path):
  """The record of the planted file: the one that is neither good patient's."""
  root = tmp_path / 'CheXpert-v1.0-small'
  expected = [
    xray.prepare_xray(
      xray.read_image_file(str(root / f'train/patient{p:05d}/study1/view1_frontal.jpg')), size=SIZE
    )[0]
    for p in range(2)
  ]
  rest = [
    r for rs in got.values() for r in rs if not any(np.array_equal(r['image'], e) for e in expected)
  ]
  assert len(rest) == 1
  return rest[0]


# ---------------------------------------------------------------------------------- 1. X-ray inputs
def test_constant_8bit_image_is_empty_not_an_all_white_record(tmp_path):
  status, kinds, got, rel = _chexpert(
    tmp_path,
    lambda p: Image.fromarray(np.zeros((40, 48), np.uint8)).save(p, format='PNG'),
    ext='.png',
  )
  assert status == 1 and kinds == {rel: 'empty'}
  assert sum(len(v) for v in got.values()) == 2
  with pytest.raises(xray.PrepError, match='constant'):
    xray.to_uint8(np.full((8, 8), 7, np.uint8))


def test_csv_row_cut_short_is_missing_label_not_all_negative(tmp_path):
  row = _chexpert_row(f'CheXpert-v1.0-small/{BAD}.jpg', [1] * 14)
  short = ','.join(row.split(',')[:9])  # the file ended (or a line was cut) after 4 observations
  status, kinds, got, rel = _chexpert(tmp_path, lambda p: _save(p, seed=7), row=short)
  assert status == 1 and kinds[rel] == 'missing_label'
  long = row + ',1.0'  # an unquoted comma: every label one column off
  status, kinds, _, _ = _chexpert(tmp_path / 'b', lambda p: _save(p, seed=7), row=long)
  assert status == 1 and kinds[rel] == 'format'


def test_png_whose_data_does_not_fill_its_header_is_truncated(tmp_path):
  for interlace in (0, 1):
    path = tmp_path / f'short{interlace}.png'
    path.write_bytes(_png(48, 40, rows=12, interlace=interlace))
    if not interlace:
      with Image.open(path) as img:  # what made this silent: PIL decodes it, zeros below row 12
        img.load()
        assert not np.asarray(img)[12:].any()
    with pytest.raises(xray.PrepError) as e:
      xray.read_image_file(str(path))
    assert e.value.kind == 'truncated' and 'header declares' in e.value.reason
  whole = tmp_path / 'whole.png'
  whole.write_bytes(_png(48, 40, rows=40))
  assert xray.read_image_file(str(whole)).shape == (40, 48)
  status, kinds, _, rel = _chexpert(
    tmp_path / 'run', lambda p: open(p, 'wb').write(_png(48, 40, rows=12)), ext='.png'
  )
  assert status == 1 and kinds == {rel: 'truncated'}


def test_exif_orientation_is_applied(tmp_path):
  stored = np.ascontiguousarray(np.rot90(np.arange(40 * 48).reshape(40, 48) % 251, 1)).astype(
    np.uint8
  )  # as the sensor wrote it: 48 x 40

  def plant(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(path, format='PNG', exif=exif)

  status, kinds, got, rel = _chexpert(tmp_path, plant, ext='.png')
  assert status == 0 and not kinds
  upright = np.rot90(stored, -1)  # clockwise: what a viewer shows, 40 x 48
  np.testing.assert_array_equal(
    xray.read_image_file(str(tmp_path / 'CheXpert-v1.0-small' / rel)), upright
  )
  np.testing.assert_array_equal(
    _only(got, tmp_path)['image'], xray.prepare_xray(upright, size=SIZE)[0]
  )


def test_float_tiff_in_unit_range_is_rescaled_not_truncated(tmp_path):
  y, x = np.mgrid[:40, :48]
  values = ((y + x) / 86.0).astype(np.float32)  # 0..1, as float exports store them

  status, kinds, got, rel = _chexpert(
    tmp_path, lambda p: Image.fromarray(values, mode='F').save(p, format='TIFF'), ext='.tif'
  )
  assert status == 0 and not kinds
  read = xray.read_image_file(str(tmp_path / 'CheXpert-v1.0-small' / rel))
  assert read.dtype == np.float32
  np.testing.assert_allclose(read, values)
  record = _only(got, tmp_path)
  np.testing.assert_array_equal(record['image'], xray.prepare_xray(values, size=SIZE)[0])
  assert len(np.unique(record['image'])) > 20  # a gradient, not the 0/1 of a truncating convert


# -------------------------------------------------------------------------- 2. kinds that say what
def test_dicom_in_an_image_csv_is_unsupported_with_a_pointer(tmp_path):
  source = pydicom.data.get_testdata_file('CT_small.dcm')
  status, kinds, _, rel = _chexpert(tmp_path, lambda p: shutil.copy(source, p), ext='.jpg')
  assert status == 1 and kinds == {rel: 'unsupported'}
  with pytest.raises(xray.PrepError, match='data_prep.dicom_xray'):
    xray.read_image_file(source)


def test_directory_named_like_a_file_is_not_a_file(tmp_path):
  status, kinds, _, rel = _chexpert(tmp_path, os.makedirs)
  assert status == 1 and kinds == {rel: 'not_a_file'}


def test_decompression_bomb_is_its_own_kind(tmp_path):
  # 20000 x 20000 declared (4e8 pixels, over PIL's 1.8e8 limit), a few bytes of data.
  status, kinds, _, rel = _chexpert(
    tmp_path, lambda p: open(p, 'wb').write(_png(20000, 20000, 1)), ext='.png'
  )
  assert status == 1 and kinds == {rel: 'decompression_bomb'}


def test_zero_byte_and_directory_nifti(tmp_path):
  raw, out = tmp_path / 'raw', tmp_path / 'out'
  vol, seg = np.full((20, 20, 40), -100, np.int16), np.zeros((20, 20, 40), np.uint8)
  write_nifti(str(raw / 'volume-0.nii'), vol, RAS_4MM)
  write_nifti(str(raw / 'segmentation-0.nii'), seg, RAS_4MM, np.uint8)
  (raw / 'volume-1.nii').write_bytes(b'')
  (raw / 'volume-2.nii.gz').write_bytes(b'')
  for n in (1, 2):
    write_nifti(str(raw / f'segmentation-{n}.nii'), seg, RAS_4MM, np.uint8)
  items, bad = lits.list_items(str(raw))
  assert runner.run('lits', items, lits.convert, options(raw, out), rejects=bad) == 1
  assert {(r['key'], r['kind']) for r in rejects(out)} == {
    ('volume-1.nii', 'empty'),
    ('volume-2.nii.gz', 'empty'),
  }
  assert len(records(out)) == 2
  os.makedirs(raw / 'folder.nii')
  from data_prep import ops

  with pytest.raises(ops.PrepError) as e:
    ops.read_volume(str(raw / 'folder.nii'))
  assert e.value.kind == 'not_a_file'


# --------------------------------------------------------------------------------- 1. volume inputs
def _lits_case(raw, n, seg_affine=RAS_4MM, flip_seg=False, vol_header=None, depth=40):
  vol = np.full((20, 20, depth), -100, np.int16)
  seg = np.zeros(vol.shape, np.uint8)
  seg[4:10, 5:15, :], vol[4:10, 5:15, :] = 1, 60  # liver off-centre in i, so a flip would show
  if vol_header is None:
    write_nifti(str(raw / f'volume-{n}.nii'), vol, RAS_4MM)
  else:
    os.makedirs(raw, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, None, vol_header), str(raw / f'volume-{n}.nii'))
  if flip_seg:  # the same voxels stored with i reversed, the affine saying so (a re-saved mask)
    seg = seg[::-1]
    seg_affine = RAS_4MM @ np.array([[-1, 0, 0, 19], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
  if vol_header is not None:
    seg_affine = None
  write_nifti(str(raw / f'segmentation-{n}.nii'), seg, seg_affine, np.uint8)


def test_lits_segmentation_on_other_voxels_is_rejected_and_reoriented_one_aligned(tmp_path):
  raw, out = tmp_path / 'raw', tmp_path / 'out'
  _lits_case(raw, 0)
  _lits_case(raw, 1, flip_seg=True)
  shifted = RAS_4MM.copy()
  shifted[0, 3] = 12.0  # 3 voxels off: CopyInformation would have moved the liver 12 mm
  _lits_case(raw, 2, seg_affine=shifted)
  items, bad = lits.list_items(str(raw))
  assert runner.run('lits', items, lits.convert, options(raw, out), rejects=bad) == 1
  assert [(r['key'], r['kind']) for r in rejects(out)] == [('volume-2.nii', 'geometry')]
  got = records(out)
  assert len(got) == 4  # cases 0 and 1, two slabs each
  by_mask = {}
  for r in got:
    by_mask.setdefault(r['image'].tobytes(), []).append(r['mask'])
  for masks in by_mask.values():  # the reoriented mask equals the original one, slab for slab
    assert len(masks) in (2, 4)
    for m in masks[1:]:
      np.testing.assert_array_equal(m, masks[0])
  for r in got:
    assert (r['image'][..., 32][r['mask'] == 1] == 60).mean() > 0.8


def test_nifti_without_geometry_is_rejected_not_read_as_1mm(tmp_path):
  raw, out = tmp_path / 'raw', tmp_path / 'out'
  _lits_case(raw, 0)
  _lits_case(raw, 1, vol_header=nib.Nifti1Header(), depth=70)  # read as 1 mm, 70 slices: a slab
  path = raw / 'volume-1.nii'
  data = bytearray(path.read_bytes())
  data[80:92] = struct.pack('<3f', 0, 0, 0)  # pixdim[1:4] (nibabel refuses to write 0 itself)
  path.write_bytes(bytes(data))
  header = nib.load(str(path)).header
  assert int(header['sform_code']) == int(header['qform_code']) == 0
  items, bad = lits.list_items(str(raw))
  assert runner.run('lits', items, lits.convert, options(raw, out), rejects=bad) == 1
  assert [(r['key'], r['kind']) for r in rejects(out)] == [('volume-1.nii', 'geometry')]
  assert len(records(out)) == 2


def test_brats_and_acdc_masks_on_other_voxels_are_geometry_rejects(tmp_path):
  raw, out = tmp_path / 'brats', tmp_path / 'out_brats'
  _brats_case(raw, 'BraTS20_Training_001')
  _brats_case(raw, 'BraTS20_Training_002')
  seg_path = raw / 'BraTS20_Training_002' / 'BraTS20_Training_002_seg.nii.gz'
  seg = nib.load(str(seg_path))
  moved = seg.affine.copy()
  moved[1, 3] += 5.0
  nib.save(nib.Nifti1Image(np.asarray(seg.dataobj), moved), str(seg_path))
  items, bad = brats.list_items(str(raw))
  assert (
    runner.run('brats2020', items, brats.convert, options(raw, out, mni=False), rejects=bad) == 1
  )
  assert [(r['key'], r['kind']) for r in rejects(out)] == [('BraTS20_Training_002', 'geometry')]
  assert records(out, modality='mri')
  raw, out = tmp_path / 'acdc', tmp_path / 'out_acdc'
  _acdc_case(raw / 'training', 'patient001')
  _acdc_case(raw / 'training', 'patient002')
  gt_path = raw / 'training' / 'patient002' / 'patient002_frame01_gt.nii.gz'
  gt = nib.load(str(gt_path))
  flipped = gt.affine @ np.diag([-1.0, 1, 1, 1])  # orientation flipped about the origin
  nib.save(nib.Nifti1Image(np.asarray(gt.dataobj), flipped), str(gt_path))
  items, bad = acdc.list_items(str(raw))
  assert (
    runner.run(
      'acdc', items, acdc.convert, options(raw, out, n4=False), rejects=bad, split_of=acdc.split_of
    )
    == 1
  )
  assert [(r['key'], r['kind']) for r in rejects(out)] == [('training/patient002', 'geometry')]
  assert len(records(out, 'train', 'mri')) == 8


def _ball_image(array_zyx):
  img = sitk.GetImageFromArray(array_zyx.astype(np.float32))
  img.SetSpacing((2.0,) * 3)
  return img


def test_unstripped_head_fails_the_brats_skull_strip_guard(monkeypatch):
  """The stub template of the MNI wiring test (a 14 mm ball brain, registration = identity): a brain
  passes; a head (skull shell to 18 mm, zero outside) and a head in MRI noise are ``unstripped``.
  The head with a zero background had brain Dice 0.64, which passed the old 0.6 threshold."""
  from data_prep import ops

  z, y, x = np.meshgrid(np.arange(20), np.arange(24), np.arange(24), indexing='ij')
  radius = np.sqrt((x * 2 - 24) ** 2 + (y * 2 - 24) ** 2 + (z * 2 - 20) ** 2)
  template = _ball_image((radius <= 14) * 50.0)
  brain = sitk.Cast(template > 0, sitk.sitkUInt8)
  monkeypatch.setattr(ops, 'mni_template', lambda resolution: (template, brain))
  monkeypatch.setattr(ops, 'register', lambda moving, fixed, **kw: sitk.TranslationTransform(3))
  stripped = (radius <= 14) * 100.0
  head = stripped + ((radius > 14) & (radius <= 18)) * 300.0
  noisy = head + np.random.default_rng(0).uniform(1, 5, head.shape)
  extra = {'n4': False, 'mni': True}
  vols = lambda a: {s: _ball_image(a) for s in brats.SEQUENCES}
  brats.to_standard_space(vols(stripped), None, extra, 'case')
  dice = 2 * (radius <= 14).sum() / ((radius <= 14).sum() + (radius <= 18).sum())
  assert 0.6 < dice < 0.8
  for volume in (head, noisy):
    with pytest.raises(runner.Reject) as e:
      brats.to_standard_space(vols(volume), None, extra, 'case')
    assert e.value.kind == 'unstripped', e.value.reason
