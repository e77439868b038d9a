r"""Landmark annotation of real images: export a subset as PNGs, import the clicked keypoints as shards.

  # 1. Export images to annotate (any keypoint tool: CVAT, Label Studio, napari, a script).
  python -m data_prep.keypoints export --input=SHARDS --output=ANN --modality=xray --split=train \
      --count=200
  # 2. Annotate: ANN/keypoints.csv (or .json), format below.
  # 3. Import: the annotated records with their landmarks, split patient-level into train / test.
  python -m data_prep.keypoints import --input=SHARDS --output=KP_SHARDS --annotations=ANN/keypoints.csv
  # 4. Train the detector on them (configs/landmarks.py), then data_prep.annotate_landmarks.

Export writes ANN/images/<modality>_<split>_<index>.png (8-bit: X-ray as stored, CT the middle slice
of the slab in the window --ct_window, MRI the first sequence min-max scaled) and ANN/index.csv
(image, split, modality, index, height, width), which import reads to find each image's record.

Keypoint CSV (header required; one row per landmark per image):

  image,landmark,y,x[,visible][,canonical_y,canonical_x]
  xray_train_000012.png,cardiac_apex,612.5,700.0
  xray_train_000012.png,lung_apex_left,101.0,655.5,1
  ct_train_000004.png,none,,

* `image`: a file name from index.csv; every image named at least once counts as annotated, and its
  landmarks not listed are invisible (landmark `none` marks an image with nothing visible).
* `landmark`: a name from aacp_jax/data/landmarks.py LANDMARKS.
* `y`, `x`: continuous pixel coordinates of the exported PNG: (0, 0) is the top-left corner of the
  top-left pixel, the centre of pixel (row r, column c) is (r + 0.5, c + 0.5) (CVAT's convention).
* `visible` (optional, default 1): 0 says the annotator judged the landmark out of view.
* `canonical_y`, `canonical_x` (optional): the landmark in the canonical frontal frame, normalised to
  [0, 1] (see landmarks.py). Without them an X-ray keeps its in-image position (a frontal radiograph
  is that frame) and CT/MRI leave it unknown (0, 0).

Keypoint JSON: {"images": {"<image>": {"<landmark>": [y, x], ...}, ...}} with the same units; an
image with {} has nothing visible; [y, x, canonical_y, canonical_x] adds the canonical position.

Problems (unknown image or landmark, coordinates outside the image or NaN, duplicates) are all
reported in one line naming the file and line, and nothing is written.
"""

import csv
import json
import math
import os
import sys
import zlib

from absl import app, flags
import numpy as np
from PIL import Image

from aacp_jax.data import landmarks as lm
from aacp_jax.data import shards
from aacp_jax.modalities import CT_WINDOWS

FLAGS = flags.FLAGS


def define_flags():
  """Only when run as a command: data_prep modules share names such as --input."""
  flags.DEFINE_string('input', None, 'Shard root holding the images.', required=True)
  flags.DEFINE_string(
    'output', None, 'export: annotation folder; import: new shard root.', required=True
  )
  flags.DEFINE_string('modality', 'xray', 'export: modality to export.')
  flags.DEFINE_string('split', 'train', 'export: split to export from.')
  flags.DEFINE_integer('count', 200, 'export: number of images (a seeded random subset).')
  flags.DEFINE_integer('seed', 0, 'export: subset seed; import: split seed.')
  flags.DEFINE_string('ct_window', 'abdomen', 'export: CT window name.')
  flags.DEFINE_string('annotations', None, 'import: keypoints .csv or .json.')
  flags.DEFINE_string('index', None, 'import: index.csv (default: beside --annotations).')
  flags.DEFINE_float('test_fraction', 0.2, 'import: held-out share of subjects.')


INDEX_FILE = 'index.csv'
_NAME_OK = set(lm.LANDMARKS) | {'none'}


