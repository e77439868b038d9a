"""CT dataset converters (LUNA16, LiTS, DICOM CT, LIDC-IDRI) on miniature copies of each release's
real layout and formats, written with SimpleITK, nibabel and pydicom (MRI: test_prep_volume_mri.py).

Volumes are tiny (about 20^2 x 30 voxels of 2.5-4 mm) so a 1 mm, 64-slice slab still fits; every test
reads the records back through ``shards.open_source`` and checks values, spacing, orientation, labels
and that masks sit on the structures they label.
"""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from aacp_jax.data import shards
from data_prep import dicom_ct, lidc_idri, lits, luna16, privacy, runner, volume_common
from data_prep.bench_prep import write_dicom_series

SALT = b'test-salt-0123456789'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def options(raw, out, **extra):
  # No val/test draw: tiny sets would otherwise land in random splits; official splits still apply.
  return runner.Options(
    input=str(raw),
    output=str(out),
    salt=SALT,
    workers=0,
    progress=False,
    val_fraction=0.0,
    test_fraction=0.0,
    extra=extra,
  )


def records(out, split='train', modality='ct'):
  src = shards.open_source(str(out), split, modality)
  return [src[i] for i in range(len(src))]


def rejects(out):
  with open(os.path.join(out, 'rejects.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def write_mhd(path, volume_zyx, spacing, origin, direction=None):
  image = sitk.GetImageFromArray(volume_zyx.astype(np.int16))
  image.SetSpacing(spacing)
  image.SetOrigin(origin)
  if direction is not None:
    image.SetDirection(direction)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sitk.WriteImage(image, path)  # .mhd header + .raw data, as LUNA16 ships them


def write_nifti(path, volume_xyz, affine, dtype=np.int16):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(volume_xyz, dtype), affine), path)


# ---------------------------------------------------------------------------------------------- LUNA16
def _luna_volume():
  """(z, y, x) HU: lung air, body wall, a marker in the patient's right-anterior corner of every slice."""
  v = np.full((30, 20, 20), -800, np.int16)  # 2.5 mm slices, 4 mm pixels: 75 x 80 x 80 mm
  v[:, :, :2] = 40
  v[:, :3, 2:5] = 700  # anterior (low y), patient right (low x)
  return v


