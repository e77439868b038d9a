r"""LIDC-IDRI (DICOM series + the readers' XML) -> nodule-centred CT crops labelled benign / malignant.

  python -m data_prep.lidc_idri --input=LIDC-IDRI --output=OUT_DIR --salt_file=SALT [--workers=N]
      [--cluster_mm=10] [--threes=drop] [--min_readers=1] [--crop=64]

Layout: TCIA's ``LIDC-IDRI/LIDC-IDRI-NNNN/<study>/<series>/*.dcm`` with each CT series' XML
(``LidcReadMessage``, any name ending ``.xml``) among its files; any layout works, series are grouped by
SeriesInstanceUID and matched to the XML's ``SeriesInstanceUid``.

Consensus over readers (up to four ``readingSession``s). Every ``unblindedReadNodule`` with a
``malignancy`` rating (the >= 3 mm nodules; smaller ones and non-nodules carry none) gives one mark: the
mean of its ROI edge-map points, mapped to LPS mm through the DICOM geometry of the slice at each ROI's
``imageZposition``. Marks closer than ``--cluster_mm`` (single linkage) are one nodule; its centre is
the mean of its marks, its malignancy the median of its marks' ratings (1-5; readers who did not mark
it do not vote). Label: median > 3 -> 1 malignant, < 3 -> 0 benign; a median of exactly 3 is
indeterminate and dropped by default (``--threes=benign|malignant`` keeps it). Nodules marked by fewer
than ``--min_readers`` readers are dropped.

Per nodule one record: ``image`` int16 HU (crop, crop, 64), a 64-slice 1 mm slab (LPI) centred on the
consensus centre (the centre is slice 32, row and column crop/2), air (-1024) outside the scan;
``mask`` uint8 (crop, crop): on slice 32, the pixels inside at least half of the marks' outlines (each
mark's ROI nearest that slice, inclusion polygons filled, exclusion polygons removed);
``label`` int32 (names ``benign``, ``malignant``).

Privacy as ``data_prep.dicom_ct``: keys are salted hashes (``series-...``, ``file-...``), the subject is
the hashed PatientID. A CT series without XML is ``missing_label``; one without any decided nodule is
``empty``; non-CT series (the collection's radiographs) are ``unsupported``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

from data_prep import runner
from data_prep import volume_common as vc

DATASET = 'lidc_idri'
LABEL_NAMES = ('benign', 'malignant')
SLAB = 64


def _strip_namespaces(root):
  for el in root.iter():
    el.tag = el.tag.rsplit('}', 1)[-1]
  return root


def parse_xml(path: str):
  """``(series_uid, [reader marks])`` of a LidcReadMessage, or None for other XML (e.g. radiographs).

  A mark is ``{'reader': r, 'malignancy': m, 'rois': [{'z': mm, 'inclusion': bool,
  'points': [(x, y), ...] pixel}]}``. ValueError (one line) for malformed XML.
  """
  try:
    root = _strip_namespaces(ET.parse(path).getroot())
  except (ET.ParseError, OSError) as e:
    raise ValueError(f'unreadable XML ({type(e).__name__})') from None
  if root.tag != 'LidcReadMessage':
    return None
  uid = (root.findtext('ResponseHeader/SeriesInstanceUid') or '').strip()
  if not uid:
    raise ValueError('LidcReadMessage without ResponseHeader/SeriesInstanceUid')
  marks = []
  for reader, session in enumerate(root.iter('readingSession')):
    for nodule in session.iter('unblindedReadNodule'):
      text = nodule.findtext('characteristics/malignancy')
      if not text or not text.strip().isdigit():
        continue
      rois = []
      for roi in nodule.iter('roi'):
        try:
          z = float(roi.findtext('imageZposition'))
          points = [
            (float(e.findtext('xCoord')), float(e.findtext('yCoord'))) for e in roi.iter('edgeMap')
          ]
        except (TypeError, ValueError):
          raise ValueError('an roi lacks a numeric imageZposition or edgeMap coordinate') from None
        if points:
          rois.append(
            {
              'z': z,
              'inclusion': (roi.findtext('inclusion') or 'TRUE').strip().upper() == 'TRUE',
              'points': points,
            }
          )
      if rois:
        marks.append({'reader': reader, 'malignancy': int(text), 'rois': rois})
  return uid, marks


def _to_world(headers, z: float, points) -> np.ndarray:
  """Pixel (x = column, y = row) points on the slice at position ``z`` -> LPS mm (N, 3)."""
  h = min(headers, key=lambda h: abs(h.position[2] - z))
  row_dir, col_dir = np.array(h.orientation[:3]), np.array(h.orientation[3:])
  pts = np.asarray(points, np.float64)
  return (
    np.asarray(h.position)
    + pts[:, :1] * h.pixel_spacing[1] * row_dir
    + pts[:, 1:] * h.pixel_spacing[0] * col_dir
  )


def cluster_marks(marks, headers, *, cluster_mm: float):
  """Marks with world ROIs and centres, grouped by single linkage: a list of lists of marks."""
  for m in marks:
    for roi in m['rois']:
      roi['world'] = _to_world(headers, roi['z'], roi['points']).tolist()
    included = [p for roi in m['rois'] if roi['inclusion'] for p in roi['world']] or [
      p for roi in m['rois'] for p in roi['world']
    ]
    m['centre'] = np.mean(included, axis=0).tolist()
  parent = list(range(len(marks)))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for i in range(len(marks)):
    for j in range(i + 1, len(marks)):
      if np.linalg.norm(np.subtract(marks[i]['centre'], marks[j]['centre'])) <= cluster_mm:
        parent[find(i)] = find(j)
  groups = {}
  for i, m in enumerate(marks):
    groups.setdefault(find(i), []).append(m)
  return sorted(groups.values(), key=lambda g: g[0]['centre'][2])


def consensus(groups, *, threes: str = 'drop', min_readers: int = 1):
  """(nodules [{centre, label, malignancy, readers, marks}], number dropped as indeterminate)."""
  nodules, dropped = [], 0
  for group in groups:
    readers = len({m['reader'] for m in group})
    if readers < min_readers:
      continue
    median = float(np.median([m['malignancy'] for m in group]))
    if median == 3:
      if threes == 'drop':
        dropped += 1
        continue
      label = int(threes == 'malignant')
    else:
      label = int(median > 3)
    marks = [
      {'rois': [{'inclusion': r['inclusion'], 'world': r['world']} for r in m['rois']]}
      for m in group
    ]
    nodules.append(
      {
        'centre': np.mean([m['centre'] for m in group], axis=0).tolist(),
        'label': label,
        'malignancy': median,
        'readers': readers,
        'marks': marks,
      }
    )
  return nodules, dropped


def list_items(root: str, salt: bytes, *, cluster_mm=10.0, threes='drop', min_readers=1):
  series, rejects, names = vc.scan_tree(root, DATASET, salt, skip_ext=('.xml',))
  readings = {}
  for rel in vc.list_files(root):
    if not rel.lower().endswith('.xml'):
      continue
    names[rel] = vc.hashed_key(salt, DATASET, 'file', rel)  # for --locate
    try:
      parsed = parse_xml(os.path.join(root, rel))
    except ValueError as e:
      rejects.append((names[rel], 'corrupt', str(e)))
      continue
    if parsed is not None:
      readings.setdefault(parsed[0], []).extend(parsed[1])
  items = []
  for key, subject, uid, files, headers in series:
    if uid not in readings:
      rejects.append((key, 'missing_label', 'no LidcReadMessage XML for this CT series'))
      continue
    try:
      groups = cluster_marks(readings[uid], headers, cluster_mm=cluster_mm)
    except (TypeError, ValueError) as e:  # a slice without position/orientation/spacing
      rejects.append((key, 'geometry', f"cannot place the readers' marks ({type(e).__name__})"))
      continue
    nodules, dropped = consensus(groups, threes=threes, min_readers=min_readers)
    if not nodules:
      rejects.append(
        (
          key,
          'empty',
          f'no nodule with a decided malignancy ({len(groups)} nodule(s), {dropped} indeterminate)',
        )
      )
      continue
    items.append(
      runner.Item(
        key=key, subject=subject, modality='ct', payload={'files': files, 'nodules': nodules}
      )
    )
  return items, rejects, names


def crop_grid(centre, crop: int):
  """The 1 mm LPI grid of a (crop, crop, 64) slab whose voxel (crop/2, crop/2, 32) is ``centre``."""
  from data_prep import ops  # pylint: disable=g-import-not-at-top

  cx, cy, cz = centre
  origin = (cx - crop // 2, cy - crop // 2, cz + SLAB // 2)  # slices run toward inferior (-z)
  return ops.Grid(tuple(float(v) for v in origin), (1.0, 1.0, 1.0), (crop, crop, SLAB))


def consensus_mask(nodule, grid) -> np.ndarray:
  """uint8 (crop, crop): pixels inside at least half of the marks' outlines on the centre slice."""
  from skimage import draw  # pylint: disable=g-import-not-at-top

  size = grid.size[1], grid.size[0]
  votes = np.zeros(size, np.int32)
  cz = nodule['centre'][2]
  for mark in nodule['marks']:
    rois = mark['rois']
    z = min((r['world'][0][2] for r in rois), key=lambda v: abs(v - cz))
    if abs(z - cz) > 3.0:  # this reader drew nothing within 3 mm of the centre slice
      continue
    inside = np.zeros(size, bool)
    for inclusion in (True, False):
      for roi in rois:
        if roi['inclusion'] != inclusion or abs(roi['world'][0][2] - z) > 1e-3:
          continue
        w = np.asarray(roi['world'])
        rows, cols = w[:, 1] - grid.origin[1], w[:, 0] - grid.origin[0]
        rr, cc = draw.polygon(rows, cols, size)
        pr = np.clip(np.rint(rows).astype(int), 0, size[0] - 1)
        pc = np.clip(np.rint(cols).astype(int), 0, size[1] - 1)
        inside[rr, cc] = inclusion
        inside[pr, pc] = inclusion  # the outline pixels themselves belong to the nodule
    votes += inside
  return (votes * 2 >= max(len(nodule['marks']), 1)).astype(np.uint8)


