"""``python -m data_prep.dicom_xray`` on pydicom-data's real radiographs and on synthetic CR files
with planted identifiers: records equal the X-ray ops applied to ``ops.read_dicom_xray``, labels and
splits follow the CSV, every bad input is a reject with its kind, and no identifier (header values,
folder and file names, UIDs) reaches any output byte or the terminal.
"""

import copy
import os
import shutil
import subprocess
import sys

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from data_prep import dicom_xray, ops, privacy, runner
from data_prep import xray_common as xc
from tests.test_prep_privacy import IDENTIFIERS, _leaks
from tests.test_prep_xray_datasets import SIZE, _records

RADIOGRAPHS = os.path.join(os.path.dirname(__import__('data_store').__file__), 'data')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALT = 'dicom-xray-salt-0123456789'
SOP = '1.2.826.0.1.3680043.8.498.{}'


def _cr(path, stored, photometric, *, patient, sop, spacing=(0.2, 0.3)):
  """A CR radiograph on CT_small's header, every identifier field planted."""
  ds = copy.deepcopy(pydicom.dcmread(get_testdata_file('CT_small.dcm')))
  for key, value in IDENTIFIERS.items():
    setattr(ds, key, value)
  ds.PatientID, ds.SOPInstanceUID = patient, sop
  ds.Modality, ds.PhotometricInterpretation = 'CR', photometric
  ds.Rows, ds.Columns = stored.shape
  ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept = 0, 1, 0
  ds.PixelSpacing = list(spacing)
  ds.PixelData = np.ascontiguousarray(stored, np.uint16).tobytes()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ds.save_as(path)


