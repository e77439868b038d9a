"""One device mesh and the shardings built on it.

Parameters are replicated and batches are split over the mesh axis 'data'. Under `jax.jit` with
these shardings the whole step is written for the global batch: BatchNorm statistics and the InfoNCE
similarity matrix span every device (cross-replica BN and global negatives by construction).
"""

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def per_modality_batch(
  global_batch: int, shares: dict[str, float], modalities, num_devices: int, num_processes: int
) -> dict[str, int]:
  """Global batch per modality; fails (one line) when a share cannot split over devices/hosts."""
  total = sum(float(shares[m]) for m in modalities)
  sizes = {}
  for m in modalities:
    size = int(round(global_batch * float(shares[m]) / total))
    if size <= 0:
      raise ValueError(
        f'config.data.shares.{m}: gives an empty batch for batch_size={global_batch}'
      )
    if size % num_devices:
      raise ValueError(
        f'config.batch_size={global_batch}: the {m} share ({size}) is not divisible by the '
        f'{num_devices} devices'
      )
    if size % num_processes:
      raise ValueError(
        f'config.batch_size={global_batch}: the {m} share ({size}) is not divisible by the '
        f'{num_processes} processes'
      )
    sizes[m] = size
  if sum(sizes.values()) != global_batch:
    raise ValueError(
      f'config.data.shares: per-modality batches {sizes} do not add up to batch_size={global_batch}'
    )
  return sizes


def to_global(host_batch: Any, mesh: Mesh) -> Any:
  """Host-local numpy batch (this process's slice) -> global jax.Array sharded over 'data'."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch)


_BARRIERS: dict[str, int] = {}
# A barrier waits for the slowest process: building phantoms, or compiling a step on a host
# under load, can take many minutes; a peer that never arrives still ends the run.
BARRIER_TIMEOUT_S = 6 * 3600


def barrier(name: str) -> None:
  """Waits until every process has reached `name` (nothing to do in a single-process run).

  Through the coordination service (`jax.distributed`'s key-value store), not a collective:
  `multihost_utils.sync_global_devices` runs a psum, whose first call sets up the CPU
  collectives (gloo) with a fixed 30 s window for every process to join; a process that is
  30 s behind (still compiling under load) failed the run with DEADLINE_EXCEEDED. Each use
  of a name gets its own barrier id, as the service wants one id per barrier.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  # no public API yet

  n = _BARRIERS[name] = _BARRIERS.get(name, 0) + 1
  distributed.global_state.client.wait_at_barrier(f'aacp_{name}_{n}', BARRIER_TIMEOUT_S * 1000)
