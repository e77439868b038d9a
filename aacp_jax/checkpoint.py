"""Orbax checkpoints of the train state together with the Grain iterator state.

Resume is automatic: the latest step under `workdir/checkpoints` wins. The data iterator is saved
in the same checkpoint (orbax item 'data', as maxtext does), so a resumed run sees exactly the
batches it would have seen without the interruption.
"""

import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      save_interval_steps=max(1, every_steps),
      enable_async_checkpointing=async_save,
    )
    self._mgr = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    return self._mgr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iter=None, step=None):
    """Returns the restored state (data_iter is restored in place), or None without a checkpoint.

    `abstract_state` (shapes, dtypes, shardings from `jax.eval_shape`) keeps optax's named tuples
    and places the arrays straight onto the mesh.
    """
    step = self._mgr.latest_step() if step is None else step
    if step is None:
      return None
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
    return restored['state']

  def restore_variables(self, abstract_variables, step=None):
    """(params, batch_stats) alone from the `state` item of a checkpoint, or None without one.

    `abstract_variables`: {'params', 'batch_stats'} of ShapeDtypeStructs (`jax.eval_shape` of
    the model's init). The optimiser state, the method's extra state and the data iterator stay
    on disk: no optimiser, mesh or full train state is built (orbax partial restore).
    """
    step = self._mgr.latest_step() if step is None else step
    if step is None:
      return None, None
    item = {k: abstract_variables.get(k, {}) for k in ('params', 'batch_stats')}
    # NumPy arrays on the host: no device placement (and no sharding) to choose.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = self._mgr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
      ),
    )
    return restored['state'], step

  def close(self):
    self._mgr.wait_until_finished()
    self._mgr.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )
