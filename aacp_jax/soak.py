"""The kill soak behind `python -m aacp_jax.bench soak`: N cycles of "train, kill -9 at a random
moment, resume" against one uninterrupted reference run, one JSON line per cycle and a summary.

Both runs are `python -m aacp_jax.main` with the given `--config...` arguments plus
`log_every_steps=1` (every step's loss is compared) and a large `keep_checkpoints` (so every
checkpoint the kills could cost is still there to count). Per cycle:

  kill_after_s      the kill's moment, drawn uniformly over [0, 2 x (training time / N)] after
                    the process logged its first step (so it lands anywhere in training: inside
                    a step, a save, the wait for a save, a metrics write)
  last_step         the newest step the killed process had logged
  resumed_from      the step the next process resumed from (its first row - 1)
  newest_committed  the newest step folder orbax had committed when the kill came
  steps_lost        last_step - resumed_from
  checkpoints_lost  committed step folders that the resume did not keep (rejected or gone), and
                    1 more if it did not resume from the newest committed one
  time_lost_s       (kill - when resumed_from was first logged) + the resumed process's start-up
                    (launch to its first logged step, less one step): the work thrown away plus
                    the restart
  bitwise_equal     every loss the resumed process logged equals the reference's, bit for bit
  replay_*          the steps between the checkpoint and the kill, run twice: whether the
                    resumed process's losses equal the killed one's bit for bit, and the largest
                    relative difference (float noise, ~1e-7, when the restore is exact; a wrong
                    state or data position shows up as O(1))

The summary adds the final checkpoint against the reference's, array by array (bitwise).
XLA:CPU's threaded sums can differ in the last bit between runs under load (README), so a
`false` there is a measurement of the machine as much as of the resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np

from aacp_jax import checkpoint as ckpt_lib

POLL_S = 0.05


def _rows(workdir):
  """{step: row} of metrics.jsonl, skipping a line that is being written (or was cut off)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  out = {}
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        out[row['step']] = row
  return out


def _committed(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _launch(argv, workdir, log_name):
  os.makedirs(os.path.join(workdir, 'logs'), exist_ok=True)
  log = open(os.path.join(workdir, 'logs', log_name), 'w', encoding='utf-8')
  proc = subprocess.Popen(
    [sys.executable, '-m', 'aacp_jax.main', *argv, f'--workdir={workdir}'],
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  return proc, log


def _watch(proc, workdir, *, kill_at=None, deadline=None):
  """Polls metrics.jsonl; returns {step: first time seen} for the rows this process wrote, the
  time of the kill (None if it ran to the end) and the launch time. kill_at(first_row_time) ->
  when to send SIGKILL."""
  seen, t_launch, t_kill, kill_time = {}, time.time(), None, None
  # Rows of the killed run stay until the resume drops them; a rewritten row differs from the
  # old one in its timings, so "new" = not the row that was there at launch.
  before = _rows(workdir)
  while True:
    rows = _rows(workdir)
    now = time.time()
    if rows:
      for s, r in rows.items():
        if s not in seen and before.get(s) != r:
          seen[s] = now
    if seen and kill_at is not None and kill_time is None:
      kill_time = kill_at(min(seen.values()))
    if kill_time is not None and now >= kill_time and proc.poll() is None:
      proc.kill()  # SIGKILL: no handler, no checkpoint
      t_kill = now
      proc.wait()
      break
    if proc.poll() is not None:
      break
    if deadline is not None and now > deadline:
      proc.kill()
      raise TimeoutError(f'soak: a run took longer than {deadline - t_launch:.0f} s')
    time.sleep(POLL_S)
  return seen, t_kill, t_launch


def _load_numpy(step_dir):
  import jax
  import orbax.checkpoint as ocp

  path = os.path.join(step_dir, 'state')
  with ocp.PyTreeCheckpointer() as c:
    meta = c.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, 'item_metadata') else meta
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return c.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args))


def _arrays_differing(a_dir, b_dir):
  import jax

  a, b = jax.tree.leaves(_load_numpy(a_dir)), jax.tree.leaves(_load_numpy(b_dir))
  differ = sum(1 for x, y in zip(a, b) if np.asarray(x).tobytes() != np.asarray(y).tobytes()) + abs(
    len(a) - len(b)
  )
  return differ, len(a)


