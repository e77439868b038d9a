r"""RSNA Pediatric Bone Age (RSNA 2017 challenge) hand radiographs -> X-ray shards, target in months.

  python -m data_prep.rsna_boneage --input=/data/rsna-bone-age --output=/data/shards/boneage \
      --salt_file=~/.aacp_salt --workers=8

``--input`` holds ``boneage-training-dataset.csv`` (``id,boneage,male``) and
``boneage-training-dataset/<id>.png``. Records: ``target`` float32 = bone age in months, region
``hand`` (organs: bone). The challenge publishes no patient ids and one image per child, so the
subject is the image id and train/val/test is the seeded patient-level hash split. The
``male`` column is checked but not stored (the record schema has no covariate slot).
"""

import math
import os

from data_prep import runner
from data_prep import xray_common as xc

DATASET = 'rsna_boneage'
CSV = 'boneage-training-dataset.csv'
FOLDER = 'boneage-training-dataset'


def list_items(root: str):
  """-> (items, listing rejects)."""
  path = os.path.join(root, CSV)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: not found; --input must hold {CSV} and {FOLDER}/')
  items, rejects, listed = [], [], set()
  for line, row in xc.read_csv(path):
    where = f'{CSV} line {line}'
    image_id = (row.get('id') or '').strip()
    if not image_id.isdigit():
      rejects.append((where, 'missing_label', f'{where}: id {image_id!r} is not a number'))
      continue
    rel = f'{FOLDER}/{image_id}.png'
    if rel in listed:
      rejects.append((rel, 'duplicate', f'{where}: image listed again'))
      continue
    listed.add(rel)
    try:
      xc.check_row(row, where)
    except runner.Reject as e:
      rejects.append((rel, e.kind, e.reason))
      continue
    try:
      months = float(row.get('boneage') or 'nan')
    except ValueError:
      months = math.nan
    male = (row.get('male') or '').strip().lower()
    if not (math.isfinite(months) and 0 <= months <= 300) or male not in ('true', 'false'):
      rejects.append(
        (
          rel,
          'unknown_label',
          f'{where}: boneage {row.get("boneage")!r} (months, '
          f'0..300) or male {row.get("male")!r} (True/False) invalid',
        )
      )
      continue
    if not os.path.exists(os.path.join(root, rel)):
      rejects.append((rel, 'missing_file', f'{where}: image not found'))
      continue
    items.append(
      runner.Item(key=rel, subject=image_id, modality='xray', payload={'target': months})
    )
  for rel in xc.walk_images(root, FOLDER):
    if rel not in listed:
      rejects.append((rel, 'missing_label', f'image has no row in {CSV}'))
  return items, rejects


def convert(item, subject, options):
  del subject
  pixels = xc.read_image(options, item.key)
  yield xc.xray_record(pixels, options, region='hand', target=item.payload['target'])


def build(options: runner.Options) -> int:
  items, rejects = list_items(options.input)
  return runner.run(
    DATASET, items, convert, options, rejects=rejects, meta={'target': 'bone age, months'}
  )


if __name__ == '__main__':
  xc.run_command(build)
