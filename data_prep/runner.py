"""The shared driver of every ``python -m data_prep.<dataset>`` command (contract: docs/INTERFACES.md).

A dataset module lists its inputs as ``Item``s and names a module-level ``convert``; ``run`` does the
rest the same way for every dataset: patient-level splits, deterministic shards, worker processes,
resume, ``rejects.jsonl`` and the manifests. Two rules shape it:

* One bad input never stops a run. Every item ends as records or as a reject row, including items
  that crash a worker process outright (native readers can segfault on corrupt files): the crashed
  shard is retried alone, and the item it died on becomes a ``crash`` reject.
* Workers exchange only plain data with the parent: a task is JSON-able (keys, payloads, hashes),
  the worker writes its shard itself and returns a small summary; records never cross a pipe.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping, Sequence
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
from typing import Any

from absl import flags, logging

from aacp_jax.data import shards
from data_prep import code_version as code_version_lib
from data_prep import privacy, runner_shard

# Defined on the worker side (which rebuilds them from a task); every converter names them here.
Item = runner_shard.Item
Options = runner_shard.Options
Reject = runner_shard.Reject
SPLITS = ('train', 'val', 'test')
# Most held-out first: a subject listed in two splits stays in the one that guards evaluation.
_SPLIT_RANK = {'test': 0, 'val': 1, 'train': 2}


def define_flags(
  *, default_workers: int = 1, default_image_size: int = 1024, default_items_per_shard: int = 64
) -> None:
  """Defines the common flags; call it under ``if __name__ == '__main__'`` before ``app.run``.

  Idempotent per flag: a name another module already defined (``--input`` is common) is reused.
  """
  defined = set(flags.FLAGS)

  def define(kind, name, *args):
    if name not in defined:
      getattr(flags, f'DEFINE_{kind}')(name, *args)

  define('string', 'input', None, 'Raw dataset folder, in its published layout.')
  define('string', 'output', None, 'Output root: OUT/<split>/... shards, OUT/rejects.jsonl.')
  define('integer', 'workers', default_workers, 'Worker processes (0: convert in this process).')
  define('string', 'salt', None, 'Secret salt for subject hashes (>= 16 characters).')
  define(
    'string',
    'salt_file',
    None,
    'File whose content is the salt (preferred over --salt: '
    'command lines end up in shell history).',
  )
  define('integer', 'seed', 0, 'Seed of the patient-level split where no official split exists.')
  define('float', 'val_fraction', 0.1, 'Subjects drawn into val (hash split only).')
  define('float', 'test_fraction', 0.1, 'Subjects drawn into test (hash split only).')
  define('integer', 'items_per_shard', default_items_per_shard, 'Input items per shard file.')
  define('integer', 'image_size', default_image_size, 'Output height and width in pixels.')
  define('integer', 'limit', None, 'Convert only the first N items (by key): trial runs.')
  define('bool', 'progress', True, 'Show a progress bar with ETA.')


def options_from_flags(**extra) -> Options:
  """Options from the parsed flags; a usage problem is a one-line ``app.UsageError``."""
  from absl import app  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  for name in ('input', 'output'):
    if not f[name].value:
      raise app.UsageError(f'--{name} is required')
  if not os.path.isdir(f.input):
    raise app.UsageError(f'--input={f.input}: not a directory')
  try:
    salt = privacy.load_salt(f.salt, f.salt_file)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  options = Options(
    input=f.input,
    output=f.output,
    salt=salt,
    workers=f.workers,
    seed=f.seed,
    val_fraction=f.val_fraction,
    test_fraction=f.test_fraction,
    items_per_shard=f.items_per_shard,
    image_size=f.image_size,
    limit=f.limit,
    progress=f.progress,
    extra=extra,
  )
  try:
    check_options(options)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  return options


def check_options(o: Options) -> None:
  if o.workers < 0:
    raise ValueError(f'--workers={o.workers}: must be >= 0')
  if not (0 <= o.val_fraction and 0 <= o.test_fraction and o.val_fraction + o.test_fraction < 1):
    raise ValueError(
      f'--val_fraction={o.val_fraction} --test_fraction={o.test_fraction}: each '
      '>= 0 and their sum < 1'
    )
  if o.items_per_shard < 1:
    raise ValueError(f'--items_per_shard={o.items_per_shard}: must be >= 1')
  if o.image_size < 8:
    raise ValueError(f'--image_size={o.image_size}: must be >= 8')
  if len(o.salt) < privacy.MIN_SALT_BYTES:
    raise ValueError(f'salt has {len(o.salt)} bytes, need >= {privacy.MIN_SALT_BYTES}')


def _hash_split(o: Options, dataset: str, subject: str) -> str:
  u = privacy.split_unit(o.seed, dataset, subject)
  return (
    'test' if u < o.test_fraction else 'val' if u < o.test_fraction + o.val_fraction else 'train'
  )


def _convert_ref(convert: Callable) -> str:
  """``module:function`` that a spawned worker can import (``__main__`` under ``python -m``)."""
  module = convert.__module__
  if module == '__main__':
    spec = getattr(sys.modules['__main__'], '__spec__', None)
    if spec is None:
      raise ValueError('convert must live in an importable module (run with python -m)')
    module = spec.name
  if '<' in convert.__qualname__ or '.' in convert.__qualname__:
    raise ValueError(f'convert {convert.__qualname__} must be a module-level function')
  return f'{module}:{convert.__qualname__}'


def _plan(dataset, items, o, split_of, reject_rows):
  """Dedupe, split and group items; returns {split: [(modality, [item dicts])...]} shard tasks."""
  seen, kept = set(), []
  for item in sorted(items, key=lambda it: it.key):
    if item.key in seen:
      reject_rows.append(
        (item.key, 'duplicate', 'listed more than once; the first listing was kept')
      )
      continue
    seen.add(item.key)
    kept.append(item)
  if o.limit is not None:
    kept = kept[: o.limit]
  chosen = {}
  for item in kept:
    split = split_of(item) if split_of else None
    split = split or _hash_split(o, dataset, item.subject)
    if split not in SPLITS:
      raise ValueError(f'{dataset}: split_of({item.key}) returned {split!r}, not one of {SPLITS}')
    chosen[item.key] = split
  by_subject = collections.defaultdict(set)
  for item in kept:
    by_subject[item.subject].add(chosen[item.key])
  groups = collections.defaultdict(list)
  for item in kept:
    home = min(by_subject[item.subject], key=_SPLIT_RANK.get)
    if chosen[item.key] != home:
      reject_rows.append(
        (
          item.key,
          'split_leak',
          f'its subject also has images in {home}; '
          f'kept there, not in {chosen[item.key]} (patient-level splits)',
        )
      )
      continue
    groups[(home, item.modality)].append(item)
  hashes = {s: privacy.subject_hash(o.salt, dataset, s) for s in by_subject}
  tasks = []
  for (split, modality), group in sorted(groups.items()):
    n = -(-len(group) // o.items_per_shard)
    for i in range(n):
      chunk = group[i * o.items_per_shard : (i + 1) * o.items_per_shard]
      tasks.append(
        {
          'split': split,
          'modality': modality,
          'name': shards.shard_name(modality, i, n),
          'items': [
            {
              'key': it.key,
              'subject_hash': hashes[it.subject],
              'modality': it.modality,
              'payload': it.payload,
            }
            for it in chunk
          ],
        }
      )
  return tasks


def _progress(total, enabled, desc):
  if not enabled:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(total=total, desc=desc, unit='item', dynamic_ncols=True, smoothing=0.05)


def _execute(tasks, common, workers, bar):
  """Runs every task; returns their summaries keyed by (name, split).

  A worker that dies (not an exception: the process itself) breaks the whole pool. The tasks that
  had started are then re-run one at a time in a one-worker pool, where the item being converted
  at the moment of death (its key is in a marker file) is unambiguous: it becomes a ``crash`` reject
  and the task is retried without it. Tasks that had not started go back to the parallel pool.
  """
  results = {}

  def done(task, summary):
    results[task['name'], task['split']] = summary
    if bar is not None and workers:
      bar.update(len(task['items']))

  if workers == 0:
    for task in tasks:
      done(task, runner_shard.run_task(task, common, bar))
    return results
  pending = []
  for task in tasks:
    # A marker left by a killed earlier run would point a crash at the wrong item.
    runner_shard.clear_current(common['output'], task)
    # Finished shards are recognised here, so an unchanged re-run starts no process at all.
    summary = runner_shard.finished(task, common)
    if summary is None:
      pending.append(task)
    else:
      done(task, summary)
  ctx = multiprocessing.get_context('spawn')
  while pending:
    broken = []
    with _pool(workers, ctx) as pool:
      futures = {pool.submit(runner_shard.run_task, t, common): t for t in pending}
      for future in concurrent.futures.as_completed(futures):
        try:
          done(futures[future], future.result())
        except concurrent.futures.process.BrokenProcessPool:
          broken.append(futures[future])
    started = [t for t in broken if runner_shard.current_item(common['output'], t) is not None]
    alone = started or broken[:1]
    for task in sorted(alone, key=lambda t: (t['split'], t['name'])):
      done(task, _run_alone(task, common, ctx))
    pending = [t for t in broken if t not in alone]
  return results


def _pool(workers, ctx):
  # Workers die with this process: a parent killed by SIGKILL must not leave them writing shards.
  return concurrent.futures.ProcessPoolExecutor(
    workers, mp_context=ctx, initializer=runner_shard.worker_init, initargs=(os.getpid(),)
  )


def _run_alone(task, common, ctx):
  crashed = task.setdefault('crashed', [])
  while True:
    runner_shard.clear_current(common['output'], task)
    try:
      with _pool(1, ctx) as pool:
        return pool.submit(runner_shard.run_task, task, common).result()
    except concurrent.futures.process.BrokenProcessPool:
      key = runner_shard.current_item(common['output'], task)
      if key is None or key in crashed:
        raise RuntimeError(
          f'{task["split"]}/{task["name"]}: a worker process died outside any '
          'item (out of memory? see the log above)'
        ) from None
      crashed.append(key)


def run(
  dataset: str,
  items: Iterable[Item],
  convert: Callable,
  options: Options,
  *,
  rejects: Iterable[tuple[str, str, str]] = (),
  label_names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
  split_of: Callable[[Item], str | None] | None = None,
  meta: Mapping[str, Any] | None = None,
) -> int:
  """Converts ``items`` into ``options.output``; returns the exit status (0 clean, 1 rejects)."""
  check_options(options)
  o = options
  os.makedirs(o.output, exist_ok=True)
  # A run killed mid-write left *.tmp-PID files; they would never be renamed or read.
  runner_shard.remove_temporary(o.output)
  reject_rows = [tuple(r) for r in rejects]
  items = list(items)
  tasks = _plan(dataset, items, o, split_of, reject_rows)
  fingerprint = privacy.salt_fingerprint(o.salt)
  convert_ref = _convert_ref(convert)
  # Only the code this dataset's bytes depend on: editing another converter re-converts nothing here.
  code_version = code_version_lib.code_version(convert_ref.split(':')[0])
  common = {
    'dataset': dataset,
    'convert': convert_ref,
    'output': o.output,
    'code_version': code_version,
    'salt_fingerprint': fingerprint,
    # Converters never need the salt: subjects arrive hashed.
    'options': {**dataclasses.asdict(o), 'salt': b''},
  }
  bar = _progress(sum(len(t['items']) for t in tasks), o.progress, dataset)
  try:
    results = _execute(tasks, common, o.workers, bar)
  finally:
    if bar is not None:
      bar.close()
  if isinstance(label_names, Mapping):
    names = {m: list(v) for m, v in label_names.items()}
  else:
    names = {t['modality']: list(label_names) for t in tasks} if label_names else None
  by_split = collections.defaultdict(list)
  for task in tasks:
    summary = results[task['name'], task['split']]
    by_split[task['split']].append((task, summary))
    reject_rows += [tuple(r) for r in summary['rejects']]
  counts = {}
  # Dataset-wide: listing rejects belong to no split, so every manifest carries the whole tally.
  rejected = dict(sorted(collections.Counter(r[1] for r in set(reject_rows)).items()))
  for split, done in sorted(by_split.items()):
    modalities, stats = runner_shard.merge(done)
    counts[split] = sum(m['count'] for m in modalities.values())
    if not modalities:
      # Every item of the split was rejected: no shards, so no manifest (an old one would lie).
      manifest = os.path.join(o.output, split, shards.MANIFEST)
      if os.path.exists(manifest):
        os.remove(manifest)
      continue
    shards.write_manifest(
      o.output,
      split,
      modalities,
      seed=o.seed,
      code_version=code_version,
      label_names=names,
      meta={
        'dataset': dataset,
        'salt_fingerprint': fingerprint,
        'items': sum(len(t['items']) for t, _ in done),
        'rejected_in_run': rejected,
        'stats': stats,
        **(dict(meta) if meta else {}),
      },
    )
  _write_rejects(o.output, reject_rows)
  keys = {it.key for it in items}
  total_items = len(keys) + len({r[0] for r in reject_rows} - keys)
  _remove_stale(o.output, tasks)
  line = (
    f'{dataset}: {sum(counts.values())} records '
    f'({", ".join(f"{s} {n}" for s, n in counts.items()) or "none"}) from {total_items} inputs '
    f'-> {o.output}; '
  )
  if reject_rows:
    kinds = collections.Counter(r[1] for r in reject_rows)
    per_kind = ', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))
    line += (
      f'{len(reject_rows)} rejected ({per_kind}), see {os.path.join(o.output, "rejects.jsonl")}'
    )
  else:
    line += 'nothing rejected'
  logging.info('%s', line)
  print(line)
  return 1 if reject_rows else 0


def _remove_stale(output: str, tasks) -> None:
  """Deletes shards (and sidecars) of an earlier plan: a changed input list renumbers the shards."""
  planned = {split: set() for split in SPLITS}
  for t in tasks:
    planned[t['split']].add(t['name'])
  for split, names in planned.items():
    split_dir = os.path.join(output, split)
    if not os.path.isdir(split_dir):
      continue
    if not names and os.path.exists(os.path.join(split_dir, shards.MANIFEST)):
      # A split this run has nothing for (e.g. other fractions): its old records must not linger.
      os.remove(os.path.join(split_dir, shards.MANIFEST))
    arrays = {os.path.basename(shards.array_file_path(n)) for n in names}
    for n in os.listdir(split_dir):
      if n.endswith('.arrays') and n not in arrays:
        os.remove(os.path.join(split_dir, n))  # a stale shard's array file
      if n.endswith('.array_record') and n not in names:
        os.remove(os.path.join(split_dir, n))
        sidecar = os.path.join(output, '.progress', split, n + '.json')
        if os.path.exists(sidecar):
          os.remove(sidecar)


def _write_rejects(output: str, rows) -> None:
  path = os.path.join(output, 'rejects.jsonl')
  text = ''.join(
    json.dumps({'key': k, 'kind': kind, 'reason': reason}, sort_keys=True) + '\n'
    for k, kind, reason in sorted(set(rows))
  )
  try:
    with open(path, encoding='utf-8') as f:
      if f.read() == text:
        return  # unchanged re-run: leave the file (and its mtime) alone
  except OSError:
    pass
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)
