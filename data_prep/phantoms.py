r"""Writes the synthetic phantom dataset (CT, X-ray, MRI) as ArrayRecord shards.

  python -m data_prep.phantoms --output=/tmp/ph --image_size=64 --seed=0 --train=256 --test=128

Counts are per modality. About 10 s for the command above on 2 CPU cores; re-running with the same
settings returns at once (the manifest records them), changed settings rewrite the affected splits.
"""

from absl import app, flags, logging

from aacp_jax.data import phantoms, shards

_OUTPUT = flags.DEFINE_string('output', None, 'Dataset root (ROOT/<split>/...).', required=True)
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 64, 'Stored height and width in pixels.')
_SEED = flags.DEFINE_integer('seed', 0, 'Generator seed; same seed, same bytes.')
_TRAIN = flags.DEFINE_integer('train', 256, 'Train records per modality.')
_VAL = flags.DEFINE_integer('val', 0, 'Validation records per modality (0: no val split).')
_TEST = flags.DEFINE_integer('test', 128, 'Test records per modality.')
_MODALITIES = flags.DEFINE_list('modalities', list(phantoms.MODALITIES), 'Modalities to write.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  unknown = set(_MODALITIES.value) - set(phantoms.MODALITIES)
  if unknown:
    raise app.UsageError(f'unknown modalities {sorted(unknown)}; known: {phantoms.MODALITIES}')
  if _IMAGE_SIZE.value < 8:
    raise app.UsageError(f'--image_size={_IMAGE_SIZE.value} is too small (>= 8)')
  sizes = {'train': _TRAIN.value, 'val': _VAL.value, 'test': _TEST.value}
  counts = {split: {m: n for m in _MODALITIES.value} for split, n in sizes.items() if n > 0}
  root = phantoms.build(
    _OUTPUT.value, seed=_SEED.value, image_size=_IMAGE_SIZE.value, counts=counts
  )
  for split in counts:
    manifest = shards.read_manifest(root, split)
    summary = {
      m: (e['count'], len(e['files']), e['label_counts']) for m, e in manifest['modalities'].items()
    }
    logging.info('%s/%s: %s (records, shards, label counts)', root, split, summary)
    print(
      f'{root}/{split}: '
      + ', '.join(
        f'{m} {c} records in {s} shard(s), labels {lc}' for m, (c, s, lc) in summary.items()
      )
    )


if __name__ == '__main__':
  app.run(main)
