"""No patient identifier planted in DICOM headers (or in the folder and file names that institutional
exports derive from them) reaches any output byte of ``data_prep.dicom_ct`` or ``data_prep.lidc_idri``:
shards, manifests, rejects.jsonl, progress sidecars, and the command's stdout/stderr.

ArrayRecord compresses its chunks (two 77x61x64 int16 CT records, 1.2 MB encoded, take a 128 KiB shard),
so raw shard bytes alone could hide a leak: every record is also decoded and its string fields and
re-encoded (uncompressed) bytes are scanned.
"""

import os
import shutil
import subprocess
import sys

import numpy as np

from aacp_jax.data import records as rec
from aacp_jax.data import shards
from data_prep import lidc_idri, runner, volume_common
from data_prep.bench_prep import write_dicom_series
from tests.test_prep_volume_datasets import write_lidc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALT = 'privacy-test-salt-0123456789'
STUDY_UID = '1.2.826.0.1.3680043.8.498.77001'
SERIES_UID = '1.2.826.0.1.3680043.8.498.77002'
MR_SERIES_UID = '1.2.826.0.1.3680043.8.498.77003'
IDENTIFIERS = {
  'PatientName': 'Zyxwvu^Quentinia',
  'PatientID': 'MRN-7Q3X9',
  'PatientBirthDate': '19471103',
  'AccessionNumber': 'ACC99887766',
  'InstitutionName': 'Saint Plantedia Hospital',
  'ReferringPhysicianName': 'Drplanted^Yvonnea',
  'StudyID': 'STUDY4242',
  'OtherPatientIDs': 'OTHERID-5151',
  'PatientAddress': '12 Plantedwood Lane',
  'StudyDate': '20190314',
  'PatientTelephoneNumbers': '555-0199-321',
}


def _needles(extra=()):
  """Every identifier string, plus the parts of person names, plus the UIDs."""
  out = set(IDENTIFIERS.values()) | {STUDY_UID, SERIES_UID, MR_SERIES_UID} | set(extra)
  for key in ('PatientName', 'ReferringPhysicianName'):
    out |= set(IDENTIFIERS[key].split('^'))
  return sorted(out)


def _leaks(root, needles, texts=()):
  """(where, needle) for each needle found in any file under root, any decoded record, or texts."""
  found = []
  lowered = [n.lower().encode() for n in needles]
  blobs = [(f'text{i}', t.encode()) for i, t in enumerate(texts)]
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        blobs.append((os.path.relpath(path, root), f.read()))
      blobs.append(('name', os.path.relpath(path, root).encode()))
  for split in ('train', 'val', 'test'):
    if os.path.exists(os.path.join(root, split, shards.MANIFEST)):
      for modality in shards.read_manifest(root, split)['modalities']:
        src = shards.open_source(root, split, modality)
        for i in range(len(src)):
          record = src[i]
          blobs.append((f'{split}/{modality}[{i}]', rec.encode(record)))
          blobs.append(
            (
              f'{split}/{modality}[{i}] strings',
              ' '.join(v for v in record.values() if isinstance(v, str)).encode(),
            )
          )
  for where, blob in blobs:
    low = blob.lower()
    found += [(where, n.decode()) for n in lowered if n in low]
  return found


def test_the_leak_scanner_finds_planted_strings(tmp_path):
  (tmp_path / 'x.txt').write_text('... patient zyxwvu^quentinia ...')
  assert {n for _, n in _leaks(str(tmp_path), _needles())} == {
    'zyxwvu^quentinia',
    'zyxwvu',
    'quentinia',
  }