def test_luna16_slabs_masks_labels_and_orientation(tmp_path):
  raw, out = tmp_path / 'raw', tmp_path / 'out'
  uid_a, uid_b, uid_c = (
    '1.3.6.1.4.1.14519.5.2.1.6279.6001.1',
    '1.3.6.1.4.1.14519.5.2.1.6279.6001.2',
    '1.3.6.1.4.1.14519.5.2.1.6279.6001.3',
  )
  origin = (-40.0, -30.0, -300.0)
  vol = _luna_volume()
  # A 12 mm nodule at a world position; painted into the image where annotations.csv says it is.
  centre = np.array([-4.0, 10.0, -270.0])
  zz, yy, xx = np.meshgrid(*[np.arange(n) for n in vol.shape], indexing='ij')
  world = np.stack([origin[0] + 4 * xx, origin[1] + 4 * yy, origin[2] + 2.5 * zz], -1)
  vol[np.linalg.norm(world - centre, axis=-1) <= 6] = 60
  write_mhd(str(raw / 'subset0' / f'{uid_a}.mhd'), vol, (4.0, 4.0, 2.5), origin)
  # The same anatomy stored upside down (slices inferior -> superior flipped): same output expected.
  flipped_origin = (origin[0], origin[1], origin[2] + 2.5 * 29)
  write_mhd(
    str(raw / 'subset1' / f'{uid_b}.mhd'),
    vol[::-1],
    (4.0, 4.0, 2.5),
    flipped_origin,
    direction=(1, 0, 0, 0, 1, 0, 0, 0, -1),
  )
  write_mhd(str(raw / 'subset1' / f'{uid_c}.mhd'), vol, (4.0, 4.0, 2.5), origin)
  with open(raw / 'subset1' / f'{uid_c}.raw', 'r+b') as f:
    f.truncate(1000)  # cut off in download
  rows = [f'{u},{centre[0]},{centre[1]},{centre[2]},12.0' for u in (uid_a, uid_b)]
  (raw / 'annotations.csv').write_text(
    'seriesuid,coordX,coordY,coordZ,diameter_mm\n' + '\n'.join(rows) + f'\n{uid_a},x,1,2,3\n'
  )
  items, bad, _, summary = luna16.list_items(str(raw), SALT)
  assert summary == {'annotated_series_missing': 0, 'nodules': 2}
  assert runner.run('luna16', items, luna16.convert, options(raw, out), rejects=bad) == 1
  got = {(r['kind'], r['key'].split('/')[0]) for r in rejects(out)}
  assert got == {('corrupt', 'annotations.csv:4'), ('truncated', 'subset1')}
  assert not any('1.3.6.1' in json.dumps(r) for r in rejects(out))  # UIDs never written
  recs = records(out)
  assert len(recs) == 4  # two scans x two slabs (73 slices: 0-63 and 9-72)
  for r in recs:
    assert r['image'].dtype == np.int16 and r['image'].shape == (77, 77, 64)
    np.testing.assert_array_equal(r['spacing'], [1, 1, 1])
    # Marker: rows near 0 (anterior), columns near 0 (patient right), on every slice.
    assert (r['image'][2, 10, :] == 700).all() and (r['image'][-3, -3, :] == -800).all()
  by_scan = [recs[:2], recs[2:]]
  for first, second in by_scan:
    np.testing.assert_array_equal(first['image'], by_scan[0][0]['image'])  # flip undone exactly
    # Canonical grid: 77 x 77 x 73 voxels, column = x + 40, row = y + 30, slice = -227.75 - z; the
    # nodule centre (-4, 10, -270) is column 36, row 40, slice 42: inside both slabs (starts 0, 9).
    assert first['label'] == 1 and second['label'] == 1
    rows, cols = np.nonzero(first['mask'])
    assert abs(rows.mean() - 40) < 1 and abs(cols.mean() - 36) < 1
    assert abs(np.sqrt(first['mask'].sum() / np.pi) - 6) < 1  # a 12 mm disc
    np.testing.assert_array_equal(first['mask'], second['mask'])
    for slab, k in ((first, 42), (second, 42 - 9)):  # the mask sits on the nodule's HU
      assert slab['image'][40, 36, k] == 60
      assert slab['image'][rows, cols, k].mean() > slab['image'][30:50, 26:46, k].mean() + 150


def test_luna16_without_annotations_is_a_usage_error(tmp_path):
  (tmp_path / 'subset0').mkdir()
  with pytest.raises(ValueError, match='annotations.csv'):
    luna16.list_items(str(tmp_path), SALT)


# ------------------------------------------------------------------------------------------------ LiTS
RAS_4MM = np.diag(
  [4.0, 4.0, 2.5, 1.0]
)  # nibabel RAS+: i runs toward patient right, j anterior, k up


