"""Entry point: `python -m aacp_jax.main --config=configs/pretrain.py[:VARIANTS] --workdir=DIR`.

Flags, multi-process start-up, then one call into the experiment named by `config.experiment`.
"""

import importlib.util
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from aacp_jax import config_checks, errors

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
  del argv  # `_parse_flags` refused any positional argument
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
  """Flags parsed up front, so a bad config file, variant, override or argument ends in one line."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    raise ValueError(_one_line(e)) from None
  except (AttributeError, KeyError, TypeError) as e:
    # ml_collections reports an unknown override key as a bare error naming only its last part.
    raise ValueError(_override_error(argv, e)) from None
  if len(rest) > 1:
    # absl would print the whole usage text for this; every option here is a --flag=value.
    raise ValueError(
      f'unexpected argument(s) {" ".join(rest[1:])!r}; every option is a --flag=value (see --help)'
    )
  return rest


def _overrides(argv) -> list[str]:
  """The keys of the `--config.KEY=VALUE` arguments, in order."""
  return [a.split('=')[0].split('.', 1)[1] for a in argv[1:] if a.startswith('--config.')]


def _override_error(argv, error: BaseException) -> str:
  """Names the override keys the config does not have (not every override given)."""
  keys = _overrides(argv)
  spec = [a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')]
  unknown = []
  if spec:
    try:
      config = _load_config(spec[-1])
      unknown = [k for k in keys if config_checks.get(config, k, _ABSENT) is _ABSENT]
    except Exception:  # pylint: disable=broad-except
      pass  # the config loaded once already; if it fails now, fall back to the general line
  if unknown:
    names = ', '.join(f'--config.{k}' for k in unknown)
    return f'{names}: not a key of the config {spec[-1]}'
  names = ', '.join(f'--config.{k}' for k in keys) or '--config'
  return f'{names}: {_one_line(error)}: a key is unknown or a value has the wrong type'


_ABSENT = object()


def _load_config(spec: str):
  """`get_config(arg)` of `path[:arg]`, as config_flags loads it (without the overrides)."""
  path, *arg = spec.split(':', 1)
  module_spec = importlib.util.spec_from_file_location('_aacp_config_check', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*arg)


def run():
  try:
    argv = _parse_flags(sys.argv)
    app.run(main, argv=argv, flags_parser=lambda a: a)
  except (ValueError, FloatingPointError, RuntimeError, OSError) as e:
    # Bad input ends with one line naming the culprit, not a traceback (AACP_TRACEBACK=1
    # shows it).
    if os.environ.get('AACP_TRACEBACK'):
      raise
    # One write, so the lines of several processes sharing a terminal do not interleave.
    sys.stderr.write(f'error: {_one_line(e)}\n')
    sys.exit(2)


if __name__ == '__main__':
  run()
