"""Entry point: `python -m aacp_jax.main --config=configs/pretrain.py[:VARIANTS] --workdir=DIR`.

Flags, multi-process start-up, then one call into the experiment named by `config.experiment`.
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from aacp_jax import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file[:variants].', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics.jsonl, TensorBoard and eval.json.')
flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0, for multi-process runs not started by SLURM/TPU.',
)
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
flags.DEFINE_integer('process_id', None, 'This process (multi-process runs).')
flags.mark_flags_as_required(['config', 'workdir'])


def _maybe_initialize_distributed():
  import jax

  explicit = FLAGS.coordinator_address is not None
  # SLURM multi-task jobs and TPU pods are auto-detected by jax.distributed.initialize().
  slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  tpu_pod = 'TPU_WORKER_HOSTNAMES' in os.environ or 'MEGASCALE_COORDINATOR_ADDRESS' in os.environ
  if explicit:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif slurm or tpu_pod:
    jax.distributed.initialize()


class _QuietLibraries(std_logging.Filter):
  """Drop the INFO chatter of orbax and grain (a dozen lines per checkpoint); keep warnings."""

  def filter(self, record):
    noisy = any(part in record.pathname for part in ('/orbax/', '/grain/'))
    return record.levelno >= std_logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _maybe_initialize_distributed()
  import jax

  logging.info(
    'Process %d/%d, local devices %s', jax.process_index(), jax.process_count(), jax.local_devices()
  )
  config = FLAGS.config
  from aacp_jax import experiments  # pylint: disable=g-import-not-at-top

  experiment = experiments.get(config.experiment).module()
  results = experiment.train_and_evaluate(config, FLAGS.workdir)
  if jax.process_index() == 0:
    table = experiment.format_results(results, FLAGS.workdir)
    if table:
      print(table)


def _one_line(e: BaseException) -> str:
  text = str(e)
  if 'Traceback (most recent call last)' in text:
    # config_flags pastes the config file's traceback into its message: keep the head and the
    # final "XError: ..." line, which names the culprit.
    head = text.split('Traceback (most recent call last)')[0]
    tail = [l for l in text.strip().splitlines() if l.strip()][-1]
    text = f'{head} {tail}'
  return errors.one_line(text, limit=2000) or type(e).__name__


def _parse_flags(argv):
  """Flags parsed up front, so a bad config file, variant or override ends in one line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    raise ValueError(_one_line(e)) from None
  except (AttributeError, KeyError, TypeError) as e:
    # ml_collections reports an unknown override key as a bare attribute error.
    bad = [a.split('=')[0].lstrip('-') for a in argv[1:] if a.startswith('--config.')]
    raise ValueError(
      f'{", ".join(bad) or "--config"}: {_one_line(e)} is not a config key or has the wrong type'
    ) from None


def run():
  try:
    argv = _parse_flags(sys.argv)
    app.run(main, argv=argv, flags_parser=lambda a: a)
  except (ValueError, FloatingPointError, RuntimeError, OSError) as e:
    # Bad input ends with one line naming the culprit, not a traceback (AACP_TRACEBACK=1
    # shows it).
    if os.environ.get('AACP_TRACEBACK'):
      raise
    print(f'error: {_one_line(e)}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  run()
