r"""MedMNIST v2 / MedMNIST+ ``.npz`` files -> X-ray shards, official splits.

  python -m data_prep.medmnist --input=/data/medmnist --output=/data/shards/medmnist \
      --salt_file=~/.aacp_salt [--image_size=224]

``--input`` holds ``<name>mnist.npz`` or ``<name>mnist_<size>.npz`` files as MedMNIST publishes them,
each with ``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images``,
``test_labels`` (images ``(N, S, S)`` uint8, labels ``(N, L)``).

Supported subsets are the two whose images are radiographs, the only 2D modality of this schema:
``chestmnist`` (NIH ChestX-ray14, 14 findings -> ``labels`` int8 0/1) and ``pneumoniamnist``
(pediatric chest X-ray, normal/pneumonia -> ``label``). OrganA/C/S-MNIST are single CT slices already
windowed to uint8 (no HU, one slice instead of a 64-slice 1 mm slab); path, derma, OCT, retina,
breast ultrasound, blood and tissue are not CT, MRI or X-ray; the 3D sets are 28^3 windowed crops.
Those files are listed in ``rejects.jsonl`` as ``unsupported`` with this reason.

MedMNIST publishes no patient ids: each image is its own subject, and the official splits (made
patient-level by the MedMNIST authors) are kept. ``--image_size`` defaults to the file's own size.
"""

import functools
import os
import re
import zipfile

import numpy as np

from data_prep import runner
from data_prep import xray_common as xc

DATASET = 'medmnist'
SUBSETS = {
  'chestmnist': (
    'atelectasis',
    'cardiomegaly',
    'effusion',
    'infiltration',
    'mass',
    'nodule',
    'pneumonia',
    'pneumothorax',
    'consolidation',
    'edema',
    'emphysema',
    'fibrosis',
    'pleural',
    'hernia',
  ),
  'pneumoniamnist': ('normal', 'pneumonia'),
}
_NAME = re.compile(r'^([a-z]+mnist(?:3d)?)(?:_(\d+))?\.npz$')
_SPLITS = ('train', 'val', 'test')
_UNSUPPORTED = (
  'not a radiograph subset: MedMNIST 2D CT (organ*) is single uint8-windowed slices, '
  'the others are not CT/MRI/X-ray (see data_prep/medmnist.py)'
)


def _member_header(zf: zipfile.ZipFile, key: str):
  """Shape and dtype of one array in an npz without decompressing it all."""
  with zf.open(key + '.npy') as f:
    version = np.lib.format.read_magic(f)
    read = (
      np.lib.format.read_array_header_1_0
      if version == (1, 0)
      else np.lib.format.read_array_header_2_0
    )
    shape, _, dtype = read(f)
  return shape, dtype


def _check_file(path: str, subset: str):
  """-> {split: n}; raises ``runner.Reject`` for a file that cannot feed items at all."""
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise runner.Reject('corrupt', f'not a readable .npz ({e})') from None
  with zf:
    names = {n[:-4] for n in zf.namelist() if n.endswith('.npy')}
    want = {f'{s}_{k}' for s in _SPLITS for k in ('images', 'labels')}
    if not want <= names:
      raise runner.Reject('format', f'keys {sorted(names)}; MedMNIST files hold {sorted(want)}')
    counts = {}
    for split in _SPLITS:
      ishape, idtype = _member_header(zf, f'{split}_images')
      lshape, _ = _member_header(zf, f'{split}_labels')
      grey = len(ishape) == 3 or (len(ishape) == 4 and ishape[3] == 1)
      if not grey or idtype.kind not in 'uif':
        raise runner.Reject(
          'dimensions', f'{split}_images is {idtype} {ishape}; expected grey (N, S, S) images'
        )
      width = len(SUBSETS[subset]) if subset == 'chestmnist' else 1
      if len(lshape) != 2 or lshape[0] != ishape[0] or lshape[1] != width:
        raise runner.Reject(
          'dimensions',
          f'{split}_labels is {lshape}; expected ({ishape[0]}, '
          f'{width}) for {split}_images {ishape}',
        )
      counts[split] = int(ishape[0])
  return counts


def list_items(root: str):
  """-> (items, listing rejects, label names per subset)."""
  items, rejects, names = [], [], {}
  for name in sorted(os.listdir(root)):
    match = _NAME.match(name)
    if not match:
      continue
    subset = match.group(1)
    if subset not in SUBSETS:
      rejects.append((name, 'unsupported', _UNSUPPORTED))
      continue
    path = os.path.join(root, name)
    try:
      counts = _check_file(path, subset)
      with np.load(path, allow_pickle=False) as npz:
        labels = {s: npz[f'{s}_labels'] for s in _SPLITS}
    except runner.Reject as e:
      rejects.append((name, e.kind, e.reason))
      continue
    except (ValueError, OSError, zipfile.BadZipFile) as e:
      rejects.append((name, 'corrupt', f'{type(e).__name__}: {e}'))
      continue
    names[subset] = list(SUBSETS[subset])
    for split, n in counts.items():
      for i in range(n):
        key = f'{name}/{split}/{i:06d}'
        row = labels[split][i]
        if not np.isin(row, (0, 1)).all():
          rejects.append((key, 'unknown_label', f'label {row.tolist()} is not 0/1'))
          continue
        label = (
          {'labels': row.astype(int).tolist()} if subset == 'chestmnist' else {'label': int(row[0])}
        )
        items.append(
          runner.Item(
            key=key,
            subject=key,
            modality='xray',
            payload={'file': name, 'split': split, 'index': i, **label},
          )
        )
  if not names and not rejects:
    raise FileNotFoundError(f'{root}: no <name>mnist[_size].npz files')
  if len(names) > 1:
    # One manifest holds one label_names list per modality; mixing subsets would merge vocabularies.
    raise ValueError(f'{root}: holds {sorted(names)}; convert one MedMNIST subset per --output')
  return items, rejects, next(iter(names.values()), None)


@functools.lru_cache(maxsize=1)
def _images(path: str, split: str) -> np.ndarray:
  # Items are sorted by key, so a worker walks one split array at a time: cache just that one.
  with np.load(path, allow_pickle=False) as npz:
    return npz[f'{split}_images']


def convert(item, subject, options):
  del subject
  p = item.payload
  pixels = _images(os.path.join(options.input, p['file']), p['split'])[p['index']]
  pixels = xc.check_pixels(pixels.reshape(pixels.shape[:2]), item.key, min_side=8)
  size = None if options.extra.get('image_size_given') else pixels.shape[0]
  yield xc.xray_record(pixels, options, size=size, label=p.get('label'), labels=p.get('labels'))


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
  xc.run_command(build, image_size_given=lambda f: f['image_size'].present > 0)
