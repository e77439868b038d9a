r"""Writes the frozen landmark detector's output into a copy of a shard root.

  python -m data_prep.annotate_landmarks --checkpoint=DETECTOR_WORKDIR --input=SHARDS \
      --output=SHARDS_WITH_LANDMARKS [--splits=train,test] [--threshold=0.5]

DETECTOR_WORKDIR is where `python -m aacp_jax.main --config=configs/landmarks.py` trained it (it holds
detector.json and checkpoints/). Every record of every split (or of --splits) is copied with:

  landmarks            detected normalised (y, x) where the detector is confident, else (0, 0);
  landmark_visible     confidence > --threshold (default: the detector's eval.visible_threshold);
  landmark_confidence  the detector's probability that each landmark is in view;
  landmarks_canonical  the input's own canonical position where it has one, otherwise the mean
                       canonical position of that landmark over the detector's annotated set.

Images, labels, masks and everything else are copied unchanged; shard counts and the manifest's
seed, label names and meta carry over, with the detector's provenance added under meta.landmarks.
Modalities the detector was not trained for are copied unchanged (a warning says so). A split whose
output manifest already exists is skipped (delete it to redo). The demo's 1,152 phantoms (64²) take
10 s on 2 CPU cores, compilation included.
"""

import os
import sys

from absl import app, flags, logging
import numpy as np

from aacp_jax.data import pipeline, shards

FLAGS = flags.FLAGS


def define_flags():
  """Only when run as a command: data_prep modules share names such as --input."""
  flags.DEFINE_string('checkpoint', None, 'Detector workdir.', required=True)
  flags.DEFINE_string('input', None, 'Shard root to annotate.', required=True)
  flags.DEFINE_string('output', None, 'New shard root.', required=True)
  flags.DEFINE_list('splits', None, 'Splits to annotate (default: all in --input).')
  flags.DEFINE_float('threshold', None, "Visibility threshold (default: the detector's).")
  flags.DEFINE_integer('batch_size', 64, 'Records per detector call.')


def annotate(record, points, confidence, atlas, threshold):
  """The record with the detection written in (a new dict; the input is not modified)."""
  out = dict(record)
  visible = confidence > threshold
  out['landmarks'] = np.where(visible[:, None], np.clip(points, 0.0, 1.0), 0.0).astype(np.float32)
  out['landmark_visible'] = visible
  out['landmark_confidence'] = np.clip(confidence, 0.0, 1.0).astype(np.float32)
  own = record['landmark_visible'][:, None]
  canonical = np.where(own, record['landmarks_canonical'], atlas)
  out['landmarks_canonical'] = np.where(visible[:, None], canonical, 0.0).astype(np.float32)
  return out


class _Annotated:
  """Sized, streaming iterable of annotated records (write_split needs len() up front)."""

  def __init__(self, source, detect, batch_size):
    self._source, self._detect, self._batch = source, detect, batch_size

  def __len__(self):
    return len(self._source)

  def __iter__(self):
    for start in range(0, len(self._source), self._batch):
      chunk = [self._source[i] for i in range(start, min(start + self._batch, len(self._source)))]
      yield from self._detect(chunk)


def _splits(root):
  found = sorted(
    d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, shards.MANIFEST))
  )
  if not found:
    raise ValueError(f'--input={root}: no split with a {shards.MANIFEST}')
  return found


def run(checkpoint, input_root, output_root, splits=None, threshold=None, batch_size=64):
  """Annotates `splits` of `input_root` into `output_root`; returns {split: {modality: count}}."""
  from aacp_jax.eval import detector as lmk  # jax and the model only once the flags are valid

  if os.path.abspath(input_root) == os.path.abspath(output_root):
    raise ValueError('--output must differ from --input (the input shards stay as they are)')
  config, model, variables, atlas = lmk.load_detector(checkpoint)
  threshold = config.eval.visible_threshold if threshold is None else threshold
  if not 0 < threshold < 1:
    raise ValueError(f'--threshold={threshold}: must lie in (0, 1)')
  size = config.data.image_size
  counts = {}
  for split in splits or _splits(input_root):
    if os.path.exists(os.path.join(output_root, split, shards.MANIFEST)):
      logging.info('%s/%s exists; skipped.', output_root, split)
      continue
    manifest = shards.read_manifest(input_root, split)
    by_modality, num_shards = {}, {}
    for m, entry in manifest['modalities'].items():
      source = shards.open_source(input_root, split, m)
      num_shards[m] = len(entry['files'])
      if m not in config.modalities:
        logging.warning(
          '%s/%s: the detector has no %s net; records copied unchanged.', input_root, split, m
        )
        by_modality[m] = _Annotated(source, lambda chunk: chunk, batch_size)
        continue

      def detect(chunk, m=m):
        images = np.stack([pipeline.resize_image(r['image'], size) for r in chunk])
        points, conf = lmk.predict(
          variables, images, m, model=model, aug_cfg=config.augment, batch_size=batch_size
        )
        return [annotate(r, p, c, atlas, threshold) for r, p, c in zip(chunk, points, conf)]

      by_modality[m] = _Annotated(source, detect, batch_size)
    meta = dict(manifest.get('meta') or {})
    meta['landmarks'] = {
      'detector': os.path.abspath(checkpoint),
      'threshold': threshold,
      'detector_image_size': size,
      'source_root': os.path.abspath(input_root),
    }
    written = shards.write_split(
      output_root,
      split,
      by_modality,
      seed=manifest['seed'],
      num_shards=num_shards,
      label_names=manifest.get('label_names'),
      meta=meta,
    )
    counts[split] = {m: e['count'] for m, e in written['modalities'].items()}
    logging.info('%s/%s: %s records annotated.', output_root, split, counts[split])
  return counts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    run(
      FLAGS.checkpoint, FLAGS.input, FLAGS.output, FLAGS.splits, FLAGS.threshold, FLAGS.batch_size
    )
  except (ValueError, OSError, shards.ShardError) as e:
    # One line naming the culprit, exit status 2, as aacp_jax.main does for bad input.
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  define_flags()
  app.run(main)
