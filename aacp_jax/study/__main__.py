r"""The reproduction study, one resumable command:

  python -m aacp_jax.study --config=configs/study.py:demo --workdir=/tmp/aacp_study

pretrains each method of `config.methods` once, fine-tunes every method x task x label setting x
seed, then writes DIR/results.jsonl, table5.md, table6.md, data_needed.{md,json,png},
label_efficiency.png, embeddings.png, attention.png and clusters.json. Run it again to resume:
finished cells are read, failed cells are tried again, an interrupted cell resumes from its own
checkpoints. Cluster path (launch/slurm_study.sbatch): `--stage=pretrain|finetune --list_cells`
prints the number of cells of a stage; `--stage=... --cell_index=N` runs exactly that cell;
`--collect` only writes the tables and figures from the rows there are.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from aacp_jax.study import cells as cells_lib
from aacp_jax.study import runner, tables

STAGES = ('all', 'pretrain', 'finetune')


def define_flags():
  """Defined only when run as the command: importing the package must not claim `--config`."""
  config_flags.DEFINE_config_file('config', 'configs/study.py:demo', 'Study config[:variants].')
  flags.DEFINE_string('workdir', None, 'The study folder (cells, rows, tables).', required=True)
  flags.DEFINE_enum('stage', 'all', STAGES, 'Which cells --cell_index/--list_cells count.')
  flags.DEFINE_integer('cell_index', None, 'Run only this cell of --stage (0-based; SLURM).')
  flags.DEFINE_bool('list_cells', False, 'Print the cells of --stage (stderr) and their count.')
  flags.DEFINE_bool('collect', False, 'Only write tables and figures from the rows there are.')


def select(cells, stage: str):
  return [c for c in cells if stage == 'all' or c.kind == stage]


def _quote(arg: str) -> str:
  """A shell word a reader can paste: double quotes around tuples and spaces, which read
  better than shlex's '"'"' chains for `--config.methods=('random','full')`."""
  if not re.search(r'[\s()\'*?;&|<>]', arg):
    return arg
  return f'"{arg}"' if not re.search(r'["$`\\!]', arg) else shlex.quote(arg)


def footnote(commit: str) -> tuple[str, str]:
  """(for the tables: the command as typed (absl's argv has the flags taken out), the date and
  the commit; for the PNGs: the config, date and commit, short enough for one line under a
  one-panel figure; the full command is in the tables)."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  args = ' '.join(_quote(a) for a in sys.argv[1:])
  spec = [a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('--config=')]
  short = f'{(spec or ["configs/study.py:demo"])[-1]}; {stamp}; commit {commit}'
  return f'`python -m aacp_jax.study {args}`; {stamp}, commit {commit}', short


def write_plan(workdir: str, study, cells) -> None:
  body = {
    'study': json.loads(study.to_json()),
    'cells': [
      {
        'index': i,
        'stage_index': select(cells, c.kind).index(c),
        'key': c.key,
        'kind': c.kind,
        'name': c.name,
        'config_hash': c.config_hash,
        'dir': os.path.relpath(c.path(workdir), workdir),
      }
      for i, c in enumerate(cells)
    ],
  }
  runner._write_json(os.path.join(workdir, 'plan.json'), body)


def collect(workdir: str, study, cells, note: str, png_note: str = '') -> dict:
  """results.jsonl, the tables and the figures from the rows of the plan's cells."""
  from aacp_jax.study import figures

  rows = runner.write_results(workdir, cells)
  methods = list(cells_lib.methods_of(study))
  failed = [r for r in rows if r['status'] == 'failed']
  missing = len(cells) - len(rows)
  status = f'{len(rows) - len(failed)} of {len(cells)} cells ok, {len(failed)} failed'
  status += f', {missing} not run' if missing else ''
  note_md = f'{status}. {note}'
  with open(os.path.join(workdir, 'table5.md'), 'w', encoding='utf-8') as f:
    f.write(tables.table5(rows, methods, note=note_md) + '\n')
  ablations = cells_lib.table6_rows(study)
  with open(os.path.join(workdir, 'table6.md'), 'w', encoding='utf-8') as f:
    f.write(tables.table6(rows, ablations, reference=study.reference, note=note_md) + '\n')
  pre_dirs = {
    r['method']: os.path.join(workdir, r['dir'])
    for r in rows
    if r['kind'] == 'pretrain' and r['status'] == 'ok'
  }
  written = figures.write_all(
    rows, workdir, methods=methods, pre_dirs=pre_dirs, study=study, note=note, png_note=png_note
  )
  return {'status': status, 'failed': failed, 'written': written}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  study, workdir, t0 = f.config, f.workdir, time.perf_counter()
  try:
    cells = cells_lib.plan(study)
    cells_lib.check_cells(cells)
  except ValueError as e:  # a bad study: one line naming the key, before anything trains
    raise SystemExit(f'study: {e}') from None
  chosen = select(cells, f.stage)
  if f.list_cells:
    for i, c in enumerate(chosen):
      print(f'{i}\t{c.key}\t{c.name}', file=sys.stderr)
    print(len(chosen))
    return
  os.makedirs(workdir, exist_ok=True)
  write_plan(workdir, study, cells)
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    # Every fine-tuning cell of a task compiles the same programs again (a new run, new jitted
    # functions): a persistent cache in the study folder turns those compiles into loads.
    import jax

    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'jax_cache'))
  from aacp_jax.study import execute
  from aacp_jax.train import label_efficiency as le

  commit = le._commit()  # pylint: disable=protected-access
  if f.cell_index is not None:
    if not 0 <= f.cell_index < len(chosen):
      raise SystemExit(f'study: --cell_index={f.cell_index}: --stage={f.stage} has {len(chosen)}')
    chosen = [chosen[f.cell_index]]
  if not f.collect:
    try:
      counts = runner.run_cells(chosen, workdir, execute.execute, commit=commit, plan=cells)
    except (KeyboardInterrupt, runner.Stopped) as e:
      raise SystemExit(f'study: stopped ({e or "interrupted"}); run the same command to resume')
    print(f'study: {counts}', flush=True)
    if f.cell_index is not None:
      return
  out = collect(workdir, study, cells, *footnote(commit))
  print(f'study: {out["status"]}; {time.perf_counter() - t0:.0f} s in this invocation')
  for r in out['failed']:
    print(f'  failed {r["method"]} {r["task"]} {r["labels"]} seed {r["seed"]}: {r["error"]}')
  for name, where in out['written'].items():
    print(f'  {name}: {where}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
