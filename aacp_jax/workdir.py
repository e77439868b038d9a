"""A run's workdir: writable checks, the lock that keeps it to one run, and the resolved config
it keeps (`config.json`), which a resumed run is compared against.

`config.json` holds every value the run used (variants applied, command-line overrides
included), so a notebook, a fine-tuning run or `restore.load_variables` rebuild the model from
the workdir alone, without retyping the command.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging
import ml_collections

CONFIG_FILE = 'config.json'
CHANGES_FILE = 'config_changes.jsonl'
CHECKPOINTS = 'checkpoints'

# What a resumed run may change: how long it runs (the schedule's length), how often it logs and
# checkpoints, how many checkpoints it keeps, what it evaluates afterwards, and the variant
# string that only describes the values. Every other key decides the saved state's shapes, the
# data the iterator's saved position points into, or what the steps compute, so a change there
# is another run and needs another workdir (docs/DESIGN.md lists the choice).
RESUMABLE = (
  'total_steps',
  'num_epochs',
  'log_every_steps',
  'checkpoint_every_steps',
  'keep_checkpoints',
  'eval',
  'variant',
)


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


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir/checkpoints` holds a step folder (verified or not): state to resume."""
  try:
    return any(name.isdigit() for name in os.listdir(os.path.join(workdir, CHECKPOINTS)))
  except OSError:
    return False


def check_resume(config, workdir: str) -> dict:
  """Compares `config` with the workdir's `config.json` before a run resumes there.

  Returns the differences a resumed run can take ({key: (workdir's, now)}, keys in
  RESUMABLE), logged; raises a one-line ValueError naming every other differing key, with both
  values and the way out. Nothing to compare (an empty workdir, or one without a checkpoint:
  nothing would be resumed, and the new config replaces the old) returns {}.
  """
  if not has_checkpoints(workdir) or not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    return {}
  old = _flatten(read_config(workdir).to_dict())
  # Through JSON, as config.json was written: tuples become lists, sets sorted lists.
  new = _flatten(json.loads(json.dumps(config.to_dict(), default=_jsonable)))
  diffs = {}
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
    if a != b:
      diffs[key] = (a, b)
  refused = [k for k in diffs if not _resumable(k)]
  if refused:
    shown = '; '.join(_difference(k, *diffs[k]) for k in refused[:8])
    more = f' (and {len(refused) - 8} more)' if len(refused) > 8 else ''
    raise ValueError(
      f'--workdir={workdir} holds checkpoints of another config: {shown}{more}. A resumed run '
      "cannot change these; use a new --workdir (or the workdir's values to resume it)"
    )
  if diffs:
    logging.warning(
      'Resuming in %s with changed settings: %s',
      workdir,
      '; '.join(_difference(k, *diffs[k]) for k in diffs),
    )
  return diffs


def record_changes(workdir: str, changes: dict) -> None:
  """Appends the allowed changes of a resume to `workdir/config_changes.jsonl` (config.json then
  holds the new values; this keeps what they were)."""
  if not changes:
    return
  row = {
    'time': datetime.datetime.now().isoformat(timespec='seconds'),
    'changes': {k: {'workdir': _plain(a), 'now': _plain(b)} for k, (a, b) in changes.items()},
  }
  with open(os.path.join(workdir, CHANGES_FILE), 'a', encoding='utf-8') as f:
    f.write(json.dumps(row, sort_keys=True) + '\n')


_ABSENT = object()


def _resumable(key: str) -> bool:
  return any(key == k or key.startswith(k + '.') for k in RESUMABLE)


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _plain(value):
  return None if value is _ABSENT else value


def _difference(key: str, old, new) -> str:
  show = lambda v: 'absent' if v is _ABSENT else json.dumps(v)
  return f'{key}: {show(old)} in the workdir, {show(new)} now'


@contextlib.contextmanager
def lock(workdir: str, process_index: int = 0):
  """Holds an exclusive lock on the workdir for this process while the block runs.

  A second run in the same workdir would write the same checkpoints and metrics; it ends with a
  one-line ValueError naming the holder's host and pid. The lock is `flock` on
  `workdir/.lock.<process_index>` (one file per process, so a multi-host run's processes do not
  exclude each other, while each process of a second run meets its own counterpart): the kernel
  (or the NFS lock manager) drops it when the holder dies, so a killed run's lock never needs
  clearing by hand. Where the filesystem has no flock (Lustre mounted without `-o flock`), the
  run goes on unlocked with a warning: a lock file that outlives its holder would block every
  requeued job on another node.
  """
  path = os.path.join(workdir, f'.lock.{process_index}')
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise ValueError(f'--workdir={workdir}: cannot create {path} ({e.strerror or e})') from None
  held = False
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      held = True
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        logging.warning('%s: no file locking here (%s); the workdir is not locked', path, e)
      else:
        raise ValueError(
          f'--workdir={workdir}: in use by {_holder(path)}; wait for that run to end, stop it, '
          'or use another --workdir'
        ) from None
    if held:
      os.ftruncate(fd, 0)
      holder = {
        'host': socket.gethostname(),
        'pid': os.getpid(),
        'since': datetime.datetime.now().isoformat(timespec='seconds'),
      }
      os.pwrite(fd, (json.dumps(holder) + '\n').encode(), 0)
    yield
  finally:
    if held:
      os.ftruncate(fd, 0)  # an empty file: nobody holds it
    os.close(fd)  # closing the descriptor releases the flock


def _holder(path: str) -> str:
  try:
    with open(path, encoding='utf-8') as f:
      h = json.loads(f.read())
    return f'pid {h["pid"]} on host {h["host"]} (since {h["since"]})'
  except (OSError, ValueError, KeyError, TypeError):
    # Locked, but the holder has not written its name yet (it just started).
    return f'another process (see {path})'
