"""A run's input: the shard root (phantoms built once when none is given), the global batch
per modality and this process's checkpointable host-batch iterator."""

import dataclasses
import os
from typing import Any

import jax

from aacp_jax import sharding
from aacp_jax.data import phantoms, pipeline, shards


@dataclasses.dataclass(frozen=True)
class Data:
  """root: the shard root; batches: global batch per modality; iterator: this process's host
  batches (a Grain iterator, saved in every checkpoint); steps_per_epoch: one pass of the
  smallest modality."""

  root: str
  batches: dict
  iterator: Any
  steps_per_epoch: int


def prepare_data(config, workdir: str) -> str:
  """The shard root: config.data.root, or phantoms built (once, cached) inside the workdir."""
  if config.data.root:
    if not os.path.isdir(config.data.root):
      raise ValueError(f'config.data.root={config.data.root}: no such directory')
    return config.data.root
  counts = {
    split: {m: int(n) for m in config.modalities} for split, n in config.data.phantoms.items()
  }
  root = phantoms.default_root(workdir, config.seed, config.data.image_size, counts)
  # Every process writes the same deterministic files; only process 0 does, the rest wait.
  if jax.process_index() == 0:
    phantoms.build(root, seed=config.seed, image_size=config.data.image_size, counts=counts)
  sync('phantoms')
  return root


def sync(name: str):
  """A barrier across processes (nothing to do in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def steps_per_epoch(root, split, modalities, global_batches) -> int:
  manifest = shards.read_manifest(root, split)
  return max(1, min(manifest['modalities'][m]['count'] // global_batches[m] for m in modalities))


def open_data(config, workdir: str, mesh) -> Data:
  """The pretraining loader over config.data.split: raw records, every modality's batch share."""
  batches = sharding.per_modality_batch(
    config.batch_size,
    config.data.shares,
    config.modalities,
    num_devices=mesh.size,
    num_processes=jax.process_count(),
  )
  root = prepare_data(config, workdir)
  per_host = {m: b // jax.process_count() for m, b in batches.items()}
  iterator = pipeline.pretrain_loader(
    root,
    config.data.split,
    per_host,
    seed=config.seed,
    image_size=config.data.image_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    worker_count=config.data.worker_count,
  )
  epoch = steps_per_epoch(root, config.data.split, config.modalities, batches)
  return Data(root=root, batches=batches, iterator=iterator, steps_per_epoch=epoch)
