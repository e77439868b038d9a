r"""LiTS (``volume-N.nii`` + ``segmentation-N.nii``) -> 64-slice abdominal CT slab records with masks.

  python -m data_prep.lits --input=LITS_DIR --output=OUT_DIR --salt_file=SALT [--workers=N]
      [--slab_stride=64]

Volumes and segmentations are found anywhere under ``--input`` (the release's ``Training Batch 1/``
and ``Training Batch 2/``, or one flat folder), ``.nii`` or ``.nii.gz``, paired by N. Each volume
becomes slabs (HU int16, LPI, 1 mm isotropic, full field of view; see ``data_prep.dicom_ct``); the
segmentation (0 background, 1 liver, 2 tumour) is resampled on the same grid by nearest neighbour.
Per slab:

* ``mask`` uint8 (H, W): the segmentation of the slab's middle slice (channel 32 of 64), values
  0/1/2 -- the 2.5D convention: a slab's context predicts its centre slice;
* ``label`` int32: 1 when any slice of the slab holds tumour (names ``no_tumour``, ``tumour``).

Some LiTS segmentations carry header geometry that differs slightly from their volume's although
they were drawn on its voxels; a segmentation within half a voxel of the volume's grid takes the
volume's geometry, one stored in another orientation of the same voxels is turned onto it
(``ops.align_to``), and one whose grid is shifted or otherwise differs is a ``geometry`` reject. A
size mismatch, labels outside {0, 1, 2}, or a missing segmentation reject the case too. Subject:
``volume-N``.
"""

from __future__ import annotations

import os
import re

import numpy as np

from data_prep import runner
from data_prep import volume_common as vc

DATASET = 'lits'
LABEL_NAMES = ('no_tumour', 'tumour')
_VOLUME = re.compile(r'^volume-(\d+)\.nii(\.gz)?$')
_SEGMENTATION = re.compile(r'^segmentation-(\d+)\.nii(\.gz)?$')
MIDDLE = 32


def list_items(root: str):
  """Items (one per volume with its segmentation) and listing rejects."""
  volumes, segs, rejects = {}, {}, []
  for rel in vc.list_files(root):
    name = os.path.basename(rel)
    for pattern, table in ((_VOLUME, volumes), (_SEGMENTATION, segs)):
      m = pattern.match(name)
      if m:
        n = int(m.group(1))
        if n in table:
          rejects.append((rel, 'duplicate', f'case {n} is also {table[n]}'))
        else:
          table[n] = rel
  items = []
  for n, rel in sorted(volumes.items()):
    if n not in segs:
      rejects.append((rel, 'missing_label', f'no segmentation-{n}.nii[.gz] under --input'))
      continue
    items.append(
      runner.Item(
        key=rel,
        subject=f'volume-{n}',
        modality='ct',
        payload={'volume': rel, 'segmentation': segs[n]},
      )
    )
  for n, rel in sorted(segs.items()):
    if n not in volumes:
      rejects.append((rel, 'missing_file', f'no volume-{n}.nii[.gz] for this segmentation'))
  return items, rejects


def read_case(root: str, payload: dict):
  """(HU volume, uint8 segmentation on the volume's grid); PrepError / Reject otherwise."""
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top

  from data_prep import ops  # pylint: disable=g-import-not-at-top

  image = ops.read_volume(os.path.join(root, payload['volume']))
  seg_path = os.path.join(root, payload['segmentation'])
  seg = ops.read_volume(seg_path)
  if seg.GetSize() != image.GetSize():
    raise runner.Reject(
      'dimensions',
      f'{payload["segmentation"]}: size {seg.GetSize()} differs from '
      f"the volume's {image.GetSize()}",
    )
  values = sitk.GetArrayViewFromImage(seg)
  labels = np.unique(values)
  if not np.isin(labels, (0, 1, 2)).all():
    raise runner.Reject(
      'unknown_label',
      f'{payload["segmentation"]}: labels '
      f'{sorted(labels.tolist())[:6]}, expected 0 background / 1 liver / 2 tumour',
    )
  # Drawn on the volume's voxels: a header off by rounding is replaced, a mask stored in another
  # orientation is turned onto the volume's grid, and one on other voxels is a geometry reject.
  seg = ops.align_to(sitk.Cast(seg, sitk.sitkUInt8), image, payload['segmentation'])
  return image, seg


def convert(item: runner.Item, subject_hash: str, options: runner.Options):
  del subject_hash
  records = []
  try:
    image, seg = read_case(options.input, item.payload)
    for record, slab in vc.slab_records(
      image, region='abdomen', mask=seg, where=item.key, stride=options.extra.get('slab_stride', 64)
    ):
      record['mask'] = np.ascontiguousarray(slab.mask[:, :, MIDDLE])
      record['label'] = np.array((slab.mask == 2).any(), np.int32)
      records.append(record)
  except Exception as e:  # pylint: disable=broad-except  # reasons name files relative to --input
    raise vc.convert_reject(e, vc.relative_names(options.input)) from None
  return records


def main(argv):
  options = vc.slab_options(argv)
  stride = options.extra['slab_stride']
  items, rejects = list_items(options.input)
  return runner.run(
    DATASET,
    items,
    convert,
    options,
    rejects=rejects,
    label_names=LABEL_NAMES,
    meta={'slab_stride': stride, 'mask_values': {'0': 'background', '1': 'liver', '2': 'tumour'}},
  )


if __name__ == '__main__':
  from absl import app as _app

  vc.define_slab_flags()
  _app.run(main)
