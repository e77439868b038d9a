"""MRI dataset converters (BraTS 2020, ACDC) on miniature copies of each release's layout (nibabel), and
every volumetric ``python -m data_prep.<name>`` command end to end (exit status, resume).

Helpers and the CT fixtures come from test_prep_volume_datasets.py.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from aacp_jax.data import pipeline, shards
from data_prep import acdc, brats, runner
from tests.test_prep_volume_datasets import (
  RAS_4MM,
  ROOT,
  SALT,
  _luna_volume,
  options,
  records,
  rejects,
  write_lidc,
  write_mhd,
  write_nifti,
)

# ----------------------------------------------------------------------------------------------- BraTS
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 23.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def _brats_case(folder, name, *, skip=(), nan=False, t2_shape=None, seg_name=None):
  """A 24 x 24 x 20 mm stripped 'brain' (the release's 1 mm grid and LPS-like affine, in miniature).

  T1 100, T2 200, FLAIR 300 (+ noise); a tumour bright in FLAIR, labelled 1 (core) inside 2 (oedema)
  at low i; a T1-only bright patch at high i. The affine's RAS x = -i, so high i is the patient's left.
  """
  rng = np.random.default_rng(0)
  i, j, k = np.meshgrid(np.arange(24), np.arange(24), np.arange(20), indexing='ij')
  brain = ((i - 11.5) / 10) ** 2 + ((j - 11.5) / 10) ** 2 + ((k - 9.5) / 8) ** 2 <= 1
  seg = np.zeros(brain.shape, np.uint8)
  oedema = ((i - 8) ** 2 + (j - 12) ** 2 + (k - 10) ** 2) <= 9
  seg[oedema] = 2
  seg[((i - 8) ** 2 + (j - 12) ** 2 + (k - 10) ** 2) <= 2] = 1
  out = {}
  for seq, base in (('t1', 100.0), ('t2', 200.0), ('flair', 300.0)):
    v = np.where(brain, base + rng.normal(0, 5, brain.shape), 0.0).astype(np.float32)
    if seq == 'flair':
      v[oedema & brain] = 600
    if seq == 't1':
      v[brain & (i >= 18)] = 250  # high i: RAS x = -i, the patient's left
    out[seq] = v
  out['t1ce'] = out['t1']
  out['seg'] = seg
  if nan:
    out['flair'][12, 12, 10] = np.nan
  if t2_shape:
    out['t2'] = np.zeros(t2_shape, np.float32)
  for seq, v in out.items():
    if seq not in skip:
      fname = seg_name if (seq == 'seg' and seg_name) else f'{name}_{seq}.nii.gz'
      write_nifti(
        str(folder / name / fname), v, BRATS_AFFINE, np.uint8 if seq == 'seg' else np.float32
      )


def test_brats_slices_channels_masks_and_rejects(tmp_path):
  raw, out = tmp_path / 'MICCAI_BraTS2020_TrainingData', tmp_path / 'out'
  _brats_case(raw, 'BraTS20_Training_001')
  _brats_case(raw, 'BraTS20_Training_002', skip=('seg',))  # missing_label
  _brats_case(raw, 'BraTS20_Training_003', nan=True)  # nan
  _brats_case(raw, 'BraTS20_Training_004', t2_shape=(20, 20, 20))  # dimensions
  _brats_case(raw, 'BraTS20_Training_005', skip=('t2',))  # missing_file
  _brats_case(raw, 'BraTS20_Training_355', seg_name='W39_1998.09.19_Segm.nii')  # the misnamed one
  items, bad = brats.list_items(str(raw))
  assert [it.payload['seg'] for it in items if it.key.endswith('355')] == [
    os.path.join('BraTS20_Training_355', 'W39_1998.09.19_Segm.nii')
  ]
  items = [it for it in items if not it.key.endswith('355')]  # same data as 001: skip the work
  assert (
    runner.run(
      'brats2020',
      items,
      brats.convert,
      options(raw, out, mni=False),
      rejects=bad,
      label_names=brats.LABEL_NAMES,
    )
    == 1
  )
  assert {(r['key'][-3:], r['kind']) for r in rejects(out)} == {
    ('002', 'missing_label'),
    ('003', 'nan'),
    ('004', 'dimensions'),
    ('005', 'missing_file'),
  }
  recs = records(out, modality='mri')
  assert 10 <= len(recs) <= 17  # caps with under a quarter of the largest brain area are dropped
  for r in recs:
    assert r['image'].dtype == np.float16 and r['image'].shape == (24, 24, 3)
    np.testing.assert_array_equal(r['spacing'], [1, 1, 1])
    brain = r['image'][..., 2] != 0
    assert abs(float(r['image'][..., 1][brain].astype(np.float32).std()) - 1) < 0.3  # instance norm
    assert r['mask'].shape == (24, 24) and set(np.unique(r['mask'])) <= {0, 1, 2}
    assert r['label'] == int(r['mask'].any())
  tumour = [r for r in recs if r['label'] == 1]
  assert tumour, 'the tumour slices were kept'
  for r in tumour:
    flair, t1 = r['image'][..., 2].astype(np.float32), r['image'][..., 0].astype(np.float32)
    # FLAIR is bright exactly under the mask (channel order T1, T2, FLAIR; mask aligned).
    assert flair[r['mask'] > 0].min() > 1.0 and flair[(r['mask'] == 0) & (flair != 0)].max() < 1.0
    # LPI columns run toward the patient's left: the T1 patch (patient left) sits on the image's
    # right, the tumour (patient right, low i) on its left.
    assert t1[:, 16:].max() > 2 and t1[:, :12].max() < 2
    assert np.nonzero(r['mask'])[1].mean() < 12


def test_brats_mni_path_moves_sequences_and_mask_with_one_transform(monkeypatch):
  """The MNI wiring with the registration itself stubbed (the real one takes ~10 s; its accuracy is
  tested with the ops): a known transform must carry T1/T2/FLAIR and the seg together, and a transform
  that misses the template brain must reject the case."""
  from data_prep import ops

  def image(array_zyx, spacing, origin):
    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img

  z, y, x = np.meshgrid(np.arange(20), np.arange(24), np.arange(24), indexing='ij')
  ball = lambda cx: (x * 2 - 24 - cx) ** 2 + (y * 2 - 24) ** 2 + (z * 2 - 20) ** 2 <= 14**2
  template = image(ball(0).astype(np.float32) * 50, (2.0,) * 3, (0.0,) * 3)
  brain_mask = sitk.Cast(template > 0, sitk.sitkUInt8)
  monkeypatch.setattr(ops, 'mni_template', lambda resolution: (template, brain_mask))
  shift = {'x': 6.0}
  monkeypatch.setattr(
    ops,
    'register',
    lambda moving, fixed, **kw: sitk.TranslationTransform(3, (shift['x'], 0.0, 0.0)),
  )
  case = ball(6) * 100.0 + (x > 15) * ball(6) * 50.0  # the case's brain sits 6 mm toward +x (left)
  seg = ((x * 2 - 24 - 6 - 8) ** 2 + (y * 2 - 24) ** 2 + (z * 2 - 20) ** 2 <= 16).astype(np.uint8)
  vols = {
    s: image(case.astype(np.float32) * (i + 1), (2.0,) * 3, (0.0,) * 3)
    for i, s in enumerate(brats.SEQUENCES)
  }
  arrays, mask, spacing = brats.to_standard_space(
    vols, image(seg, (2.0,) * 3, (0.0,) * 3), {'n4': False, 'mni': True}, 'case'
  )
  np.testing.assert_array_equal(spacing, [2, 2, 2])
  assert arrays['t1'].shape == mask.shape == (20, 24, 24)
  # Brain back on the template's ball; the lesion 8 mm left of the centre, i.e. 4 columns right of
  # column 11.5 in LPI (columns run toward the patient's left), slices flipped to run downward.
  np.testing.assert_array_equal(arrays['t2'] != 0, sitk.GetArrayFromImage(brain_mask)[::-1] > 0)
  zz, yy, xx = np.nonzero(mask)
  assert abs(xx.mean() - 16) < 0.6 and abs(yy.mean() - 12) < 0.6 and abs(zz.mean() - 9) < 0.6
  # The same transform moved image and mask: the lesion lies in the case's brighter (x > 15) half.
  assert arrays['flair'][mask > 0].min() > 400
  shift['x'] = 40.0
  with pytest.raises(runner.Reject, match='MNI registration failed'):
    brats.to_standard_space(vols, None, {'n4': False, 'mni': True}, 'case')


# ------------------------------------------------------------------------------------------------ ACDC
ACDC_AFFINE = np.diag([2.0, 2.0, 8.0, 1.0])  # 2 mm pixels, 8 mm short-axis slices


def _acdc_case(folder, name, *, info='ED: 1\nES: 3\nGroup: DCM\nNbFrame: 5\n', skip=()):
  """A 4D cine (20 x 16 x 4 slices x 5 frames): a bright LV blood pool that shrinks toward ES, the
  myocardium around it, an RV beside it; frame 1 (ED) and 3 (ES) with _gt masks."""
  i, j = np.meshgrid(np.arange(20), np.arange(16), indexing='ij')
  rng = np.random.default_rng(1)
  cine = np.zeros((20, 16, 4, 5), np.float32)
  gts = {}
  for t in range(5):
    r = 4 - 0.5 * t
    lv = (i - 10) ** 2 + (j - 8) ** 2 <= r * r
    myo = ((i - 10) ** 2 + (j - 8) ** 2 <= (r + 2) ** 2) & ~lv
    rv = (i - 3) ** 2 + (j - 8) ** 2 <= 4
    frame = 50 + rng.normal(0, 2, (20, 16)) + 300 * lv + 100 * myo + 250 * rv
    cine[:, :, :, t] = frame[..., None]
    gts[t + 1] = np.repeat((1 * rv + 2 * myo + 3 * lv)[..., None], 4, axis=2).astype(np.uint8)
  case = folder / name
  case.mkdir(parents=True)
  if 'info' not in skip:
    (case / 'Info.cfg').write_text(info)
  write_nifti(str(case / f'{name}_4d.nii.gz'), cine, ACDC_AFFINE, np.float32)
  write_nifti(str(case / f'{name}_frame01.nii.gz'), cine[..., 0], ACDC_AFFINE, np.float32)
  for t in (1, 3):  # the ES frame image is left to be cut from the 4D cine
    if f'gt{t}' not in skip:
      write_nifti(str(case / f'{name}_frame{t:02d}_gt.nii.gz'), gts[t], ACDC_AFFINE, np.uint8)


def test_acdc_frames_masks_groups_and_official_test_split(tmp_path):
  raw, out = tmp_path / 'ACDC', tmp_path / 'out'
  _acdc_case(raw / 'training', 'patient001')
  _acdc_case(raw / 'testing', 'patient101', info='ED: 1\nES: 3\nGroup: HCM\n')
  _acdc_case(raw / 'training', 'patient002', skip=('gt3',))  # missing_label
  _acdc_case(raw / 'training', 'patient003', skip=('info',))  # missing_label
  _acdc_case(raw / 'training', 'patient004', info='ED: 1\nES: 3\nGroup: XYZ\n')  # unknown_label
  items, bad = acdc.list_items(str(raw))
  assert (
    runner.run(
      'acdc',
      items,
      acdc.convert,
      options(raw, out, n4=True),
      rejects=bad,
      label_names=acdc.GROUPS,
      split_of=acdc.split_of,
    )
    == 1
  )
  assert {(r['key'], r['kind']) for r in rejects(out)} == {
    ('training/patient002', 'missing_label'),
    ('training/patient003', 'missing_label'),
    ('training/patient004', 'unknown_label'),
  }
  train, test = records(out, 'train', 'mri'), records(out, 'test', 'mri')
  assert len(train) == len(test) == 8  # ED and ES x 4 slices
  assert {int(r['label']) for r in train} == {acdc.GROUPS.index('DCM')}
  assert {int(r['label']) for r in test} == {acdc.GROUPS.index('HCM')}
  lv_area = []
  for r in train:
    assert r['image'].shape == (32, 40, 3) and r['region'] == 'cardiac'  # rows j, columns i
    np.testing.assert_array_equal(r['spacing'], [1, 1, 8])
    np.testing.assert_array_equal(r['image'][..., 0], r['image'][..., 2])  # one contrast, x3
    img = r['image'][..., 0].astype(np.float32)
    # Blood pool brightest, myocardium darker, background darkest, exactly where the mask says.
    assert img[r['mask'] == 3].mean() > img[r['mask'] == 2].mean() + 0.5
    assert img[r['mask'] == 2].mean() > img[r['mask'] == 0].mean() + 0.3
    lv_area.append(int((r['mask'] == 3).sum()))
  # ED (frame 1, LV radius 8 mm) from its file, then ES (frame 3, radius 6 mm) cut from the 4D cine.
  ed, es = np.mean(lv_area[:4]), np.mean(lv_area[4:])
  assert abs(ed / es - (8 / 6) ** 2) < 0.25


# -------------------------------------------------------------------------------------------- commands
def _one_lits_case(raw):
  vol = np.full((20, 20, 40), -100, np.int16)
  seg = np.zeros(vol.shape, np.uint8)
  seg[4:16, 5:15, :] = 1
  write_nifti(str(raw / 'volume-7.nii.gz'), vol, RAS_4MM)
  write_nifti(str(raw / 'segmentation-7.nii.gz'), seg, RAS_4MM, np.uint8)


def _one_luna_scan(raw):
  uid = '1.3.6.1.4.1.14519.5.2.1.6279.6001.9'
  write_mhd(str(raw / 'subset0' / f'{uid}.mhd'), _luna_volume(), (4.0, 4.0, 2.5), (0.0, 0.0, 0.0))
  (raw / 'annotations.csv').write_text(
    f'seriesuid,coordX,coordY,coordZ,diameter_mm\n{uid},40,40,30,8\n'
  )


@pytest.mark.parametrize(
  'module, build, args, status, count',
  [
    ('lits', _one_lits_case, [], 0, 2),
    ('luna16', _one_luna_scan, ['--slab_stride=32'], 0, 2),
    ('brats', lambda raw: _brats_case(raw, 'BraTS20_Training_001'), ['--mni=false'], 0, 14),
    ('acdc', lambda raw: _acdc_case(raw / 'training', 'patient001'), [], 0, 8),
    ('lidc_idri', write_lidc, ['--crop=32'], 1, 2),  # its radiograph and XML-less series: rejected
  ],
)
def test_commands_convert_and_resume(tmp_path, module, build, args, status, count):
  raw, out = tmp_path / 'raw', tmp_path / 'out'
  raw.mkdir()
  build(raw)
  cmd = [
    sys.executable,
    '-m',
    f'data_prep.{module}',
    f'--input={raw}',
    f'--output={out}',
    f'--salt={SALT.decode()}',
    '--workers=0',
    '--progress=false',
    '--test_fraction=0',
    '--val_fraction=0',
  ] + args
  first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert first.returncode == status, first.stderr[-3000:]
  manifest = shards.read_manifest(str(out), 'train')
  assert sum(m['count'] for m in manifest['modalities'].values()) == count, first.stdout
  if module == 'lits':  # a re-run finds every shard finished and rewrites nothing
    shard = os.path.join(out, 'train', manifest['modalities']['ct']['files'][0]['name'])
    stamp = os.stat(shard).st_mtime_ns
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert os.stat(shard).st_mtime_ns == stamp
    arrays = pipeline.load_split_arrays(str(out), 'train', 'ct', 16)
    assert arrays['mask'].shape == (2, 16, 16) and (arrays['label'] == 0).all()