def test_lits_masks_follow_the_middle_slice_and_orientation(tmp_path):
  raw, out = tmp_path / 'raw', tmp_path / 'out'
  vol = np.full((20, 20, 40), -100, np.int16)  # (i, j, k): 80 x 80 x 100 mm
  seg = np.zeros(vol.shape, np.uint8)
  vol[0:3, 0:3, :] = 900  # marker at low i: patient LEFT (RAS) and low j: POSTERIOR
  seg[4:16, 5:15, :], vol[4:16, 5:15, :] = 1, 60  # liver through every slice
  seg[8:12, 8:12, 26:28], vol[8:12, 8:12, 26:28] = 2, 150  # tumour on two slices only
  batch = raw / 'Training Batch 1'
  write_nifti(str(batch / 'volume-0.nii'), vol, RAS_4MM)
  write_nifti(str(batch / 'segmentation-0.nii'), seg, RAS_4MM, np.uint8)
  write_nifti(str(raw / 'Training Batch 2' / 'volume-1.nii.gz'), vol, RAS_4MM)  # no segmentation
  write_nifti(str(batch / 'volume-2.nii'), vol, RAS_4MM)
  write_nifti(str(batch / 'segmentation-2.nii'), seg * 3, RAS_4MM, np.uint8)  # labels 0, 3, 6
  nan = vol.astype(np.float32)
  nan[5, 5, 5] = np.nan
  write_nifti(str(batch / 'volume-3.nii'), nan, RAS_4MM, np.float32)
  write_nifti(str(batch / 'segmentation-3.nii'), seg, RAS_4MM, np.uint8)
  items, bad = lits.list_items(str(raw))
  assert (
    runner.run(
      'lits', items, lits.convert, options(raw, out), rejects=bad, label_names=lits.LABEL_NAMES
    )
    == 1
  )
  assert {(r['key'], r['kind']) for r in rejects(out)} == {
    ('Training Batch 2/volume-1.nii.gz', 'missing_label'),
    ('Training Batch 1/volume-2.nii', 'unknown_label'),
    ('Training Batch 1/volume-3.nii', 'nan'),
  }
  first, second = records(out)  # 98 slices: slabs start at 0 and 34
  assert shards.read_manifest(str(out), 'train')['label_names'] == {'ct': ['no_tumour', 'tumour']}
  for r in (first, second):
    assert r['image'].shape == (77, 77, 64) and r['region'] == 'abdomen'
    # LPS columns run to the patient's left, rows to posterior: the marker (RAS low i = left, low j =
    # posterior) lands bottom right.
    assert (r['image'][-2:, -2:, :] == 900).all() and (r['image'][:2, :2, :] == -100).all()
    liver = r['mask'] == 1
    mid = r['image'][..., 32]
    # Nearest-neighbour mask vs linear image: only the 4 mm voxels' edge pixels may disagree.
    assert liver.sum() > 1000 and (mid[liver] >= 60).mean() > 0.8
    assert ((mid >= 60) & (mid < 200))[r['mask'] == 0].mean() < 0.02
  # Canonical slice s is z = 97.25 - s: tumour k 26-27 (z 65-67.5 mm) covers slices 29-33, inside slab 0
  # (slices 0-63) and at its middle slice 32, outside slab 1 (slices 34-97).
  assert first['label'] == 1 and second['label'] == 0
  tumour = first['mask'] == 2
  assert tumour.sum() >= 9 and first['image'][..., 32][tumour].max() == 150
  assert (
    first['image'][..., 32][tumour].mean() > first['image'][..., 32][first['mask'] == 1].mean() + 40
  )
  assert not (second['mask'] == 2).any()