def _write_export(raw):
  """An institutional export: folders named after the patient, the accession and the series UID;
  files named by SOPInstanceUID. One good CT series, one with a truncated slice, an MR series, and a
  stray report file."""
  patient = raw / f'{IDENTIFIERS["PatientName"].replace("^", "_")}_{IDENTIFIERS["PatientID"]}'
  study = patient / f'{IDENTIFIERS["StudyDate"]}_{IDENTIFIERS["AccessionNumber"]}'
  slices = np.full((31, 20, 16), -1000.0)
  slices[:, 10:, :] = 40
  uids = []
  name_fn = lambda k: f'{SERIES_UID}.{k + 1}.dcm'  # SOPInstanceUID-style names
  good = write_dicom_series(
    str(study / SERIES_UID),
    slices,
    spacing=(4.0, 4.0, 2.5),
    header=IDENTIFIERS,
    series_uid=SERIES_UID,
    study_uid=STUDY_UID,
    name_fn=name_fn,
  )
  bad = write_dicom_series(
    str(study / f'{SERIES_UID}9'),
    slices[:3],
    spacing=(4.0, 4.0, 2.5),
    header=IDENTIFIERS,
    series_uid=SERIES_UID + '9',
    study_uid=STUDY_UID,
  )
  with open(bad[1], 'r+b') as f:
    f.truncate(500)
  write_dicom_series(
    str(study / MR_SERIES_UID),
    slices[:2],
    modality='MR',
    header=IDENTIFIERS,
    series_uid=MR_SERIES_UID,
    study_uid=STUDY_UID,
  )
  (patient / f'report_{IDENTIFIERS["PatientID"]}.txt').write_text(
    f'{IDENTIFIERS["PatientName"]} born {IDENTIFIERS["PatientBirthDate"]}'
  )
  import pydicom

  uids += [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in good + bad]
  return uids


def test_dicom_ct_writes_no_identifier(tmp_path):
  raw, out = tmp_path / 'raw', tmp_path / 'out'
  sop_uids = _write_export(raw)
  needles = _needles(sop_uids)
  # The identifiers are really in the input (headers, folder and file names): the test can fail.
  assert {n for _, n in _leaks(str(raw), needles)} == {n.lower() for n in needles}
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'data_prep.dicom_ct',
      f'--input={raw}',
      f'--output={out}',
      f'--salt={SALT}',
      '--workers=1',
      '--progress=true',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert proc.returncode == 1, proc.stderr[-2000:]  # something was rejected, and it says so
  # Rejected: the report (not DICOM), the cut slice, its too-short series, the MR series.
  assert 'dicom_ct: 2 records' in proc.stdout and '4 rejected' in proc.stdout, proc.stdout
  assert _leaks(str(out), needles, texts=(proc.stdout, proc.stderr)) == []
  assert SALT not in proc.stdout + proc.stderr and _leaks(str(out), [SALT]) == []


def test_lidc_idri_writes_no_identifier(tmp_path, capsys):
  raw, out = tmp_path / 'raw', tmp_path / 'out'
  header = {k: v for k, v in IDENTIFIERS.items() if k != 'PatientID'}
  series = write_lidc(raw, header=header, reader_id='RADIOLOGIST-ID-777')
  shutil.copy(series / '069.xml', series / 'broken.xml')
  with open(series / 'broken.xml', 'r+b') as f:
    f.truncate(300)  # a rejected, unparsable XML
  needles = _needles(
    [
      'LIDC-IDRI-0001',
      'RADIOLOGIST-ID-777',
      '1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178',
    ]
  )
  needles = [
    n for n in needles if n not in (STUDY_UID, SERIES_UID, MR_SERIES_UID, IDENTIFIERS['PatientID'])
  ]
  assert {n for _, n in _leaks(str(raw), needles)} == {n.lower() for n in needles}
  o = runner.Options(
    input=str(raw),
    output=str(out),
    salt=SALT.encode(),
    workers=0,
    progress=False,
    val_fraction=0.0,
    test_fraction=0.0,
    extra={'crop': 32},
  )
  items, bad, names = lidc_idri.list_items(str(raw), SALT.encode())
  assert runner.run('lidc_idri', items, lidc_idri.convert, o, rejects=bad) == 1
  captured = capsys.readouterr()
  (broken,) = [key for key, kind, _ in bad if kind == 'corrupt']
  assert volume_common.locate(names, str(raw), broken) == [
    os.path.relpath(series / 'broken.xml', raw)
  ]
  assert shards.read_manifest(str(out), 'train')['modalities']['ct']['count'] == 2
  assert _leaks(str(out), needles, texts=(captured.out, captured.err)) == []