def _tree(raw):
  """{relpath: (kind or None, labels)} of an export laid out as institutions (and MIMIC) name it."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[:60, :50]
  files = {}
  for p in range(4):
    patient = f'MRN-7Q3X{p}'
    rel = f'{IDENTIFIERS["PatientName"].replace("^", "_")}_{patient}/{SOP.format(100 + p)}.dcm'
    shown = (200 + 30 * y + 10 * x + rng.normal(0, 20, y.shape)).clip(0, 4000)  # bright low right
    # MONOCHROME1 stores the same picture inverted (low = white), as CR plates write it.
    stored = 4000 - shown if p % 2 else shown
    _cr(
      str(raw / rel),
      stored,
      'MONOCHROME1' if p % 2 else 'MONOCHROME2',
      patient=patient,
      sop=SOP.format(100 + p),
    )
    files[rel] = (None, [p % 2] + [0] * 12 + [1])
  for name in ('RG1_UNCR.dcm', 'RG3_UNCR.dcm'):  # real CR radiographs, MONOCHROME1
    shutil.copy(os.path.join(RADIOGRAPHS, name), raw / name)
    files[name] = (None, [1] + [0] * 13)
  shutil.copy(get_testdata_file('CT_small.dcm'), raw / 'ct.dcm')
  files['ct.dcm'] = ('unsupported', [0] * 14)
  shutil.copy(os.path.join(RADIOGRAPHS, 'SC_rgb.dcm'), raw / 'colour.dcm')
  files['colour.dcm'] = ('unsupported', [0] * 14)
  cut = raw / f'{SOP.format(900)}.dcm'
  cut.write_bytes((raw / 'RG3_UNCR.dcm').read_bytes()[:-1000])
  files[cut.name] = ('truncated', [0] * 14)
  blank = raw / 'blank.dcm'
  _cr(str(blank), np.full((40, 40), 7), 'MONOCHROME2', patient='MRN-7Q3XB', sop=SOP.format(901))
  files['blank.dcm'] = ('empty', [0] * 14)
  _cr(
    str(raw / 'unlisted.dcm'),
    np.eye(40) * 100,
    'MONOCHROME2',
    patient='MRN-7Q3XU',
    sop=SOP.format(902),
  )
  return files


def _csv(path, files, extra_rows=()):
  header = 'path,' + ','.join(xc.CHEXPERT_LABELS)
  lines = (
    [header]
    + [f'{rel},' + ','.join(str(v) for v in labels) for rel, (_, labels) in files.items()]
    + list(extra_rows)
  )
  path.write_text('\n'.join(lines) + '\n')


def _options(raw, out, labels):
  return runner.Options(
    input=str(raw),
    output=str(out),
    salt=SALT.encode(),
    workers=0,
    image_size=SIZE,
    items_per_shard=3,
    progress=False,
    val_fraction=0.0,
    test_fraction=0.0,
    extra={'labels': str(labels), 'clahe': True},
  )


def test_dicom_radiographs_records_labels_and_rejects(tmp_path):
  raw, out, labels = tmp_path / 'raw', tmp_path / 'out', tmp_path / 'labels.csv'
  files = _tree(raw)
  _csv(labels, files, ['missing/gone.dcm,' + ','.join(['1'] * 14)])
  assert dicom_xray.build(_options(raw, out, labels)) == 1
  key = lambda rel: dicom_xray.vc.hashed_key(SALT.encode(), 'dicom_xray', 'file', rel)
  kinds = {
    r['key']: r['kind']
    for r in map(__import__('json').loads, open(out / 'rejects.jsonl', encoding='utf-8'))
  }
  want = {key(rel): kind for rel, (kind, _) in files.items() if kind}
  want[key('unlisted.dcm')] = 'missing_label'
  want[key('missing/gone.dcm')] = 'missing_file'
  assert kinds == want
  got = [r for rs in _records(out).values() for r in rs]
  good = {rel: labels for rel, (kind, labels) in files.items() if kind is None}
  assert len(got) == len(good)  # every good file converted
  for rel, truth in good.items():
    pixels, spacing = ops.read_dicom_xray(str(raw / rel))
    expected = xc.xray_record(pixels, _options(raw, out, labels), spacing=spacing)
    hits = [r for r in got if np.array_equal(r['image'], expected['image'])]
    assert len(hits) == 1, rel
    np.testing.assert_array_equal(hits[0]['labels'], truth)
    np.testing.assert_allclose(hits[0]['spacing'], expected['spacing'])
    patient = pydicom.dcmread(str(raw / rel), stop_before_pixels=True).PatientID
    assert hits[0]['subject'] == privacy.subject_hash(SALT.encode(), 'dicom_xray', patient)
  # MONOCHROME1 is inverted: the synthetic pictures are bright at the bottom in both encodings
  # (CLAHE flattens the gradient in the record, so the read pixels carry the size of the check).
  synthetic = [r for r in got if r['spacing'][0] > 0]
  assert len(synthetic) == 4
  for r in synthetic:
    image = r['image'][..., 0].astype(int)
    assert image[20:28, 8:24].mean() > image[4:8, 8:24].mean()
  for rel in [r for r in good if r.endswith(tuple(f'{100 + p}.dcm' for p in range(4)))]:
    pixels, _ = ops.read_dicom_xray(str(raw / rel))
    assert pixels[-10:].mean() > pixels[:10].mean() + 1000, rel


def test_dicom_xray_command_writes_no_identifier_and_locates(tmp_path):
  raw, out, labels = tmp_path / 'raw', tmp_path / 'out', tmp_path / 'labels.csv'
  files = _tree(raw)
  _csv(labels, files)
  needles = sorted(
    set(IDENTIFIERS.values())
    | {f'MRN-7Q3X{p}' for p in range(4)}
    | {SOP.format(n) for n in (100, 101, 102, 103, 900, 901, 902)}
    | set(IDENTIFIERS['PatientName'].split('^'))
    | {'9RG1', '11RG3', 'RG1_UNCR'}
  )
  planted = {v.lower() for k, v in IDENTIFIERS.items() if k != 'PatientID'}  # ids: MRN-7Q3X0..3
  assert {n for _, n in _leaks(str(raw), needles)} >= planted | {'mrn-7q3x0'}  # the test can fail
  cmd = [
    sys.executable,
    '-m',
    'data_prep.dicom_xray',
    f'--input={raw}',
    f'--output={out}',
    f'--salt={SALT}',
    f'--labels={labels}',
    '--workers=1',
    f'--image_size={SIZE}',
    '--val_fraction=0',
    '--test_fraction=0',
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'dicom_xray: 6 records' in proc.stdout and '5 rejected' in proc.stdout, proc.stdout
  assert _leaks(str(out), needles, texts=(proc.stdout, proc.stderr)) == []
  # --locate names the file behind a key, on the terminal only.
  bad = [line for line in open(out / 'rejects.jsonl', encoding='utf-8') if 'truncated' in line]
  key = __import__('json').loads(bad[0])['key']
  where = subprocess.run(
    cmd + [f'--locate={key}'], cwd=ROOT, capture_output=True, text=True, timeout=1800
  )
  assert where.returncode == 0 and where.stdout.strip() == f'{SOP.format(900)}.dcm'