# -------------------------------------------------------------------------------------- DICOM CT tree
def _ct_slices(n=31, rows=20, cols=16):
  """HU slices (z ascending = superior): a bone marker at the top slice's anterior-right corner."""
  v = np.full((n, rows, cols), -1000.0)
  v[:, rows // 2 :, :] = 40  # posterior half soft tissue
  v[-1, :3, :3] = 1200  # top slice, anterior rows, patient-right columns
  return v


def _ct_series(path, slices, **kw):
  kw.setdefault('header', {'PatientID': 'P1'})
  return write_dicom_series(str(path), slices, spacing=(4.0, 4.0, 2.5), **kw)


def test_dicom_ct_round_trip_and_bad_input_matrix(tmp_path):
  from pydicom.data import get_testdata_file

  raw, out = tmp_path / 'raw', tmp_path / 'out'
  good = _ct_series(raw / 'a' / 'ct', _ct_slices(), slope=2.0, intercept=-1024.0)
  # 1 not DICOM; 2 a copy of a slice (duplicate); 3 the last slice of a second series cut short.
  (raw / 'a' / 'notes.txt').write_text('scanned on the old console')
  shutil.copy(good[5], raw / 'a' / 'copy_of_slice.dcm')
  second = _ct_series(raw / 'b', _ct_slices(), header={'PatientID': 'P2'})
  with open(second[-1], 'r+b') as f:
    f.truncate(os.path.getsize(second[-1]) - 200)
  # 4 an MR series and 5 a single-slice CT: pydicom's own test files.
  (raw / 'c').mkdir()
  shutil.copy(get_testdata_file('MR_small.dcm'), raw / 'c' / 'mr.dcm')
  shutil.copy(get_testdata_file('CT_small.dcm'), raw / 'c' / 'ct.dcm')
  # 6 a localizer; 7 an unsupported transfer syntax; 8 a missing slice; 9 no PatientID;
  # 10 slices of two sizes in one series.
  _ct_series(raw / 'd', _ct_slices(3), image_type=('ORIGINAL', 'PRIMARY', 'LOCALIZER'))
  _ct_series(raw / 'e', _ct_slices(3), transfer_syntax='1.2.840.10008.1.2.4.100')
  gap = _ct_series(raw / 'f', _ct_slices())
  os.remove(gap[12])
  _ct_series(raw / 'g', _ct_slices(), header={'PatientID': ''})
  uid = '1.2.826.0.1.3680043.8.498.1'
  _ct_series(raw / 'h', _ct_slices(3, rows=20), series_uid=uid)
  _ct_series(
    raw / 'h',
    _ct_slices(3, rows=24)[:1],
    series_uid=uid,
    origin=(0.0, 0.0, 7.5),
    name_fn=lambda k: 'extra.dcm',
  )
  items, bad, names = dicom_ct.list_items(str(raw), SALT)
  assert (
    runner.run('dicom_ct', items, dicom_ct.convert, options(raw, out, region='chest'), rejects=bad)
    == 1
  )
  rows = rejects(out)
  reasons = ' | '.join(f'{r["kind"]}: {r["reason"]}' for r in rows)
  for kind, words in [
    ('corrupt', 'not a DICOM file'),
    ('duplicate', 'exact copy'),
    ('truncated', 'bytes'),
    ('unsupported', 'MR file(s): not a CT series'),
    ('dimensions', 'series of 1 slice'),
    ('unsupported', 'localizer'),
    ('unsupported', 'MPEG2'),
    ('geometry', 'spacing varies'),
    ('empty', 'no PatientID'),
    ('dimensions', 'slice in a'),
  ]:
    assert any(r['kind'] == kind and words in r['reason'] for r in rows), (kind, words, reasons)
  assert len(rows) == 10, reasons
  assert str(raw) not in reasons and 'notes' not in reasons and uid not in reasons
  # The keys point back to the files for whoever holds the salt, on the terminal only.
  key = next(r['key'] for r in rows if r['kind'] == 'corrupt')
  assert volume_common.locate(names, str(raw), key) == [os.path.join('a', 'notes.txt')]
  recs = records(out)
  assert len(recs) == 4 and len({r['subject'] for r in recs}) == 2  # series a and b, 2 slabs each
  first = [r for r in recs if r['subject'] == privacy.subject_hash(SALT, 'dicom_ct', 'P1')][0]
  # Slope 2 / intercept -1024 undone; slices run superior -> inferior, so the top slice comes first
  # (31 slices of 2.5 mm span 75 mm: 76 slices of 1 mm fall exactly on the top and bottom ones).
  assert first['image'].shape == (77, 61, 64) and first['image'].dtype == np.int16
  assert first['image'][0, 0, 0] == 1200 and first['image'][0, 0, 5] == -1000
  assert first['image'][-1, -1, 30] == 40 and first['image'][0, -1, 30] == -1000
  np.testing.assert_array_equal(first['spacing'], [1, 1, 1])
  manifest = shards.read_manifest(str(out), 'train')
  assert manifest['meta']['dataset'] == 'dicom_ct' and manifest['modalities']['ct']['count'] == 4
  # Only good inputs: exit status 0.
  clean = [it for it in items if it.payload['files'][0][0].startswith('a' + os.sep)]
  assert runner.run('dicom_ct', clean, dicom_ct.convert, options(raw, tmp_path / 'clean')) == 0


# ------------------------------------------------------------------------------------------ LIDC-IDRI
LIDC_ORIGIN = (-40.0, -40.0, -100.0)  # 40 x 40 pixels of 2 mm, 36 slices of 2.5 mm


def _lidc_ct(path, centres, **kw):
  """A lung (-800 HU) with 6 mm-radius nodules (50 HU) at the given world centres."""
  zz, yy, xx = np.meshgrid(np.arange(36), np.arange(40), np.arange(40), indexing='ij')
  world = np.stack(
    [LIDC_ORIGIN[0] + 2 * xx, LIDC_ORIGIN[1] + 2 * yy, LIDC_ORIGIN[2] + 2.5 * zz], -1
  )
  v = np.full(zz.shape, -800.0)
  for c in centres:
    v[np.linalg.norm(world - c, axis=-1) <= 6] = 50
  return write_dicom_series(str(path), v, spacing=(2.0, 2.0, 2.5), origin=LIDC_ORIGIN, **kw)


def _lidc_mark(centre, malignancy, offset=0.0, radius=6.0):
  """One reader's unblindedReadNodule: outlines (pixel edge maps) on every slice through the sphere."""
  rois = []
  for k in range(36):
    z = LIDC_ORIGIN[2] + 2.5 * k
    r2 = radius**2 - (z - centre[2]) ** 2
    if r2 < 1:
      continue
    cx, cy = (centre[0] + offset - LIDC_ORIGIN[0]) / 2, (centre[1] - LIDC_ORIGIN[1]) / 2
    # Integer pixels in contour order, as the readers' tool saved them.
    pts = dict.fromkeys(
      (int(round(cx + np.sqrt(r2) / 2 * np.cos(a))), int(round(cy + np.sqrt(r2) / 2 * np.sin(a))))
      for a in np.linspace(0, 2 * np.pi, 24, endpoint=False)
    )
    edges = ''.join(f'<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>' for x, y in pts)
    rois.append(
      f'<roi><imageZposition>{z}</imageZposition><imageSOP_UID>1.2.3.{k}</imageSOP_UID>'
      f'<inclusion>TRUE</inclusion>{edges}</roi>'
    )
  chars = (
    ''
    if malignancy is None
    else f'<characteristics><subtlety>5</subtlety><malignancy>{malignancy}</malignancy></characteristics>'
  )
  return f'<unblindedReadNodule><noduleID>n</noduleID>{chars}{"".join(rois)}</unblindedReadNodule>'


def lidc_xml(series_uid, sessions, reader_id='reader'):
  body = ''.join(
    f'<readingSession><servicingRadiologistID>{reader_id}</servicingRadiologistID>'
    f'{"".join(marks)}<nonNodule><nonNoduleID>x</nonNoduleID></nonNodule>'
    '</readingSession>'
    for marks in sessions
  )
  return (
    '<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage xmlns="http://www.nih.gov" '
    'uid="1.1"><ResponseHeader><Version>1.8.1</Version><SeriesInstanceUid>'
    f'{series_uid}</SeriesInstanceUid></ResponseHeader>{body}</LidcReadMessage>'
  )


MALIGNANT, BENIGN, UNSURE = (
  np.array(c) for c in ([-10.0, -4.0, -55.0], [14.0, 12.0, -30.0], [-16.0, 20.0, -70.0])
)


def write_lidc(raw, header=None, reader_id='reader'):
  """One patient in TCIA's layout: a CT series with its XML, a CT series without, a radiograph."""
  patient = raw / 'LIDC-IDRI-0001'
  series = patient / '01-01-2000-NA-NA-30178' / '3000566.000000-NA-03192'
  uid = '1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178'
  header = {'PatientID': 'LIDC-IDRI-0001', **(header or {})}
  _lidc_ct(
    series,
    [MALIGNANT, BENIGN, UNSURE],
    series_uid=uid,
    header=header,
    name_fn=lambda k: f'1-{k + 1:03d}.dcm',
  )
  sessions = [
    [_lidc_mark(MALIGNANT, 4), _lidc_mark(BENIGN, 2), _lidc_mark(UNSURE, 3)],
    [_lidc_mark(MALIGNANT, 5, 1.0), _lidc_mark(BENIGN, 1, -1.0), _lidc_mark(UNSURE, 2, 0, 1.0)],
    [_lidc_mark(MALIGNANT, 4, -1.0), _lidc_mark(UNSURE, 4), _lidc_mark(BENIGN, None)],
  ]
  (series / '069.xml').write_text(lidc_xml(uid, sessions, reader_id))
  _lidc_ct(patient / '01-01-2000-NA-NA-99999' / '3000999.000000-NA-00001', [], header=header)
  write_dicom_series(
    str(patient / '01-01-2000-NA-NA-11111' / '3000923.000000-NA-62357'),
    np.zeros((1, 16, 16)),
    modality='CR',
    header=header,
  )
  return series


def test_lidc_consensus_crops_masks_and_labels(tmp_path):
  raw, out = tmp_path / 'LIDC-IDRI', tmp_path / 'out'
  write_lidc(raw)
  items, bad, _ = lidc_idri.list_items(str(raw), SALT)
  # Readers 1-3 agree on the malignant nodule (4, 5, 4 -> 4), readers 1-2 on the benign one (2, 1;
  # reader 3's mark has no rating); the third nodule's marks (3, 2 at 1 mm radius, 4) have median 3.
  (item,) = items
  nodules = item.payload['nodules']
  assert [(n['label'], n['malignancy'], n['readers']) for n in nodules] == [
    (1, 4.0, 3),
    (0, 1.5, 2),
  ]
  np.testing.assert_allclose(nodules[0]['centre'], MALIGNANT, atol=0.7)
  assert (
    runner.run(
      'lidc_idri',
      items,
      lidc_idri.convert,
      options(raw, out, crop=48),
      rejects=bad,
      label_names=lidc_idri.LABEL_NAMES,
    )
    == 1
  )
  assert sorted((r['kind'], r['reason'].split(':')[0]) for r in rejects(out)) == [
    ('missing_label', 'no LidcReadMessage XML for this CT series'),
    ('unsupported', '1 CR file(s)'),
  ]
  malignant, benign = records(out)
  assert (int(malignant['label']), int(benign['label'])) == (1, 0)
  for r in (malignant, benign):
    assert r['image'].shape == (48, 48, 64) and r['image'].dtype == np.int16
    assert r['image'][24, 24, 32] == 50 and r['image'][24, 24, 20] == -800  # centred on the nodule
    rows, cols = np.nonzero(r['mask'])
    assert abs(rows.mean() - 24) < 1 and abs(cols.mean() - 24) < 1
    assert abs(np.sqrt(len(rows) / np.pi) - 6) < 1.2  # the consensus outline: a 6 mm radius disc
    assert (r['image'][rows, cols, 32] > -400).mean() > 0.75  # outlines are drawn on 2 mm pixels
  # The benign nodule is 32 mm below the top of the slab but only 17.5 mm below the scan's top slice:
  # the slab's first slices lie above the scan, filled with air.
  assert (benign['image'][..., :10] == -1024).all() and (benign['image'][..., 20] != -1024).all()


def test_bench_prep_is_its_own_command_printing_one_json_line():
  # A tiny series: this checks the command, not the speed (figures live in docs/PERFORMANCE.md).
  cmd = [
    sys.executable,
    '-m',
    'data_prep.bench_prep',
    '--prep_rows=32',
    '--prep_slices=70',
    '--prep_workers=0',
  ]
  proc = subprocess.run(
    cmd,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=1800,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  (row,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
  assert row['bench'] == 'prep' and row['series_shape'] == [32, 32, 70] and row['records'] == 2
  assert row['peak_rss_bytes'] > 0 and row['backend'] == 'cpu'
