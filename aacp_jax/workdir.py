"""A run's workdir: writable checks and the resolved config it keeps (`config.json`).

`config.json` holds every value the run used (variants applied, command-line overrides
included), so a notebook, a fine-tuning run or `restore.load_variables` rebuild the model from
the workdir alone, without retyping the command.
"""

import json
import os

import ml_collections

CONFIG_FILE = 'config.json'


def check_writable(workdir: str, process_index: int = 0) -> None:
  """A one-line error naming --workdir when it cannot be created or written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{process_index}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ValueError(f'--workdir={workdir}: cannot be written ({e.strerror or e})') from None


def write_config(config, workdir: str) -> str:
  """Writes `workdir/config.json` (atomically: a reader never sees half a file)."""
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(config.to_dict(), f, indent=1, sort_keys=True, default=_jsonable)
    f.write('\n')
  os.replace(tmp, path)
  return path


def _jsonable(value):
  if isinstance(value, (set, frozenset)):
    return sorted(value)
  if hasattr(value, 'tolist'):  # NumPy scalars and arrays
    return value.tolist()
  raise TypeError(f'config value {value!r} of type {type(value).__name__} is not JSON')


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's resolved config from `workdir/config.json`; one-line errors otherwise.

  JSON has no tuples: sequences come back as lists, which every consumer accepts.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ValueError(
      f'{workdir}: no {CONFIG_FILE}; not a workdir of `python -m aacp_jax.main` '
      '(or written by a version before config.json)'
    )
  try:
    with open(path, encoding='utf-8') as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: unreadable ({" ".join(str(e).split())})') from None