def convert(item: runner.Item, subject_hash: str, options: runner.Options):
  del subject_hash
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top

  from data_prep import ops  # pylint: disable=g-import-not-at-top

  files = item.payload['files']
  image = vc.read_series(options.input, files, item.key)
  crop = options.extra.get('crop', 64)
  records = []
  try:
    for nodule in item.payload['nodules']:
      grid = crop_grid(nodule['centre'], crop)
      # A copy, not a view: a view of the temporary resampled image reads freed memory.
      hu = ops.to_hu(
        sitk.GetArrayFromImage(ops.resample(image, grid=grid, default=ops.HU_RANGE[0]))
      )
      records.append(
        {
          'image': np.ascontiguousarray(hu.transpose(1, 2, 0)),
          'modality': 'ct',
          'region': 'chest',
          'spacing': np.ones(3, np.float32),
          'mask': consensus_mask(nodule, grid),
          'label': np.array(nodule['label'], np.int32),
        }
      )
  except Exception as e:  # pylint: disable=broad-except
    raise vc.convert_reject(e, vc.payload_names(options.input, files, item.key)) from None
  return records


def main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.crop < 8 or f.cluster_mm <= 0 or f.min_readers < 1:
    raise app.UsageError('--crop >= 8, --cluster_mm > 0 and --min_readers >= 1 are required')
  extra = {
    'crop': f.crop,
    'cluster_mm': f.cluster_mm,
    'threes': f.threes,
    'min_readers': f.min_readers,
  }
  options = runner.options_from_flags(**extra)
  items, rejects, names = list_items(
    options.input, options.salt, cluster_mm=f.cluster_mm, threes=f.threes, min_readers=f.min_readers
  )
  if f.locate:
    print('\n'.join(vc.locate(names, options.input, f.locate)) or f'{f.locate}: no such key')
    return 0
  return runner.run(
    DATASET, items, convert, options, rejects=rejects, label_names=LABEL_NAMES, meta=extra
  )


if __name__ == '__main__':
  from absl import app as _app
  from absl import flags as _flags

  runner.define_flags()
  _flags.DEFINE_float('cluster_mm', 10.0, 'Marks closer than this (mm) are one nodule.')
  _flags.DEFINE_enum(
    'threes',
    'drop',
    ['drop', 'benign', 'malignant'],
    'What a median malignancy of exactly 3 becomes.',
  )
  _flags.DEFINE_integer('min_readers', 1, 'Drop nodules marked by fewer readers.')
  _flags.DEFINE_integer('crop', 64, 'In-plane crop size in pixels (1 mm each).')
  _flags.DEFINE_string(
    'locate', None, 'Print the relative paths behind a rejects.jsonl key and exit.'
  )
  _app.run(main)
