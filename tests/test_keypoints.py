"""Keypoint annotation workflow: export PNGs, import a CSV / JSON of clicks, bad files refused."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from aacp_jax.data import landmarks as lm
from aacp_jax.data import phantoms as ph
from aacp_jax.data import shards
from data_prep import keypoints as kp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 32


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return ph.build(
    str(tmp_path_factory.mktemp('ph')),
    seed=0,
    image_size=S,
    counts={'train': {'xray': 12, 'ct': 6}},
    progress=False,
  )


@pytest.fixture(scope='module')
def exported(root, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('ann'))
  names = kp.export(root, out, 'xray', 'train', 10, seed=0)
  names += kp.export(root, out, 'ct', 'train', 3, seed=0)
  return out, names


def truth_rows(root, out, names):
  """CSV rows holding each exported image's ground-truth landmarks in exported-pixel units."""
  index = kp._read_index(os.path.join(out, kp.INDEX_FILE))  # pylint: disable=protected-access
  rows = []
  for name in names:
    info = index[name]
    record = shards.open_source(root, info['split'], info['modality'])[info['index']]
    vis = np.flatnonzero(record['landmark_visible'])
    if not len(vis):
      rows.append([name, 'none', '', ''])
    for k in vis:
      y, x = record['landmarks'][k]
      rows.append(
        [name, lm.LANDMARKS[k], repr(float(y) * info['height']), repr(float(x) * info['width'])]
      )
  return rows


def write_csv(path, rows, header=('image', 'landmark', 'y', 'x')):
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return path


def test_export_writes_pngs_and_index(root, exported):
  out, names = exported
  assert len(names) == 13
  index = kp._read_index(os.path.join(out, kp.INDEX_FILE))  # pylint: disable=protected-access
  assert set(index) == set(names)
  for name in names:
    with Image.open(os.path.join(out, 'images', name)) as im:
      assert im.size == (S, S) and im.mode == 'L'
  info = index[names[0]]
  record = shards.open_source(root, 'train', 'xray')[info['index']]
  png = np.asarray(Image.open(os.path.join(out, 'images', names[0])))
  np.testing.assert_array_equal(png, record['image'][..., 0])


@pytest.mark.parametrize('fmt', ['csv', 'json'])
def test_import_round_trips_the_landmarks(root, exported, tmp_path, fmt):
  out, names = exported
  rows = truth_rows(root, out, names)
  if fmt == 'csv':
    ann = write_csv(os.path.join(out, 'keypoints.csv'), rows)
  else:
    images = {}
    for name, mark, y, x in rows:
      images.setdefault(name, {})
      if mark != 'none':
        images[name][mark] = [float(y), float(x)]
    ann = os.path.join(out, 'keypoints.json')
    with open(ann, 'w') as f:
      json.dump({'images': images}, f)
  dest = str(tmp_path / 'kp')
  counts = kp.import_annotations(root, dest, ann, seed=0, test_fraction=0.3)
  assert sum(n for split in counts.values() for n in split.values()) == 13
  index = kp._read_index(os.path.join(out, kp.INDEX_FILE))  # pylint: disable=protected-access
  by_subject = {}
  seen = 0
  for split in counts:
    for m in counts[split]:
      src = shards.open_source(dest, split, m)
      for i in range(len(src)):
        got = src[i]
        by_subject.setdefault(got['subject'], set()).add(split)
        # Find the original record by subject and compare the landmarks.
        orig = [
          shards.open_source(root, 'train', m)[index[n]['index']]
          for n in names
          if index[n]['modality'] == m
        ]
        match = [
          o
          for o in orig
          if o['subject'] == got['subject'] and np.array_equal(o['image'], got['image'])
        ]
        assert len(match) == 1
        np.testing.assert_array_equal(got['landmark_visible'], match[0]['landmark_visible'])
        np.testing.assert_allclose(got['landmarks'], match[0]['landmarks'], atol=1e-6)
        if m == 'xray':  # frontal: canonical defaults to the in-image position
          np.testing.assert_allclose(got['landmarks_canonical'], got['landmarks'], atol=1e-6)
        else:
          assert (got['landmarks_canonical'] == 0).all()
        seen += 1
  assert seen == 13
  assert all(len(s) == 1 for s in by_subject.values())  # patient-level split


def test_bad_annotations_are_all_reported_and_nothing_is_written(root, exported, tmp_path):
  out, names = exported
  good = truth_rows(root, out, names)[:3]
  bad = good + [
    ['nope.png', 'cardiac_apex', '1', '1'],  # not exported
    [names[0], 'carina', '1', '1'],  # not a vocabulary name
    [names[1], 'cardiac_apex', '40', '3'],  # outside the 32x32 image
    [names[1], 'aortic_arch', 'nan', '3'],  # NaN
    [good[0][0], good[0][1], '2', '2'],  # duplicate
  ]
  ann = write_csv(str(tmp_path / 'bad.csv'), bad)
  dest = str(tmp_path / 'never')
  with pytest.raises(ValueError) as e:
    kp.import_annotations(root, dest, ann, index_path=os.path.join(out, kp.INDEX_FILE))
  msg = str(e.value)
  assert '\n' not in msg and msg.startswith('5 annotation problem(s)')
  for needle in (
    "'nope.png' is not in index.csv",
    "unknown landmark 'carina'",
    'outside the 32x32 image',
    'bad number',
    'annotated twice',
  ):
    assert needle in msg
  assert 'bad.csv:5' in msg  # file and line
  assert not os.path.exists(dest)
  header = write_csv(str(tmp_path / 'header.csv'), good, header=('image', 'name', 'y', 'x'))
  with pytest.raises(ValueError, match=r"header lacks \['landmark'\]"):
    kp.import_annotations(root, dest, header, index_path=os.path.join(out, kp.INDEX_FILE))


def test_cli_import_error_is_one_line(root, exported, tmp_path):
  out, names = exported
  ann = write_csv(str(tmp_path / 'k.csv'), [[names[0], 'carina', '1', '1']])
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'data_prep.keypoints',
      'import',
      f'--input={root}',
      f'--output={tmp_path}/o',
      f'--annotations={ann}',
      f'--index={out}/index.csv',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: 1 annotation problem(s)') and "'carina'" in last
