"""data_prep.brain_mri: brain MRI with its skull (IXI / ADNI / clinical layouts) through N4, the MNI152
registration and the template skull strip, on a synthetic head built around nilearn's shipped template
(moved by a known rigid transform, bias field, planted identifiers) and on nibabel's shipped T1.

The registration runs on the 2 mm template with few iterations to stay within seconds; its accuracy
at full settings is measured in docs/PERFORMANCE.md.
"""

import json
import os
import subprocess
import sys

import nibabel as nib
from nibabel.testing import data_path
import numpy as np
import pytest
import SimpleITK as sitk

from aacp_jax.data import shards
from data_prep import brain_mri, ops, runner

SALT = b'test-salt-0123456789'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = 'Doe^Johnathan'  # planted in headers, folder and file names: must reach no output byte
FAST = {'mni_resolution': 2, 'mni_iterations': 30, 'n4_fit_mm': 12.0}


def _rigid(image, degrees, shift):
  t = sitk.Euler3DTransform()
  t.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
  t.SetRotation(*np.deg2rad(degrees))
  t.SetTranslation(shift)
  return t


def make_head():
  """{t1, t2, flair}: float32 (x, y, z) arrays of a head at 3 mm and their RAS affine.

  The template brain, then dark bone and bright scalp shells around it, background noise; moved by
  6 deg / 9 mm, multiplied by a smooth bias field; T2 and FLAIR with other contrasts."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  template, brain = ops.mni_template(2)
  # Distance (mm) outside the brain: bone from 4 to 8 mm, scalp from 8 to 12 mm.
  outside = ndimage.distance_transform_edt(sitk.GetArrayFromImage(brain) == 0, sampling=2.0)
  shell = lambda lo, hi: sitk.GetImageFromArray(
    ((outside > lo) & (outside <= hi)).astype(np.float32)
  )
  bone, scalp, skin = shell(4, 8), shell(8, 12), shell(0, 12)
  for img in (bone, scalp, skin):
    img.CopyInformation(template)
  f32 = lambda m: sitk.Cast(m, sitk.sitkFloat32)
  tissue = template + 0.08 * bone + 0.9 * scalp
  grid = sitk.Image(64, 76, 64, sitk.sitkFloat32)
  grid.SetSpacing((3.0, 3.0, 3.0))
  centre = template.TransformContinuousIndexToPhysicalPoint(
    [(s - 1) / 2 for s in template.GetSize()]
  )
  grid.SetOrigin([c - 3.0 * (n - 1) / 2 for c, n in zip(centre, grid.GetSize())])
  moved = sitk.Resample(tissue, grid, _rigid(template, (0, 4, 6), (6, -5, 4)), sitk.sitkLinear, 0.0)
  head_mask = sitk.Resample(f32(brain) + skin, grid, _rigid(template, (0, 4, 6), (6, -5, 4)))
  t1 = sitk.GetArrayFromImage(moved)
  inside = sitk.GetArrayFromImage(head_mask) > 0.5
  z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in t1.shape], indexing='ij')
  bias = np.exp(0.25 * x + 0.15 * z)
  rng = np.random.default_rng(0)
  noise = lambda: rng.normal(0, 0.02, t1.shape)
  seqs = {
    't1': t1 * bias + noise(),
    't2': np.where(inside, 1.2 - t1, 0.0) * bias + noise(),
    'flair': np.where(inside, 0.3 + 0.5 * t1, 0.0) * bias + noise(),
  }
  # sitk arrays are (z, y, x) in LPS; nibabel wants (x, y, z) with a RAS affine.
  lps = np.eye(4)
  lps[:3, :3] = np.diag(grid.GetSpacing())
  lps[:3, 3] = grid.GetOrigin()
  affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
  return {
    k: (1000 * np.abs(v)).astype(np.float32).transpose(2, 1, 0) for k, v in seqs.items()
  }, affine


@pytest.fixture(scope='module')
def head():
  return make_head()


def _write(path, array, affine, planted=True):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = nib.Nifti1Image(array, affine)
  if planted:
    img.header['descrip'] = NAME.encode()
    img.header['aux_file'] = b'Doe 1970-01-01'
    img.header['db_name'] = NAME.encode()[:18]
    img.header['intent_name'] = b'Doe'
  nib.save(img, path)


def _tree_bytes(root):
  blob = b''
  for base, _, files in os.walk(root):
    for n in files:
      with open(os.path.join(base, n), 'rb') as f:
        blob += n.encode() + b'\0' + f.read()
  return blob


def test_listing_layouts_sequences_and_hashed_keys(tmp_path):
  raw = tmp_path / 'raw'
  small, affine = np.zeros((4, 4, 4), np.float32), np.eye(4)
  files = [
    'IXI/IXI002-Guys-0828-T1.nii.gz',  # IXI: flat, one subject = IXI002
    'IXI/IXI002-Guys-0828-T2.nii.gz',
    'IXI/IXI002-Guys-0828-PD.nii.gz',  # a sequence we do not use: counted, not rejected
    'IXI/IXI012-HH-1211-T1.nii.gz',  # no T2: missing_file
    f'{NAME}/2020-01-01/{NAME}_MPRAGE.nii',  # clinical: a session folder named after the patient
    f'{NAME}/2020-01-01/{NAME}_t2w.nii.gz',
    f'{NAME}/2020-01-01/{NAME}_FLAIR_ax.nii.gz',
    f'{NAME}/2020-01-01/{NAME}_FLAIR_sag.nii.gz',  # two FLAIRs: duplicate session
    f'{NAME}/2021-05-05/{NAME}_T1w.nii.gz',
    f'{NAME}/2021-05-05/{NAME}_T2w.nii.gz',
    f'{NAME}/2021-05-05/{NAME}_localizer.nii.gz',  # names no sequence: unsupported
    f'{NAME}/2021-05-05/{NAME}_T1w.json',  # a BIDS sidecar: not an image
    'loose_T1.nii.gz',  # directly under --input: no session folder
  ]
  for rel in files:
    os.makedirs(os.path.dirname(raw / rel), exist_ok=True)
    if rel.endswith('.json'):
      (raw / rel).write_text('{}')
    else:
      nib.save(nib.Nifti1Image(small, affine), str(raw / rel))
  items, rejects, names, skipped = brain_mri.list_items(str(raw), SALT, ('t1', 't2'))
  assert skipped == {'other_sequence': 1}
  assert sorted(r[1] for r in rejects) == ['duplicate', 'format', 'missing_file', 'unsupported']
  assert sorted((it.subject, sorted(it.payload)) for it in items) == sorted(
    [('IXI002', ['t1', 't2']), (NAME, ['t1', 't2'])]
  )
  by_subject = {it.subject: it for it in items}
  assert by_subject[NAME].payload['t1'][0].endswith('_T1w.nii.gz')
  # Keys and reasons are salted names: the patient's name is in no key or reason.
  for key, _, reason in rejects:
    assert NAME not in key + reason and 'Doe' not in key + reason
  assert all(it.key.startswith('session-') for it in items)
  key = by_subject[NAME].key
  assert vc_locate(names, str(raw), key) == [os.path.join(NAME, '2021-05-05')]
  assert brain_mri.sequence_of('sub-01_ses-1_T1w.nii.gz') == 't1'
  assert brain_mri.sequence_of('T2_FLAIR.nii') == 'flair'
  assert brain_mri.sequence_of('BraTS_t1ce.nii.gz') == 'skip'


def vc_locate(names, root, key):
  from data_prep import volume_common  # pylint: disable=g-import-not-at-top

  return volume_common.locate(names, root, key)


def test_command_converts_a_head_into_mni_records_with_no_identifier_anywhere(tmp_path, head):
  """The command end to end: a synthetic head (skull, scalp, bias, moved 6 deg / 9 mm; names and
  dates planted in its folder, file names and NIfTI header strings) becomes skull-stripped,
  registered MNI slices; nibabel's shipped T1 (a real scan, but only 66 x 82 x 50 mm of central
  brain) cannot be fitted to a whole brain and is a geometry reject, not a misaligned record."""
  raw, out = tmp_path / 'raw', tmp_path / 'out'
  volumes, affine = head
  session = raw / NAME / '1970-01-01'
  for seq, name in (('t1', 'T1_MPRAGE'), ('t2', 'T2w'), ('flair', 'FLAIR')):
    _write(str(session / f'{NAME}_{name}.nii.gz'), volumes[seq], affine)
  anat = nib.load(os.path.join(data_path, 'anatomical.nii'))
  real = raw / '002_S_0295' / 'MPRAGE'
  os.makedirs(real)
  nib.save(anat, str(real / 'ADNI_002_S_0295_MR_MPRAGE.nii'))
  cmd = [
    sys.executable,
    '-m',
    'data_prep.brain_mri',
    f'--input={raw}',
    f'--output={out}',
    f'--salt={SALT.decode()}',
    '--sequences=t1',
    '--workers=0',
    '--progress=false',
    '--val_fraction=0',
    '--test_fraction=0',
    '--min_brain_fraction=0',
    '--mni_resolution=2',
    '--mni_iterations=30',
    '--n4_fit_mm=12',
  ]
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert run.returncode == 1, run.stderr[-3000:]  # the real partial scan is rejected
  with open(out / 'rejects.jsonl', encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  assert [r['kind'] for r in rows] == ['geometry'] and 'correlates' in rows[0]['reason']
  manifest = shards.read_manifest(str(out), 'train')
  assert manifest['meta']['channels'] == ['t1', 't2', 'flair']
  src = shards.open_source(str(out), 'train', 'mri')
  recs = [src[i] for i in range(len(src))]
  assert len(recs) == 95  # every axial slice of the 2 mm MNI grid (--min_brain_fraction=0)
  stack = np.stack([r['image'] for r in recs]).astype(np.float32)  # (Z, H, W, 3) canonical
  assert stack.shape == (95, 117, 99, 3)
  np.testing.assert_array_equal(recs[0]['spacing'], [2, 2, 2])
  template, brain = ops.mni_template(2)
  inside = sitk.GetArrayFromImage(ops.to_canonical(brain)) > 0
  reference = sitk.GetArrayFromImage(ops.to_canonical(template))[inside]
  # Registered (the truth gives 0.91; unregistered it is far lower) and one transform for all.
  assert np.corrcoef(stack[..., 0][inside], reference)[0, 1] > 0.85
  assert np.corrcoef(stack[..., 1][inside], reference)[0, 1] < -0.8
  assert np.corrcoef(stack[..., 2][inside], reference)[0, 1] > 0.8
  assert (stack[~inside] == 0).all()  # skull, scalp and background stripped
  for c in range(3):
    assert abs(stack[..., c][inside].mean()) < 0.01 and abs(stack[..., c][inside].std() - 1) < 0.01
  blob = _tree_bytes(out) + run.stdout.encode() + run.stderr.encode()
  for planted in (NAME, 'Doe', '1970', '002_S_0295', 'MPRAGE', SALT.decode()):
    assert planted.encode() not in blob, planted
  # Re-run: nothing converted again, same bytes.
  before = _tree_bytes(out)
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert again.returncode == 1 and _tree_bytes(out) == before
  located = subprocess.run(
    cmd + [f'--locate={rows[0]["key"]}'], cwd=ROOT, capture_output=True, text=True, timeout=1800
  )
  assert located.stdout.split() == [os.path.join('002_S_0295', 'MPRAGE')]


def test_bad_sessions_are_rejected_with_their_kind(tmp_path):
  raw, out = tmp_path / 'raw', tmp_path / 'out'
  affine = np.diag([3.0, 3.0, 3.0, 1.0])
  rng = np.random.default_rng(1)
  _write(str(raw / 'a' / 'T1.nii.gz'), rng.normal(0, 1, (8, 8, 8)).astype(np.float32) ** 2, affine)
  _write(str(raw / 'b' / 'T1.nii.gz'), np.zeros((8, 8, 8), np.float32), affine)  # blank: empty
  (raw / 'c').mkdir()
  (raw / 'c' / 'T1.nii').write_bytes(b'')  # zero bytes: empty
  options = runner.Options(
    input=str(raw),
    output=str(out),
    salt=SALT,
    workers=0,
    progress=False,
    val_fraction=0.0,
    test_fraction=0.0,
    extra={**FAST, 'sequences': 't1'},
  )
  assert brain_mri.build(options) == 1
  with open(out / 'rejects.jsonl', encoding='utf-8') as f:
    kinds = sorted(json.loads(line)['kind'] for line in f)
  assert len(kinds) == 3 and set(kinds) <= {'empty', 'geometry', 'dimensions'}, kinds
  with pytest.raises(ValueError, match='--sequences'):
    brain_mri.build(runner.Options(**{**options.__dict__, 'extra': {'sequences': 't1,pd'}}))
