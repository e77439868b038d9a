r"""LUNA16 (subset0..9 ``.mhd``/``.raw`` + ``annotations.csv``) -> 64-slice CT slab records.

  python -m data_prep.luna16 --input=LUNA16_DIR --output=OUT_DIR --salt_file=SALT [--workers=N]
      [--slab_stride=64]

Each scan becomes 64-slice slabs (HU int16, LPI, 1 mm isotropic, full field of view; see
``data_prep.dicom_ct``). Nodules from ``annotations.csv`` (world mm, the same LPS physical space as the
``.mhd`` Offset) are painted as spheres of ``diameter_mm`` in the scan's own voxel grid and resampled
with it (nearest neighbour), so image and mask share one interpolation. Per slab:

* ``mask`` uint8 (H, W): the axial footprint of every nodule voxel inside the slab (maximum over its
  64 slices) -- a nodule is a few mm thick, a slice through the slab's middle would mostly miss it;
* ``label`` int32: 1 when the slab holds nodule voxels, else 0 (names: ``no_nodule``, ``nodule``).

File names are SeriesInstanceUIDs (DICOM identifiers), so keys are ``subsetK/series-<salted hash>``
and error messages are scrubbed. The subject is the series UID, hashed: LUNA16 ships no patient id,
so the few patients with two scans may fall in two splits (document-level limitation of the release).
"""

from __future__ import annotations

import csv
import os

import numpy as np

from data_prep import runner
from data_prep import volume_common as vc

DATASET = 'luna16'
LABEL_NAMES = ('no_nodule', 'nodule')
_COLUMNS = ('seriesuid', 'coordX', 'coordY', 'coordZ', 'diameter_mm')


def find_annotations(root: str) -> str:
  """``annotations.csv`` at the root (or the release's ``CSVFILES/``), else the first one found."""
  for rel in ('annotations.csv', os.path.join('CSVFILES', 'annotations.csv')):
    if os.path.isfile(os.path.join(root, rel)):
      return os.path.join(root, rel)
  for folder, dirs, names in os.walk(root):
    dirs.sort()
    if 'annotations.csv' in names:
      return os.path.join(folder, 'annotations.csv')
  raise ValueError(
    f'--input={root}: no annotations.csv (LUNA16 layout: subset0..9/ + annotations.csv)'
  )


def read_annotations(path: str):
  """``({seriesuid: [[x, y, z, diameter_mm], ...]}, [(line, reason), ...])`` from annotations.csv."""
  nodules, bad = {}, []
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f'{path}: missing column(s) {missing}; expected {list(_COLUMNS)}')
    for line, row in enumerate(reader, start=2):
      try:
        values = [float(row[c]) for c in _COLUMNS[1:]]
      except (TypeError, ValueError):
        bad.append((line, 'a coordinate or diameter is not a number'))
        continue
      if not np.isfinite(values).all() or values[3] <= 0:
        bad.append((line, 'non-finite coordinate or non-positive diameter'))
        continue
      nodules.setdefault(row['seriesuid'].strip(), []).append(values)
  return nodules, bad


def list_items(root: str, salt: bytes):
  """Items (one per ``.mhd``), listing rejects, the safe-name table and the annotation summary."""
  ann_path = find_annotations(root)
  nodules, bad = read_annotations(ann_path)
  rejects = [(f'annotations.csv:{line}', 'corrupt', reason) for line, reason in bad]
  items, names, seen = [], {}, {}
  for rel in vc.list_files(root):
    if not rel.lower().endswith('.mhd'):
      continue
    uid = os.path.basename(rel)[:-4]
    key = f'{os.path.dirname(rel) or "."}/{vc.hashed_key(salt, DATASET, "series", uid)}'
    names.update({os.path.join(root, rel): key, rel: key, uid: key})
    if uid in seen:
      rejects.append((key, 'duplicate', f'the same series is also under {seen[uid]}'))
      continue
    seen[uid] = key
    items.append(
      runner.Item(
        key=key, subject=uid, modality='ct', payload={'mhd': rel, 'nodules': nodules.get(uid, [])}
      )
    )
  unmatched = sorted(set(nodules) - set(seen))
  return (
    items,
    rejects,
    names,
    {'annotated_series_missing': len(unmatched), 'nodules': sum(len(v) for v in nodules.values())},
  )


