r"""CT DICOM series in any folder layout (institutional data) -> 64-slice 2.5D CT slab records.

  python -m data_prep.dicom_ct --input=RAW_DIR --output=OUT_DIR --salt_file=SALT [--region=chest]
      [--workers=N] [--slab_stride=64]

About 9 s and 0.8 GB peak RSS per 512x512x400 series per worker (``python -m
data_prep.bench_prep``).

Every file under ``--input`` is read as DICOM (headers only, geometry and pixel fields: see
``data_prep.ops.dicom``) and files are grouped into series by SeriesInstanceUID, whatever the folders.
A CT series becomes slabs: HU int16, oriented LPI (rows anterior->posterior, columns patient
right->left, slices superior->inferior), 1 mm isotropic, 64 slices per slab every ``--slab_stride``
slices (the last slab is shifted back to end on the last slice), full field of view in-plane.
Non-CT series (MR, CR, SR, ...), localizers (ImageType LOCALIZER), files that are not DICOM, exact
duplicate files, unsupported transfer syntaxes and broken geometry are listed in rejects.jsonl.

Privacy: institutional folder and file names often hold patient names, ids or dates, and file names
are often SOPInstanceUIDs, so nothing path-like is written. Items and rejected files are named by a
salted hash of their relative path or series UID (``file-...``, ``series-...``), error messages are
scrubbed of paths, and the subject is the salted hash of PatientID. ``--locate=KEY`` prints (to the
terminal only) which files a key stands for.
"""

from __future__ import annotations

from data_prep import runner
from data_prep import volume_common as vc

DATASET = 'dicom_ct'
REGIONS = ('chest', 'abdomen', 'brain')


def convert(item: runner.Item, subject_hash: str, options: runner.Options):
  del subject_hash  # the runner sets 'subject'
  files = item.payload['files']
  image = vc.read_series(options.input, files, item.key)
  region = options.extra.get('region', 'chest')
  try:
    for record, _ in vc.slab_records(
      image, region=region, stride=options.extra.get('slab_stride', 64), where=item.key
    ):
      yield record
  except Exception as e:  # pylint: disable=broad-except
    raise vc.convert_reject(e, vc.payload_names(options.input, files, item.key)) from None


def list_items(root: str, salt: bytes, dataset: str = DATASET):
  """Items (one per CT series), listing-time rejects and the safe-name table."""
  series, rejects, names = vc.scan_tree(root, dataset, salt)
  items = [
    runner.Item(key=key, subject=subject, modality='ct', payload={'files': files})
    for key, subject, _, files, _ in series
  ]
  return items, rejects, names


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top

  flags = absl_flags.FLAGS
  if flags.region not in REGIONS:
    raise app.UsageError(f'--region={flags.region}: expected one of {REGIONS}')
  options = vc.slab_options(argv, region=flags.region)
  items, rejects, names = list_items(options.input, options.salt)
  if flags.locate:
    found = vc.locate(names, options.input, flags.locate)
    print('\n'.join(found) or f'{flags.locate}: no such key')
    return 0
  return runner.run(
    DATASET,
    items,
    convert,
    options,
    rejects=rejects,
    meta={'region': flags.region, 'slab_stride': flags.slab_stride},
  )


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top

  vc.define_slab_flags()
  flags.DEFINE_enum('region', 'chest', list(REGIONS), 'Body region of every series (sets organs).')
  flags.DEFINE_string(
    'locate', None, 'Print the relative paths behind a rejects.jsonl key and exit.'
  )
  return flags.FLAGS


if __name__ == '__main__':
  from absl import app as _app

  define_flags()
  _app.run(main)
