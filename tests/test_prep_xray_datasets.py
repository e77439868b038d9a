"""CheXpert, MIMIC-CXR-JPG, COVIDx, RSNA Bone Age and MedMNIST converters on tiny files in each real layout.

Each test writes a handful of small images (PIL) and label files exactly as the dataset publishes
them, converts at 32 px, and checks the round trip: pixels equal the X-ray ops applied to the
source file, labels / targets follow their image, splits are official or patient-level, and every
planted bad input is a reject row with its kind while the good files still convert.
"""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from aacp_jax.data import shards
from data_prep import chexpert, covidx, medmnist, mimic_cxr, privacy, rsna_boneage, runner
from data_prep import xray_common as xc
from data_prep.ops import xray

SALT = b'xray-test-salt-0123456789'
SIZE = 32
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pixels(seed, shape=(40, 48)):
  """A smooth gradient plus noise: survives JPEG and gives CLAHE something to do."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[: shape[0], : shape[1]]
  return np.clip(40 + y + x // 2 + rng.normal(0, 8, shape) + (13 * seed) % 60, 0, 255).astype(
    np.uint8
  )


def _save(path, seed, shape=(40, 48)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(_pixels(seed, shape)).save(path)


def _truncate(path):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[: len(data) // 2])


def _options(root, out, **extra):
  return runner.Options(
    input=str(root),
    output=str(out),
    salt=SALT,
    workers=0,
    image_size=SIZE,
    items_per_shard=4,
    progress=False,
    val_fraction=0.25,
    test_fraction=0.25,
    extra=extra,
  )


def _records(out):
  """{split: [records]} of everything written."""
  got = {}
  for split in ('train', 'val', 'test'):
    if os.path.exists(os.path.join(out, split, shards.MANIFEST)):
      src = shards.open_source(str(out), split, 'xray')
      got[split] = [src[i] for i in range(len(src))]
  return got


def _rejects(out):
  with open(os.path.join(out, 'rejects.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  for r in rows:  # every reject says why, on one line
    assert r['reason'].strip() and '\n' not in r['reason'] and len(r['reason']) <= 300, r
  return {r['key']: r['kind'] for r in rows}


def _expected(path):
  return xray.prepare_xray(xray.read_image_file(path), size=SIZE)[0]


def _find(records, image):
  hits = [r for rs in records.values() for r in rs if np.array_equal(r['image'], image)]
  assert len(hits) == 1, f'{len(hits)} records match the expected image'
  return hits[0]


def _chexpert_row(path, labels, view='Frontal'):
  values = ['' if v is None else f'{v:.1f}' for v in labels]
  return ','.join([path, 'Female', '68', view, 'AP' if view == 'Frontal' else ''] + values)


def test_chexpert_round_trip_and_bad_input_matrix(tmp_path):
  root, out = tmp_path / 'CheXpert-v1.0-small', tmp_path / 'out'
  header = 'Path,Sex,Age,Frontal/Lateral,AP/PA,' + ','.join(xc.CHEXPERT_LABELS)
  rows = {'train.csv': [], 'valid.csv': []}
  truth = {}
  rng = np.random.default_rng(0)
  for p in range(8):
    csv_name, folder = ('valid.csv', 'valid') if p >= 6 else ('train.csv', 'train')
    for s in range(2):
      rel = f'{folder}/patient{p:05d}/study1/view{s + 1}_frontal.jpg'
      _save(str(root / rel), seed=10 * p + s)
      labels = [int(v) if v < 2 else None for v in rng.integers(-1, 3, 14)]
      truth[rel] = [0 if v is None else v for v in labels]
      rows[csv_name].append(_chexpert_row(f'CheXpert-v1.0-small/{rel}', labels))
  # The bad-input matrix, one of each kind next to the good files.
  bad = {
    'train/patient00100/study1/view1_frontal.jpg': 'corrupt',
    'train/patient00101/study1/view1_frontal.jpg': 'truncated',
    'train/patient00102/study1/view1_frontal.jpg': 'empty',
    'train/patient00103/study1/view1_frontal.jpg': 'dimensions',
    'train/patient00104/study1/view1_frontal.jpg': 'unknown_label',
    'train/patient00105/study1/view1_frontal.jpg': 'missing_file',
    'train/patient00106/study1/view1_frontal.jpg': 'missing_label',
  }
  for rel, kind in bad.items():
    if kind in ('corrupt', 'truncated', 'empty', 'dimensions', 'unknown_label', 'missing_label'):
      _save(str(root / rel), seed=99, shape=(4, 200) if kind == 'dimensions' else (40, 48))
    if kind == 'corrupt':
      (root / rel).write_bytes(b'\xff\xd8 this is no JPEG')
    if kind == 'truncated':
      _truncate(str(root / rel))
    if kind == 'empty':
      (root / rel).write_bytes(b'')
    if kind != 'missing_label':
      labels = [2.0] + [0] * 13 if kind == 'unknown_label' else [1] * 14
      rows['train.csv'].append(_chexpert_row(f'CheXpert-v1.0-small/{rel}', labels))
  rows['train.csv'].append(rows['train.csv'][0])  # a duplicate listing
  for name, lines in rows.items():
    (root / name).write_text('\n'.join([header] + lines) + '\n')
  status = chexpert.build(_options(root, out))
  assert status == 1
  rejects = _rejects(out)
  assert {k: rejects.get(k) for k in bad} == bad
  assert rejects['train/patient00000/study1/view1_frontal.jpg'] == 'duplicate'
  records = _records(out)
  assert sum(len(v) for v in records.values()) == len(truth)  # every good file converted
  subjects = {}
  for rel, labels in truth.items():
    r = _find(records, _expected(str(root / rel)))
    np.testing.assert_array_equal(r['labels'], labels)
    assert r['image'].shape == (SIZE, SIZE, 1) and r['region'] == 'chest'
    assert r['subject'] == privacy.subject_hash(SALT, 'chexpert', rel.split('/')[1])
    split = next(s for s, rs in records.items() if any(x is r for x in rs))
    subjects.setdefault(r['subject'], set()).add(split)
    assert (split == 'test') == rel.startswith('valid/')  # official valid.csv is the test split
  assert all(len(s) == 1 for s in subjects.values())  # patient level
  assert shards.read_manifest(str(out), 'test')['label_names'] == {'xray': list(xc.CHEXPERT_LABELS)}


def _gz_csv(path, header, rows):
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    f.write('\n'.join([header] + [','.join(map(str, r)) for r in rows]) + '\n')


def test_mimic_cxr_official_split_labels_by_study_frontal_only(tmp_path):
  root, out = tmp_path / 'mimic', tmp_path / 'out'
  splits, chex, meta, truth = [], [], [], {}
  for i, (split, view) in enumerate(
    [('train', 'PA'), ('train', 'AP'), ('validate', 'PA'), ('test', 'AP'), ('train', 'LATERAL')]
  ):
    subject, study, dicom = f'1{i:07d}', f'5{i:07d}', f'dcm-{i}'
    rel = mimic_cxr.image_rel(subject, study, dicom)
    _save(str(root / rel), seed=i)
    splits.append((dicom, study, subject, split))
    labels = [(i + j) % 3 - 1 for j in range(14)]
    chex.append((subject, study, *[f'{v:.1f}' for v in labels]))
    meta.append((dicom, subject, study, 'CHEST (PA AND LAT)', view, 40, 48, 21800101, 1200))
    truth[rel] = (labels, {'validate': 'val'}.get(split, split), view)
  _save(str(root / mimic_cxr.image_rel('19999999', '59999999', 'orphan')), seed=7)
  splits.append(('nolabel', '58888888', '18888888', 'train'))  # study missing from chexpert.csv
  _save(str(root / mimic_cxr.image_rel('18888888', '58888888', 'nolabel')), seed=8)
  _gz_csv(root / 'mimic-cxr-2.0.0-split.csv.gz', 'dicom_id,study_id,subject_id,split', splits)
  _gz_csv(
    root / 'mimic-cxr-2.0.0-chexpert.csv.gz',
    'subject_id,study_id,' + ','.join(xc.CHEXPERT_LABELS),
    chex,
  )
  _gz_csv(
    root / 'mimic-cxr-2.0.0-metadata.csv.gz',
    'dicom_id,subject_id,study_id,'
    'PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime',
    meta,
  )
  assert mimic_cxr.build(_options(root, out, frontal_only=True)) == 1
  assert _rejects(out) == {
    mimic_cxr.image_rel('19999999', '59999999', 'orphan'): 'missing_label',
    mimic_cxr.image_rel('18888888', '58888888', 'nolabel'): 'missing_label',
  }
  records = _records(out)
  assert shards.read_manifest(str(out), 'train')['meta']['skipped_not_frontal'] == 1
  assert sum(map(len, records.values())) == 4
  for rel, (labels, split, view) in truth.items():
    if view == 'LATERAL':
      continue
    r = _find({split: records[split]}, _expected(str(root / rel)))
    np.testing.assert_array_equal(r['labels'], labels)


def test_covidx_labels_official_splits_and_leaks(tmp_path):
  root, out = tmp_path / 'covidx', tmp_path / 'out'
  names = ('normal', 'pneumonia', 'COVID-19')
  lines, truth = {'train.txt': [], 'test.txt': []}, {}
  for i in range(9):
    split = 'test' if i >= 6 else 'train'
    ext = 'png' if i % 2 else 'jpeg'
    rel = f'{split}/img{i}.{ext}'
    _save(str(root / rel), seed=i)
    lines[f'{split}.txt'].append(f'{100 + i} img{i}.{ext} {names[i % 3]} cohen')
    truth[rel] = i % 3
  lines['train.txt'].append('200 bad.png covid cohen')  # unknown label value
  _save(str(root / 'train/bad.png'), seed=50)
  lines['train.txt'].append('106 leak.png normal cohen')  # patient 106 is in test too
  _save(str(root / 'train/leak.png'), seed=51)
  lines['train.txt'].append('300 img0.jpeg normal cohen')  # the same image listed twice
  lines['test.txt'].append('301 gone.png normal rsna')
  lines['test.txt'].append('302 onlytwo')
  for name, text in lines.items():
    (root / name).write_text('\n'.join(text) + '\n')
  assert covidx.build(_options(root, out)) == 1
  assert _rejects(out) == {
    'train/bad.png': 'unknown_label',
    'train/leak.png': 'split_leak',
    'train/img0.jpeg': 'duplicate',
    'test/gone.png': 'missing_file',
    'test.txt line 5': 'missing_label',
  }
  records = _records(out)
  assert shards.read_manifest(str(out), 'train')['label_names'] == {'xray': list(names)}
  for rel, label in truth.items():
    split = rel.split('/')[0]
    assert int(_find({split: records[split]}, _expected(str(root / rel)))['label']) == label


def test_rsna_boneage_target_and_hash_split(tmp_path):
  root, out = tmp_path / 'boneage', tmp_path / 'out'
  folder = root / rsna_boneage.FOLDER
  rows, truth = ['id,boneage,male'], {}
  for i in range(12):
    _save(str(folder / f'{1377 + i}.png'), seed=i, shape=(48, 40))
    rows.append(f'{1377 + i},{6 + 17 * i},{"True" if i % 2 else "False"}')
    truth[f'{1377 + i}.png'] = 6 + 17 * i
  rows.append('1500,abc,True')  # unreadable target
  _save(str(folder / '1500.png'), seed=40)
  _save(str(folder / '1501.png'), seed=41)
  rows.append('1501,100,True')
  _truncate(str(folder / '1501.png'))
  (root / rsna_boneage.CSV).write_text('\n'.join(rows) + '\n')
  assert rsna_boneage.build(_options(root, out)) == 1
  assert _rejects(out) == {
    f'{rsna_boneage.FOLDER}/1500.png': 'unknown_label',
    f'{rsna_boneage.FOLDER}/1501.png': 'truncated',
  }
  records = _records(out)
  assert set(records) == {'train', 'val', 'test'}
  for name, months in truth.items():
    r = _find(records, _expected(str(folder / name)))
    assert r['target'] == np.float32(months) and r['region'] == 'hand'
  stats = shards.read_manifest(str(out), 'train')['meta']['stats']['xray']
  assert stats['target']['count'] == len(records['train'])


def _npz(path, n=(3, 2, 2), width=1, dtype=np.uint8, side=28, keys=None, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, count in zip(('train', 'val', 'test'), n):
    arrays[f'{split}_images'] = rng.integers(0, 256, (count, side, side)).astype(dtype)
    arrays[f'{split}_labels'] = rng.integers(0, 2, (count, width)).astype(np.uint8)
  if keys:
    arrays = {keys.get(k, k): v for k, v in arrays.items()}
  np.savez_compressed(path, **arrays)
  return arrays


def test_medmnist_subsets_official_splits_and_bad_files(tmp_path):
  root, out = tmp_path / 'medmnist', tmp_path / 'out'
  root.mkdir()
  good = _npz(root / 'pneumoniamnist.npz')
  nan = _npz(root / 'pneumoniamnist_64.npz', dtype=np.float32, side=64, seed=1)
  nan['train_images'][1, 3, 3] = np.nan
  np.savez_compressed(root / 'pneumoniamnist_64.npz', **nan)
  _npz(root / 'chestmnist.npz', width=14, keys={'train_images': 'x_train'})
  _npz(root / 'dermamnist.npz')
  (root / 'breastmnist_128.npz').write_bytes(b'PK\x03\x04 truncated zip')
  assert medmnist.build(_options(root, out, image_size_given=True)) == 1
  assert _rejects(out) == {
    'chestmnist.npz': 'format',
    'dermamnist.npz': 'unsupported',
    'breastmnist_128.npz': 'unsupported',
    'pneumoniamnist_64.npz/train/000001': 'nan',
  }
  records = _records(out)
  assert [len(records[s]) for s in ('train', 'val', 'test')] == [3 + 2, 2 + 2, 2 + 2]
  for split in ('train', 'val', 'test'):
    for i, image in enumerate(good[f'{split}_images']):
      r = _find({split: records[split]}, xray.prepare_xray(image, size=SIZE)[0])
      assert int(r['label']) == int(good[f'{split}_labels'][i, 0])
  # ChestMNIST: 14 findings become the multi-label vector; the native size is kept by default.
  chest_root, chest_out = tmp_path / 'chest', tmp_path / 'chest_out'
  chest_root.mkdir()
  chest = _npz(chest_root / 'chestmnist.npz', n=(2, 1, 1), width=14)
  assert medmnist.build(_options(chest_root, chest_out, image_size_given=False)) == 0
  r = _records(chest_out)['train'][0]
  assert r['image'].shape == (28, 28, 1)
  np.testing.assert_array_equal(r['labels'], chest['train_labels'][0])
  manifest = shards.read_manifest(str(chest_out), 'val')
  assert manifest['label_names']['xray'][0] == 'atelectasis'


def test_cli_exit_status_and_salt_required(tmp_path):
  root, out = tmp_path / 'covidx', tmp_path / 'out'
  _save(str(root / 'train/a.png'), seed=1)
  _save(str(root / 'test/b.png'), seed=2)
  (root / 'train.txt').write_text('1 a.png normal x\n1 a.png normal x\n')
  (root / 'test.txt').write_text('2 b.png pneumonia x\n')
  (tmp_path / 'salt').write_text('a-long-enough-secret-salt\n')
  cmd = [
    sys.executable,
    '-m',
    'data_prep.covidx',
    f'--input={root}',
    f'--output={out}',
    '--image_size=32',
    '--workers=0',
    '--noprogress',
  ]
  env = {**os.environ, 'PYTHONPATH': _REPO}
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_REPO, env=env, timeout=1800)
  assert proc.returncode != 0 and '--salt or --salt_file' in proc.stderr
  assert not out.exists()
  proc = subprocess.run(
    cmd + [f'--salt_file={tmp_path / "salt"}'],
    capture_output=True,
    text=True,
    cwd=_REPO,
    env=env,
    timeout=1800,
  )
  assert proc.returncode == 1, proc.stderr
  last = proc.stdout.strip().splitlines()[-1]
  assert '2 records' in last and '1 rejected (duplicate 1)' in last
  assert 'a-long-enough-secret-salt' not in proc.stdout + proc.stderr
