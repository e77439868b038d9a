"""Running cells: skip finished ones, retry failed ones, record each outcome as one row.

Each cell's row is its own file, `DIR/cells/<key>.json` (written atomically), so SLURM array
tasks never write one file together; `DIR/results.jsonl` is rebuilt from them, in plan order,
after every cell. A row with `status: ok` is final: a re-run skips it. A failed cell (any
exception) is recorded with its error on one line and the study goes on; a re-run tries it
again. An interrupted cell (Ctrl-C, SIGTERM) leaves no row: the re-run starts it again, and its
training resumes from the cell's own checkpoints.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import Callable

from aacp_jax import errors, version


class Stopped(Exception):
  """A cell's training stopped on a signal (checkpoint written); the study stops too."""


def row_path(workdir: str, key: str) -> str:
  return os.path.join(workdir, 'cells', f'{key}.json')


def _write_json(path: str, body) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(body, f, indent=1)
  os.replace(tmp, path)


def read_row(workdir: str, key: str) -> dict | None:
  path = row_path(workdir, key)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def write_results(workdir: str, cells) -> list[dict]:
  """results.jsonl: the rows of the plan's cells that have one, in plan order (rows of cells no
  longer in the plan, e.g. from an edited config, stay in cells/ and are left out)."""
  rows = [r for r in (read_row(workdir, c.key) for c in cells) if r is not None]
  path = os.path.join(workdir, 'results.jsonl')
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  os.replace(tmp, path)
  return rows


def read_results(path: str) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def base_row(cell, commit: str) -> dict:
  return {
    'key': cell.key,
    'kind': cell.kind,
    'method': cell.method,
    'task': cell.task,
    'fraction': cell.fraction,
    'shots': cell.shots,
    'labels': cell.labels if cell.kind == 'finetune' else None,
    'seed': cell.seed,
    'config_hash': cell.config_hash,
    'code_version': version.code_version(),
    'commit': commit,
  }


def run_cells(
  cells,
  workdir: str,
  execute: Callable,
  *,
  commit: str = 'unknown',
  log: Callable = print,
  plan=None,
) -> dict:
  """Runs every cell of `cells` that has no `ok` row; `execute(cell, workdir) -> dict` does the
  work (its dict joins the row). Returns counts: done (already), ran, failed, skipped (needs a
  pretraining that has no ok row). results.jsonl covers `plan` (default: `cells`)."""
  plan = cells if plan is None else plan
  counts = {'done': 0, 'ran': 0, 'failed': 0, 'skipped': 0}
  for i, cell in enumerate(cells):
    old = read_row(workdir, cell.key)
    if old is not None and old.get('status') == 'ok':
      counts['done'] += 1
      continue
    if cell.needs is not None:
      pre = read_row(workdir, cell.needs)
      if pre is None or pre.get('status') != 'ok':
        # In a SLURM array the pretraining runs in an earlier array; in-process it failed.
        counts['skipped'] += 1
        log(f'[{i + 1}/{len(cells)}] {cell.name}: skipped, its pretraining has no ok row')
        continue
    log(f'[{i + 1}/{len(cells)}] {cell.name} ({cell.key})', flush=True)
    t0 = time.perf_counter()
    row = base_row(cell, commit)
    try:
      out = execute(cell, workdir)
      row.update(status='ok', **out)
      counts['ran'] += 1
    except (KeyboardInterrupt, Stopped):
      raise  # no row: the re-run starts this cell again and its training resumes
    except Exception as e:  # pylint: disable=broad-except
      row.update(status='failed', error=errors.one_line(e, limit=500, with_type=True))
      counts['failed'] += 1
      log(f'  failed: {row["error"]}')
    row['wall_s'] = round(time.perf_counter() - t0, 2)
    row['date'] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    _write_json(row_path(workdir, cell.key), row)
    write_results(workdir, plan)
  write_results(workdir, plan)
  return counts
