r"""MIMIC-CXR-JPG v2.0.0 (PhysioNet) chest radiographs -> X-ray shards, official splits.

  python -m data_prep.mimic_cxr --input=/data/mimic-cxr-jpg/2.0.0 --output=/data/shards/mimic_cxr \
      --salt_file=~/.aacp_salt --workers=8 [--frontal_only]

``--input`` holds ``files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg`` and the three tables
``mimic-cxr-2.0.0-{split,chexpert,metadata}.csv(.gz)``. One item per row of the split table: its
``split`` column (train / validate / test) is the official patient-level split; the labels are the
study's row of the chexpert table (CheXpert labeller, same 14 observations and values as CheXpert);
``ViewPosition`` from the metadata table drives ``--frontal_only``. Dates and the other metadata
columns are never read into an item.
"""

import os

from data_prep import runner
from data_prep import xray_common as xc

DATASET = 'mimic_cxr'
_SPLITS = {'train': 'train', 'validate': 'val', 'test': 'test'}
_FRONTAL = ('PA', 'AP')


def _table(root, stem):
  path = xc.find_csv(root, f'mimic-cxr-2.0.0-{stem}.csv')
  if path is None:
    raise FileNotFoundError(
      f'{root}/mimic-cxr-2.0.0-{stem}.csv(.gz): not found (MIMIC-CXR-JPG ships it beside files/)'
    )
  return path


def image_rel(subject_id: str, study_id: str, dicom_id: str) -> str:
  return f'files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg'


def list_items(root: str, *, frontal_only: bool = False):
  """-> (items, listing rejects, skipped count)."""
  labels_of = {}
  label_rejects = {}
  for line, row in xc.read_csv(_table(root, 'chexpert')):
    study = (row.get('study_id') or '').strip()
    try:
      labels_of[study] = xc.chexpert_labels(row, f'chexpert.csv line {line}')
    except runner.Reject as e:
      label_rejects[study] = (e.kind, e.reason)
  view_of = {}
  if frontal_only:
    for _, row in xc.read_csv(_table(root, 'metadata')):
      view_of[(row.get('dicom_id') or '').strip()] = (row.get('ViewPosition') or '').strip()
  items, rejects, listed, skipped = [], [], set(), 0
  for line, row in xc.read_csv(_table(root, 'split')):
    where = f'split.csv line {line}'
    dicom, study, subject = (
      str(row.get(k) or '').strip() for k in ('dicom_id', 'study_id', 'subject_id')
    )
    if not (dicom and study and subject.isdigit()):
      rejects.append((where, 'missing_label', f'{where}: dicom_id, study_id or subject_id missing'))
      continue
    rel = image_rel(subject, study, dicom)
    if rel in listed:
      rejects.append((rel, 'duplicate', f'{where}: image listed again'))
      continue
    listed.add(rel)
    split = _SPLITS.get((row.get('split') or '').strip())
    if split is None:
      rejects.append(
        (
          rel,
          'unknown_label',
          f'{where}: split {row.get("split")!r} is not one of {sorted(_SPLITS)}',
        )
      )
      continue
    if study in label_rejects:
      rejects.append((rel, *label_rejects[study]))
      continue
    if study not in labels_of:
      rejects.append((rel, 'missing_label', f'{where}: study s{study} has no row in chexpert.csv'))
      continue
    if frontal_only and dicom not in view_of:
      rejects.append((rel, 'missing_label', f'{where}: no row in metadata.csv (ViewPosition)'))
      continue
    if frontal_only and view_of[dicom] not in _FRONTAL:
      skipped += 1
      continue
    if not os.path.exists(os.path.join(root, rel)):
      rejects.append((rel, 'missing_file', f'{where}: image not found'))
      continue
    items.append(
      runner.Item(
        key=rel,
        subject=subject,
        modality='xray',
        payload={'labels': labels_of[study], 'split': split},
      )
    )
  for rel in xc.walk_images(root, 'files'):
    if rel not in listed:
      rejects.append((rel, 'missing_label', 'image has no row in split.csv'))
  return items, rejects, skipped


def convert(item, subject, options):
  del subject
  pixels = xc.read_image(options, item.key)
  yield xc.xray_record(pixels, options, labels=item.payload['labels'])


def build(options: runner.Options) -> int:
  items, rejects, skipped = list_items(
    options.input, frontal_only=bool(options.extra.get('frontal_only'))
  )
  return runner.run(
    DATASET,
    items,
    convert,
    options,
    rejects=rejects,
    label_names=list(xc.CHEXPERT_LABELS),
    split_of=lambda item: item.payload['split'],
    meta={'skipped_not_frontal': skipped},
  )


if __name__ == '__main__':
  xc.run_command(build, 'frontal_only')
