"""Orbax checkpoints of the train state together with the Grain iterator state, checksummed.

Resume is automatic: the newest step under `workdir/checkpoints` that verifies wins. The data
iterator is saved in the same checkpoint (orbax item 'data', as maxtext does), so a resumed run
sees exactly the batches it would have seen without the interruption.

Integrity: orbax checks neither sizes nor contents of what it reads back (a flipped byte in an
OCDBT data file restores silently). So once orbax has committed a step (async saves: in a thread
that waits for the commit), process 0 writes `MANIFEST` into the step folder: the size and
sha256 of every file. `restore` tries the steps newest first, verifies each against its
manifest, restores it (orbax's own errors, bare `Exception`/`KeyError` included, count as a
failed step), checks that the state is finite, and moves every newer step that failed aside to
`checkpoints/rejected/` (never deleted: a user may want it; moved, it no longer blocks a rerun
that saves the same step again). One log line names the step used and why newer ones were not.

A step without a manifest (written before checksums existed, or committed just before a kill
that came before its manifest) is restored unverified: orbax commits a step by renaming it into
place, so a committed step is complete unless damaged later, and it still has to restore and be
finite.

Pruning (`keep`) is ours, not orbax's: it runs only after a newer step has been verified, in a
run that has not failed, and removes only steps older than the `keep` newest verified ones; so
a failed run, or a save that never committed, never costs a good checkpoint.
"""

import json
import os
import shutil
import threading

from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from aacp_jax import digest, errors, sharding

MANIFEST = 'aacp_sha256.json'

# Each replicated array is written whole by its first replica. Orbax's default on CPU (and TPU)
# splits it across the replicas, which compiles one slice program per array shape per device on
# the first save: 272 programs and ~17 s on 8 CPU devices for the tiny test model, more than the
# save itself. Orbax already turns it off on GPU; a train state of ~0.3 GB gains nothing from it.
ocp.type_handlers.register_type_handler(
  jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
)
REJECTED = 'rejected'


def _files(folder: str) -> list[str]:
  out = []
  for root, _, names in os.walk(folder):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), folder)
      if rel != MANIFEST:
        out.append(rel)
  return sorted(out)


