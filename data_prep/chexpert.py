r"""CheXpert (Stanford ML Group) chest radiographs -> X-ray shards with the 14 observations.

  python -m data_prep.chexpert --input=/data/CheXpert-v1.0-small --output=/data/shards/chexpert \
      --salt_file=~/.aacp_salt --workers=8

``--input`` holds ``train.csv``, ``valid.csv`` and the ``train/``, ``valid/`` image trees
(``train/patient00001/study1/view1_frontal.jpg``); the CSV ``Path`` column starts with the folder name
(``CheXpert-v1.0-small/train/...``), which is stripped. The patient is the ``patientNNNNN`` path part.

Splits: the official ``valid.csv`` (radiologist-labelled, disjoint patients; the test set is not
public) becomes ``test``; ``train.csv`` patients are split into train/val by ``--val_fraction``.
Labels: ``labels`` int8 (14,) in ``xray_common.CHEXPERT_LABELS`` order, 1 / 0 / -1 uncertain, blank 0.
"""

import os
import re

from data_prep import privacy, runner
from data_prep import xray_common as xc

DATASET = 'chexpert'
_PATIENT = re.compile(r'(patient\d+)')


def _rel(root: str, csv_path: str) -> str:
  """``Path`` column -> path relative to ``root`` (drops the leading dataset folder name)."""
  parts = csv_path.replace('\\', '/').split('/')
  if len(parts) > 1 and not os.path.exists(os.path.join(root, *parts)):
    parts = parts[1:]
  return '/'.join(parts)


def list_items(root: str, *, frontal_only: bool = False):
  """-> (items, listing rejects, skipped count). Reads the two CSVs and walks the image trees."""
  items, rejects, listed, skipped = [], [], set(), 0
  for csv_name, official in (('train.csv', None), ('valid.csv', 'test')):
    csv_path = os.path.join(root, csv_name)
    if not os.path.exists(csv_path):
      if csv_name == 'train.csv':
        raise FileNotFoundError(
          f'{csv_path}: not found; --input must be the CheXpert-v1.0(-small) '
          'folder holding train.csv and valid.csv'
        )
      continue
    for line, row in xc.read_csv(csv_path):
      where = f'{csv_name} line {line}'
      rel = _rel(root, (row.get('Path') or '').strip())
      match = _PATIENT.search(rel)
      if not rel or not match:
        rejects.append((rel or where, 'missing_label', f'{where}: no patientNNNNN in Path'))
        continue
      if rel in listed:
        rejects.append((rel, 'duplicate', f'{where}: image listed again'))
        continue
      listed.add(rel)
      if frontal_only and (row.get('Frontal/Lateral') or '').strip().lower() == 'lateral':
        skipped += 1
        continue
      try:
        labels = xc.chexpert_labels(row, where)
      except runner.Reject as e:
        rejects.append((rel, e.kind, e.reason))
        continue
      if not os.path.exists(os.path.join(root, rel)):
        rejects.append((rel, 'missing_file', f'{where}: image not found'))
        continue
      items.append(
        runner.Item(
          key=rel,
          subject=match.group(1),
          modality='xray',
          payload={'labels': labels, 'official': official},
        )
      )
  for folder in ('train', 'valid'):
    for rel in xc.walk_images(root, folder):
      if rel not in listed:
        rejects.append((rel, 'missing_label', 'image has no row in train.csv or valid.csv'))
  return items, rejects, skipped


def convert(item, subject, options):
  del subject  # the runner attaches it
  pixels = xc.read_image(options, item.key)
  yield xc.xray_record(pixels, options, labels=item.payload['labels'])


def build(options: runner.Options) -> int:
  items, rejects, skipped = list_items(
    options.input, frontal_only=bool(options.extra.get('frontal_only'))
  )

  def split_of(item):
    if item.payload['official']:
      return item.payload['official']
    # valid.csv is the test split, so train.csv patients only feed train and val.
    u = privacy.split_unit(options.seed, DATASET, item.subject)
    return 'val' if u < options.val_fraction else 'train'

  return runner.run(
    DATASET,
    items,
    convert,
    options,
    rejects=rejects,
    label_names=list(xc.CHEXPERT_LABELS),
    split_of=split_of,
    meta={'skipped_lateral': skipped},
  )


if __name__ == '__main__':
  xc.run_command(build, 'frontal_only')