def nodule_mask(image, nodules):
  """uint8 volume on ``image``'s grid: 1 inside each sphere (x, y, z, diameter) given in LPS mm."""
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top

  size = np.array(image.GetSize())
  spacing = np.array(image.GetSpacing())
  origin = np.array(image.GetOrigin())
  direction = np.array(image.GetDirection()).reshape(3, 3)
  mask = np.zeros(size[::-1], np.uint8)  # (z, y, x) as SimpleITK arrays are
  for x, y, z, diameter in nodules:
    r = diameter / 2
    centre = np.array(image.TransformPhysicalPointToContinuousIndex((x, y, z)))
    half = np.ceil(r / spacing.min()) + 1  # conservative under any direction matrix
    lo = np.clip(np.floor(centre - half), 0, size - 1).astype(int)
    hi = np.clip(np.ceil(centre + half), 0, size - 1).astype(int)
    if (centre + half < 0).any() or (centre - half > size - 1).any():
      continue  # outside the scan
    idx = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing='ij'), -1)
    points = origin + (idx * spacing) @ direction.T
    inside = np.linalg.norm(points - (x, y, z), axis=-1) <= r
    mask[lo[2] : hi[2] + 1, lo[1] : hi[1] + 1, lo[0] : hi[0] + 1] |= inside.transpose(2, 1, 0)
  out = sitk.GetImageFromArray(mask)
  out.CopyInformation(image)
  return out


def convert(item: runner.Item, subject_hash: str, options: runner.Options):
  del subject_hash
  from data_prep import ops  # pylint: disable=g-import-not-at-top

  rel = item.payload['mhd']
  path = os.path.join(options.input, rel)
  uid = os.path.basename(rel)[:-4]
  names = {
    path: item.key,
    rel: item.key,
    path[:-4] + '.raw': item.key + '.raw',
    uid: item.key,
    options.input: '<input>',
  }
  try:
    image = ops.read_volume(path)
    nodules = item.payload['nodules']
    mask = nodule_mask(image, nodules) if nodules else None
    records = []
    for record, slab in vc.slab_records(
      image, region='chest', mask=mask, where=item.key, stride=options.extra.get('slab_stride', 64)
    ):
      footprint = (
        slab.mask.max(axis=2)
        if slab.mask is not None
        else np.zeros(record['image'].shape[:2], np.uint8)
      )
      record['mask'] = footprint
      record['label'] = np.array(footprint.any(), np.int32)
      records.append(record)
  except runner.Reject:
    raise
  except Exception as e:  # pylint: disable=broad-except  # one clean, path-free reject.
    raise vc.convert_reject(e, names) from None
  return records


def main(argv):
  options = vc.slab_options(argv)
  stride = options.extra['slab_stride']
  try:
    items, rejects, _, summary = list_items(options.input, options.salt)
  except ValueError as e:
    from absl import app  # pylint: disable=g-import-not-at-top

    raise app.UsageError(str(e)) from None
  if summary['annotated_series_missing']:
    print(
      f'luna16: {summary["annotated_series_missing"]} annotated series are not under --input '
      '(a partial download?); their nodules are ignored'
    )
  return runner.run(
    DATASET,
    items,
    convert,
    options,
    rejects=rejects,
    label_names=LABEL_NAMES,
    meta={'slab_stride': stride, **summary},
  )


if __name__ == '__main__':
  from absl import app as _app

  vc.define_slab_flags()
  _app.run(main)