def to_png(image, modality, ct_window='abdomen'):
  """A record image (H, W, C) as the 8-bit grey picture an annotator sees."""
  if modality == 'xray':
    return image[..., 0].astype(np.uint8)
  if modality == 'ct':
    lo, hi = CT_WINDOWS[ct_window]
    x = image[..., image.shape[-1] // 2].astype(np.float32)
  else:
    x = image[..., 0].astype(np.float32)
    lo, hi = float(x.min()), float(x.max()) if x.max() > x.min() else float(x.min()) + 1.0
  return np.round(np.clip((x - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def export(input_root, output, modality, split, count, seed=0, ct_window='abdomen'):
  """Writes `count` images of one modality/split as PNGs plus index.csv; returns the image names."""
  if ct_window not in CT_WINDOWS:
    raise ValueError(f'--ct_window={ct_window}: known: {", ".join(CT_WINDOWS)}')
  source = shards.open_source(input_root, split, modality)
  n = min(count, len(source))
  picks = sorted(np.random.default_rng(seed).choice(len(source), n, replace=False).tolist())
  os.makedirs(os.path.join(output, 'images'), exist_ok=True)
  rows = []
  for i in picks:
    image = source[i]['image']
    name = f'{modality}_{split}_{i:06d}.png'
    Image.fromarray(to_png(image, modality, ct_window)).save(os.path.join(output, 'images', name))
    rows.append(
      {
        'image': name,
        'split': split,
        'modality': modality,
        'index': i,
        'height': image.shape[0],
        'width': image.shape[1],
      }
    )
  index_path = os.path.join(output, INDEX_FILE)
  old = _read_index(index_path) if os.path.exists(index_path) else {}
  old.update({r['image']: r for r in rows})
  with open(index_path, 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=['image', 'split', 'modality', 'index', 'height', 'width'])
    w.writeheader()
    w.writerows(sorted(old.values(), key=lambda r: r['image']))
  return [r['image'] for r in rows]


def _read_index(path):
  with open(path, newline='', encoding='utf-8') as f:
    return {
      r['image']: {
        **r,
        'index': int(r['index']),
        'height': int(r['height']),
        'width': int(r['width']),
      }
      for r in csv.DictReader(f)
    }


def _num(text):
  value = float(text)
  if not math.isfinite(value):
    raise ValueError(f'{text!r} is not finite')
  return value


def read_annotations(path, index):
  """{image: {landmark: (y_px, x_px, canonical (y, x) or None)}}; raises one ValueError listing
  every problem with its line (CSV) or image (JSON)."""
  problems, out = [], {}

  def add(where, image, name, y, x, canonical, visible=True):
    if image not in index:
      problems.append(f'{where}: image {image!r} is not in {INDEX_FILE}')
      return
    entry = out.setdefault(image, {})
    if name == 'none':
      return
    if name not in _NAME_OK:
      problems.append(f'{where}: unknown landmark {name!r}')
      return
    if name in entry:
      problems.append(f'{where}: {image} {name} annotated twice')
      return
    if not visible:
      entry[name] = None
      return
    h, w = index[image]['height'], index[image]['width']
    if not (0 <= y <= h and 0 <= x <= w):
      problems.append(f'{where}: {image} {name} at (y={y}, x={x}) lies outside the {h}x{w} image')
      return
    if canonical is not None and not all(0 <= c <= 1 for c in canonical):
      problems.append(f'{where}: {image} {name} canonical {canonical} outside [0, 1]')
      return
    entry[name] = (y, x, canonical)

  if path.endswith('.json'):
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get('images'), dict):
      raise ValueError(f'{path}: expected {{"images": {{image: {{landmark: [y, x]}}}}}}')
    for image, marks in data['images'].items():
      add(f'{path} image {image!r}', image, 'none', 0, 0, None)
      for name, v in (marks or {}).items():
        try:
          v = [_num(t) for t in v]
          assert len(v) in (2, 4)
        except (TypeError, ValueError, AssertionError):
          problems.append(
            f'{path} image {image!r}: {name} needs [y, x] or [y, x, cy, cx], got {v!r}'
          )
          continue
        add(f'{path} image {image!r}', image, name, v[0], v[1], tuple(v[2:]) or None)
  else:
    with open(path, newline='', encoding='utf-8') as f:
      reader = csv.DictReader(f)
      missing = {'image', 'landmark', 'y', 'x'} - set(reader.fieldnames or ())
      if missing:
        raise ValueError(
          f'{path}: header lacks {sorted(missing)} (image,landmark,y,x[,visible]'
          '[,canonical_y,canonical_x])'
        )
      for line, row in enumerate(reader, start=2):
        where = f'{path}:{line}'
        name = (row['landmark'] or '').strip()
        try:
          visible = (row.get('visible') or '1').strip() not in ('0', 'false', 'False')
          y = _num(row['y']) if name != 'none' and visible else 0.0
          x = _num(row['x']) if name != 'none' and visible else 0.0
          cy, cx = row.get('canonical_y'), row.get('canonical_x')
          canonical = (_num(cy), _num(cx)) if cy and cx else None
        except (TypeError, ValueError) as e:
          problems.append(f'{where}: bad number ({e})')
          continue
        add(where, row['image'], name, y, x, canonical, visible)
  if problems:
    more = f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''
    raise ValueError(f'{len(problems)} annotation problem(s): {"; ".join(problems[:5])}{more}')
  return out


def _split_of(subject, seed, test_fraction):
  u = zlib.crc32(f'{seed}:{subject}'.encode()) / 2**32
  return 'test' if u < test_fraction else 'train'


def import_annotations(input_root, output, annotations, index_path=None, seed=0, test_fraction=0.2):
  """Writes the annotated records to output/{train,test}; returns {split: {modality: count}}."""
  index_path = index_path or os.path.join(os.path.dirname(os.path.abspath(annotations)), INDEX_FILE)
  if not os.path.exists(index_path):
    raise ValueError(f'--index={index_path}: not found (export writes it beside the images)')
  if not 0 <= test_fraction < 1:
    raise ValueError(f'--test_fraction={test_fraction}: must lie in [0, 1)')
  index = _read_index(index_path)
  marks = read_annotations(annotations, index)
  if not marks:
    raise ValueError(f'{annotations}: no annotated image')
  records = {'train': {}, 'test': {}}
  sources = {}
  for image, entry in sorted(marks.items()):
    info = index[image]
    key = (info['split'], info['modality'])
    if key not in sources:
      sources[key] = shards.open_source(input_root, *key)
    record = dict(sources[key][info['index']])
    k = len(lm.LANDMARKS)
    pts, vis, can = np.zeros((k, 2), np.float32), np.zeros(k, bool), np.zeros((k, 2), np.float32)
    for name, value in entry.items():
      if value is None:
        continue
      i = lm.landmark_index(name)
      y, x, canonical = value
      pts[i] = (y / info['height'], x / info['width'])
      vis[i] = True
      if canonical is not None:
        can[i] = canonical
      elif info['modality'] == 'xray':
        can[i] = pts[i]
    record.update(landmarks=pts, landmark_visible=vis, landmarks_canonical=can)
    record.pop('landmark_confidence', None)  # human annotation, not a detection
    split = _split_of(record['subject'], seed, test_fraction)
    records[split].setdefault(info['modality'], []).append(record)
  counts = {}
  for split, by_modality in records.items():
    if by_modality:
      manifest = shards.write_split(
        output, split, by_modality, seed=seed, meta={'keypoints': os.path.basename(annotations)}
      )
      counts[split] = {m: e['count'] for m, e in manifest['modalities'].items()}
  return counts


def main(argv):
  if len(argv) != 2 or argv[1] not in ('export', 'import'):
    raise app.UsageError(
      'usage: python -m data_prep.keypoints {export,import} --input=... '
      '--output=... (see the module docstring)'
    )
  try:
    if argv[1] == 'export':
      names = export(
        FLAGS.input,
        FLAGS.output,
        FLAGS.modality,
        FLAGS.split,
        FLAGS.count,
        FLAGS.seed,
        FLAGS.ct_window,
      )
      print(f'{len(names)} images in {FLAGS.output}/images; index {FLAGS.output}/{INDEX_FILE}')
    else:
      if not FLAGS.annotations:
        raise ValueError('--annotations: required for import (a .csv or .json keypoint file)')
      counts = import_annotations(
        FLAGS.input, FLAGS.output, FLAGS.annotations, FLAGS.index, FLAGS.seed, FLAGS.test_fraction
      )
      print(f'annotated records written to {FLAGS.output}: {counts}')
  except (ValueError, OSError, KeyError, shards.ShardError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  define_flags()
  app.run(main)