def write_manifest(folder: str) -> None:
  """Records size and sha256 of every file of a committed step folder (atomically)."""
  files = {}
  for rel in _files(folder):
    path = os.path.join(folder, rel)
    files[rel] = [os.path.getsize(path), digest.sha256_file(path)]
  tmp = os.path.join(folder, MANIFEST + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump({'algorithm': 'sha256', 'files': files}, f)
  os.replace(tmp, os.path.join(folder, MANIFEST))


def verify(folder: str) -> str | None:
  """None when `folder` matches its manifest; 'unverified' without one; else what is wrong."""
  if not os.path.isdir(folder) or not _files(folder):
    return 'empty step folder'
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    return 'unverified'
  try:
    with open(path, encoding='utf-8') as f:
      files = json.load(f)['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'{MANIFEST} unreadable ({errors.one_line(e, 80)})'
  for top in sorted({rel.split(os.sep)[0] for rel in files if os.sep in rel}):
    if not os.path.isdir(os.path.join(folder, top)):
      return f'{top}/ missing'
  for rel, (size, want) in sorted(files.items()):
    p = os.path.join(folder, rel)
    if not os.path.exists(p):
      return f'{rel} missing'
    actual = os.path.getsize(p)
    if actual != size:
      return f'{rel} has {actual} of {size} bytes'
    if digest.sha256_file(p) != want:
      return f'{rel} does not match its checksum'
  return None


@jax.jit
def _all_finite(tree):
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


class Checkpointer:
  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.keep = max(1, int(keep))
    # The line `restore` logged: which step it used and why newer ones were skipped.
    self.note = None
    options = ocp.CheckpointManagerOptions(
      max_to_keep=None,  # pruned by `_prune`, only behind a verified step
      save_interval_steps=max(1, every_steps),
      enable_async_checkpointing=async_save,
    )
    self._mgr = ocp.CheckpointManager(self.directory, options=options)
    self._pending = None  # (thread, step, [error]) recording the manifest of the last save

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _record(self, step: int, error: list):
    try:
      self._mgr.wait_until_finished()
      if jax.process_index() == 0 and os.path.isdir(self._step_dir(step)):
        write_manifest(self._step_dir(step))
    except BaseException as e:  # pylint: disable=broad-except
      error.append(e)  # raised in the main thread by `_finish`

  def _finish(self, prune: bool):
    """Waits for the last save and its manifest; then (if `prune`) applies `keep`."""
    if self._pending is None:
      return
    thread, step, error = self._pending
    thread.join()
    self._pending = None
    sharding.barrier('aacp_manifest')  # process 0's manifest is on disk for everyone's `_prune`
    if error:
      raise RuntimeError(f'{self._step_dir(step)}: saving failed: {errors.one_line(error[0])}')
    if prune:
      self._prune()

  def _prune(self):
    steps = sorted(self._mgr.all_steps())
    verified = [s for s in steps if os.path.exists(os.path.join(self._step_dir(s), MANIFEST))]
    if len(verified) <= self.keep:
      return
    oldest_kept = verified[-self.keep]
    for s in steps:
      if s < oldest_kept:
        self._mgr.delete(s)

  def save(self, step: int, state, data_iter=None, *, force: bool = False, prune=True) -> bool:
    """Starts saving `step` (on the interval, or `force`); returns whether it did.

    prune=False (a run that is failing) keeps every checkpoint on disk.
    """
    if self._pending is not None:
      # Reaped at the next save point (the same on every process), or once done when alone:
      # waiting at every step would make the async save synchronous.
      done = not self._pending[0].is_alive() and jax.process_count() == 1
      if done or force or self._mgr.should_save(step):
        self._finish(prune)
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self._mgr.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      error = []
      thread = threading.Thread(target=self._record, args=(step, error), daemon=True)
      thread.start()
      self._pending = (thread, step, error)
    return saved

  def _candidates(self, step):
    """(step, problem) newest first: problem None (verified), 'unverified' or what is wrong."""
    steps = sorted(self._mgr.all_steps(), reverse=True) if step is None else [step]
    for s in steps:
      yield s, verify(self._step_dir(s))

  def _announce(self, used, skipped, *, move: bool):
    parts = [f'{s} ({why})' for s, why in skipped]
    if used is None:
      head = f'{self.directory}: no usable checkpoint, starting from scratch'
    else:
      head = f'{self.directory}: restored step {used[0]}'
      if used[1] == 'unverified':
        head += f' (unverified: no {MANIFEST})'
    if parts:
      where = f', moved to {os.path.join(self.directory, REJECTED)}/' if move else ''
      self.note = f'{head}; skipped newer step(s) {", ".join(parts)}{where}'
      logging.warning('%s', self.note)
    else:
      self.note = head
      logging.info('%s', self.note)

  def _reject(self, skipped):
    """Moves failed steps aside (process 0), so orbax forgets them and can save them anew."""
    if skipped and jax.process_index() == 0:
      for s, why in skipped:
        src = self._step_dir(s)
        dst = os.path.join(self.directory, REJECTED, str(s))
        n = 1
        while os.path.exists(dst):
          dst, n = os.path.join(self.directory, REJECTED, f'{s}.{n}'), n + 1
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
        with open(dst + '.reason.txt', 'w', encoding='utf-8') as f:
          f.write(why + '\n')
    if skipped:
      sharding.barrier('aacp_rejected')
      self._mgr.reload()

  def _newest_good(self, step, load):
    """The newest candidate (all steps, or `step` alone) that verifies and that `load(step)`
    restores to finite values (None: not finite): ((step, problem), value, skipped), or
    (None, None, skipped); `skipped` lists (step, why) for every newer one that failed."""
    skipped = []
    for s, problem in self._candidates(step):
      if problem not in (None, 'unverified'):
        skipped.append((s, problem))
        continue
      try:
        value = load(s)
      except Exception as e:  # pylint: disable=broad-except
        # orbax reports damage as bare Exception/KeyError/ValueError with pages of tree dump.
        skipped.append((s, f'orbax: {errors.one_line(e, 160, with_type=True)}'))
        continue
      if value is None:
        skipped.append((s, 'non-finite values in the state'))
        continue
      return (s, problem), value, skipped
    return None, None, skipped

  def restore(self, abstract_state, data_iter=None, step=None):
    """Returns the newest state that verifies, restores and is finite (data_iter is restored in
    place), or None without one; newer steps that fail are moved to `rejected/`.

    `abstract_state` (shapes, dtypes, shardings from `jax.eval_shape`) keeps optax's named tuples
    and places the arrays straight onto the mesh.
    """

    def load(s):
      # The state first and alone: a step that fails leaves data_iter untouched.
      args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
      state = self._mgr.restore(s, args=args)['state']
      if not bool(_all_finite(state)):
        return None
      if data_iter is not None:
        args = ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter))
        self._mgr.restore(s, args=args)
      return state

    found, state, skipped = self._newest_good(step, load)
    if found is not None:
      self._announce(found, skipped, move=step is None)
      if step is None:
        self._reject(skipped)
      return state
    if skipped and step is None:
      self._announce(None, skipped, move=True)
      self._reject(skipped)
    if step is not None:
      raise ValueError(f'{self._step_dir(step)}: {skipped[0][1]}')
    return None

  def restore_variables(self, abstract_variables, step=None):
    """(params, batch_stats) alone from the `state` item of the newest checkpoint that verifies
    (or of `step`), and its step; (None, None) without one. Read-only: nothing is moved.

    `abstract_variables`: {'params', 'batch_stats'} of ShapeDtypeStructs (`jax.eval_shape` of
    the model's init). The optimiser state, the method's extra state and the data iterator stay
    on disk: no optimiser, mesh or full train state is built (orbax partial restore).
    """
    item = {k: abstract_variables.get(k, {}) for k in ('params', 'batch_stats')}
    # NumPy arrays on the host: no device placement (and no sharding) to choose.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)

    def load(s):
      args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
      )
      restored = self._mgr.restore(s, args=args)['state']
      return restored if all(np.isfinite(x).all() for x in jax.tree.leaves(restored)) else None

    found, restored, skipped = self._newest_good(step, load)
    if found is not None:
      self._announce(found, skipped, move=False)
      return restored, found[0]
    if step is not None:
      raise ValueError(f'{self._step_dir(step)}: {skipped[0][1]}')
    if skipped:
      self._announce(None, skipped, move=False)
    return None, None

  def steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def close(self, prune: bool = True):
    """Waits for the last save (and its manifest); prune=False after a failed run."""
    try:
      self._finish(prune)
    finally:
      self._mgr.wait_until_finished()
      self._mgr.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )
