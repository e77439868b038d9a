r"""COVIDx CXR (COVID-Net) chest radiographs -> X-ray shards with the class label, official splits.

  python -m data_prep.covidx --input=/data/covidx --output=/data/shards/covidx \
      --salt_file=~/.aacp_salt --workers=8

``--input`` holds the label files ``train.txt``, ``test.txt`` (and ``val.txt`` from COVIDx CXR-3 on),
one line per image, ``patient_id filename label [source]``, and the image folders named after them
(``train/``, ``test/``, ``val/``). Two label vocabularies exist: the original three classes
(``normal``, ``pneumonia``, ``COVID-19``: the paper's task) and COVIDx CXR-2+'s ``negative`` /
``positive``. The vocabulary the majority of lines use is the one stored (``label`` int32, names in
the manifest's ``label_names``); lines outside it are ``unknown_label`` rejects. The subject is
``source/patient_id`` (patient ids repeat across COVIDx's source collections).
"""

import collections
import os

from data_prep import runner
from data_prep import xray_common as xc

DATASET = 'covidx'
VOCABULARIES = (('normal', 'pneumonia', 'COVID-19'), ('negative', 'positive'))
_SPLIT_FILES = (('train.txt', 'train'), ('val.txt', 'val'), ('test.txt', 'test'))


def _lines(root):
  found = False
  for name, split in _SPLIT_FILES:
    path = os.path.join(root, name)
    if not os.path.exists(path):
      continue
    found = True
    with open(path, encoding='utf-8') as f:
      for i, text in enumerate(f, start=1):
        if text.strip():
          yield name, split, i, text.split()
  if not found:
    raise FileNotFoundError(f'{root}: no train.txt / test.txt (COVIDx label files) found')


def list_items(root: str):
  """-> (items, listing rejects, label names)."""
  lines = list(_lines(root))
  votes = collections.Counter()
  for *_, fields in lines:
    if len(fields) >= 3:
      for v, vocab in enumerate(VOCABULARIES):
        votes[v] += fields[2].lower() in {n.lower() for n in vocab}
  names = VOCABULARIES[max(range(len(VOCABULARIES)), key=lambda v: (votes[v], -v))]
  index = {n.lower(): i for i, n in enumerate(names)}
  items, rejects, listed = [], [], set()
  for name, split, line, fields in lines:
    where = f'{name} line {line}'
    if len(fields) < 3:
      rejects.append(
        (where, 'missing_label', f'{where}: expected "patient_id filename label [source]"')
      )
      continue
    patient, filename, label = fields[:3]
    source = fields[3] if len(fields) > 3 else ''
    rel = f'{split}/{filename}'
    if rel in listed:
      rejects.append((rel, 'duplicate', f'{where}: image listed again'))
      continue
    listed.add(rel)
    if label.lower() not in index:
      rejects.append((rel, 'unknown_label', f'{where}: label {label!r} is not one of {names}'))
      continue
    if not os.path.exists(os.path.join(root, rel)):
      rejects.append((rel, 'missing_file', f'{where}: image not found'))
      continue
    items.append(
      runner.Item(
        key=rel,
        subject=f'{source}/{patient}',
        modality='xray',
        payload={'label': index[label.lower()], 'split': split},
      )
    )
  for _, split in _SPLIT_FILES:
    for rel in xc.walk_images(root, split):
      if rel not in listed:
        rejects.append((rel, 'missing_label', f'image has no line in {split}.txt'))
  return items, rejects, list(names)


def convert(item, subject, options):
  del subject
  pixels = xc.read_image(options, item.key)
  yield xc.xray_record(pixels, options, label=item.payload['label'])


def build(options: runner.Options) -> int:
  items, rejects, names = list_items(options.input)
  return runner.run(
    DATASET,
    items,
    convert,
    options,
    rejects=rejects,
    label_names=names,
    split_of=lambda item: item.payload['split'],
  )


if __name__ == '__main__':
  xc.run_command(build)