def run(config, config_argv, workdir, cycles, seed, emit):
  """`emit(**row)` prints a JSON line. `config` (resolved) gives the run's length and cadence."""
  if os.path.exists(workdir):
    shutil.rmtree(workdir)
  os.makedirs(workdir)
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(workdir, 'jit_cache'))
  argv = [
    *config_argv,
    '--config.log_every_steps=1',
    '--config.keep_checkpoints=100000',
  ]
  total, every = int(config.total_steps), int(config.checkpoint_every_steps)
  if total <= 0:
    raise ValueError('soak: set --config.total_steps (the run each cycle kills and resumes)')
  rng = random.Random(seed)
  limit = 3600.0

  ref_dir, run_dir = os.path.join(workdir, 'reference'), os.path.join(workdir, 'run')
  proc, log = _launch(argv, ref_dir, 'reference.txt')
  seen, _, t_launch = _watch(proc, ref_dir, deadline=time.time() + limit)
  log.close()
  if proc.returncode != 0 or total not in seen:
    raise RuntimeError(f'soak: the reference run failed; see {ref_dir}/logs/reference.txt')
  reference = _rows(ref_dir)
  startup = min(seen.values()) - t_launch
  train_s = max(seen.values()) - min(seen.values())
  step_s = train_s / max(1, total - 1)
  emit(
    bench='soak_reference',
    total_steps=total,
    checkpoint_every_steps=every,
    startup_s=round(startup, 2),
    train_s=round(train_s, 2),
    step_s=round(step_s, 4),
  )

  results, done = [], False
  pending = None  # the killed cycle, completed by what the next launch shows
  for cycle in range(1, cycles + 2):
    last = cycle == cycles + 1  # the final launch resumes and runs to the end
    kill_at = None if last else (lambda first: first + rng.uniform(0, 2 * train_s / cycles))
    proc, log = _launch(argv, run_dir, f'cycle_{cycle}.txt')
    seen, t_kill, t_launch = _watch(proc, run_dir, kill_at=kill_at, deadline=time.time() + limit)
    log.close()
    rows = _rows(run_dir)
    mine = sorted(seen)
    resumed_from = (mine[0] - 1) if mine else None
    t_first = seen[mine[0]] if mine else None
    if pending is not None and resumed_from is not None:
      kept = set(_committed(run_dir))
      newest = pending['committed'][-1] if pending['committed'] else 0
      lost = [s for s in pending['committed'] if s not in kept and s > resumed_from]
      # Training the killed process did that did not survive, plus this restart.
      work = pending['t_kill'] - pending['t_first'] + step_s
      survived = (resumed_from - pending['started_from']) * step_s
      restart = t_first - t_launch - step_s
      # Steps the killed process had logged and this one ran again from the checkpoint.
      replayed = [s for s in mine if s in pending['rows'] and s in rows]
      row = dict(
        bench='soak',
        cycle=pending['cycle'],
        kill_after_s=pending['kill_after_s'],
        last_step=pending['last_step'],
        resumed_from=resumed_from,
        newest_committed=newest,
        steps_lost=pending['last_step'] - resumed_from,
        checkpoints_lost=len(lost) + int(resumed_from < newest),
        time_lost_s=round(work - survived + restart, 2),
        restart_s=round(restart, 2),
        bitwise_equal=all(rows[s]['loss'] == reference[s]['loss'] for s in mine if s in rows),
        rows_compared=len(mine),
        replay_bitwise_equal=all(rows[s]['loss'] == pending['rows'][s]['loss'] for s in replayed),
        replay_steps=len(replayed),
        replay_max_rel_diff=max(
          [abs(rows[s]['loss'] / pending['rows'][s]['loss'] - 1) for s in replayed], default=None
        ),
      )
      results.append(row)
      emit(**row)
    if t_kill is None:
      done = proc.returncode == 0
      if not done:
        raise RuntimeError(f'soak: cycle {cycle} failed; see {run_dir}/logs/cycle_{cycle}.txt')
      break
    pending = dict(
      cycle=cycle,
      kill_after_s=round(t_kill - t_first, 2),
      last_step=max(mine),
      started_from=resumed_from,
      committed=_committed(run_dir),
      t_kill=t_kill,
      t_first=t_first,
      rows={s: rows[s] for s in mine if s in rows},
    )

  final = None
  if done and total in _committed(run_dir):
    final = _arrays_differing(
      os.path.join(ref_dir, 'checkpoints', str(total)),
      os.path.join(run_dir, 'checkpoints', str(total)),
    )
  lost = [r['time_lost_s'] for r in results if r['time_lost_s'] is not None]
  steps = [r['steps_lost'] for r in results if r['steps_lost'] is not None]
  emit(
    bench='soak_summary',
    cycles=len(results),
    bitwise_equal_resumes=sum(r['bitwise_equal'] for r in results),
    replay_bitwise_equal=sum(r['replay_bitwise_equal'] for r in results),
    replay_max_rel_diff=max(
      [r['replay_max_rel_diff'] for r in results if r['replay_max_rel_diff'] is not None],
      default=None,
    ),
    checkpoints_lost=sum(r['checkpoints_lost'] for r in results),
    rejected_steps=len(os.listdir(os.path.join(run_dir, 'checkpoints', ckpt_lib.REJECTED)))
    if os.path.isdir(os.path.join(run_dir, 'checkpoints', ckpt_lib.REJECTED))
    else 0,
    steps_lost_mean=round(float(np.mean(steps)), 2) if steps else None,
    steps_lost_max=max(steps) if steps else None,
    time_lost_s_mean=round(float(np.mean(lost)), 2) if lost else None,
    time_lost_s_max=round(max(lost), 2) if lost else None,
    checkpoint_every_steps=every,
    final_arrays_differing=None if final is None else final[0],
    final_arrays=None if final is None else final[1],
    finished=done,
  )
