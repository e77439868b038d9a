"""A run's input: the shard root (phantoms built once when none is given), the global batch
per modality and this process's checkpointable iterator of global batches, built one step ahead."""

import dataclasses
import json
import os
import queue
import threading
import time
from typing import Any, Callable

import jax

from aacp_jax import sharding
from aacp_jax.data import phantoms, pipeline, shards


@dataclasses.dataclass(frozen=True)
class Data:
  """root: the shard root; batches: global batch per modality; iterator: this process's batches
  (a `Prefetch` of global arrays over the Grain iterator, or a Grain iterator of host batches;
  saved in every checkpoint; read with `next_batch`); steps_per_epoch: one pass of the smallest
  modality."""

  root: str
  batches: dict
  iterator: Any
  steps_per_epoch: int


class Prefetch:
  """Global batches built one step ahead: a thread runs the Grain iterator's next() and the
  host-to-device transfer while the current step computes, so the step waits for data only
  when the host is slower than the device.

  Exact resume: the checkpointed state is that of the batches handed out by `__next__`, never
  of the one being prepared (the Grain state is taken right after each next() on the thread
  and travels with its batch). `get_state`/`set_state`/`start_prefetch` are what
  `grain.checkpoint.CheckpointSave`/`CheckpointRestore` call on an iterator that is not a Grain
  `DatasetIterator` (state as JSON bytes). `wait_s` sums the time `__next__` blocked.
  """

  def __init__(self, iterator, to_device: Callable, depth: int = 1):
    self._it, self._to_device, self._depth = iterator, to_device, max(1, int(depth))
    self._state = iterator.get_state()
    self._queue = self._thread = self._stop = None
    self._error = None
    self.wait_s, self.batches = 0.0, 0

  def _work(self, q: queue.Queue, stop: threading.Event):
    def put(item):
      while not stop.is_set():
        try:
          q.put(item, timeout=0.05)
          return True
        except queue.Full:
          pass
      return False

    try:
      while not stop.is_set():
        host = next(self._it)
        if not put((self._to_device(host), self._it.get_state(), None)):
          return
    except BaseException as e:  # pylint: disable=broad-except  # StopIteration and errors alike
      put((None, None, e))

  def _start(self):
    self._queue, self._stop = queue.Queue(self._depth), threading.Event()
    self._thread = threading.Thread(
      target=self._work, args=(self._queue, self._stop), name='prefetch', daemon=True
    )
    self._thread.start()

  def close(self):
    """Stops the thread (a batch it had prepared is dropped; the state is unchanged)."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = self._queue = self._stop = None

  def __iter__(self):
    return self

  def __next__(self):
    if self._error is not None:
      raise self._error
    if self._thread is None:
      self._start()
    t0 = time.perf_counter()
    batch, state, error = self._queue.get()
    self.wait_s += time.perf_counter() - t0
    if error is not None:
      self._error = error
      self.close()
      raise error
    self._state = state
    self.batches += 1
    return batch

  def get_state(self) -> bytes:
    return json.dumps(self._state).encode()

  def set_state(self, state):
    self.close()
    if isinstance(state, (bytes, bytearray)):
      state = json.loads(state.decode())
    self._it.set_state(state)
    self._state, self._error = self._it.get_state(), None

  def start_prefetch(self):
    """Called by Grain's checkpoint restore; prefetching starts at the next `__next__`."""


def next_batch(iterator, mesh):
  """The next global batch: a `Prefetch` already yields them, a plain iterator of host batches
  is transferred here."""
  if isinstance(iterator, Prefetch):
    return next(iterator)
  return sharding.to_global(next(iterator), mesh)


def prepare_data(config, workdir: str, *, seed: int | None = None) -> str:
  """The shard root: config.data.root, or phantoms built (once, cached) inside the workdir from
  `seed` (default config.seed)."""
  seed = config.seed if seed is None else int(seed)
  if config.data.root:
    if not os.path.isdir(config.data.root):
      raise ValueError(f'config.data.root={config.data.root}: no such directory')
    return config.data.root
  counts = {
    split: {m: int(n) for m in config.modalities} for split, n in config.data.phantoms.items()
  }
  root = phantoms.default_root(workdir, seed, config.data.image_size, counts)
  # Every process writes the same deterministic files; only process 0 does, the rest wait.
  if jax.process_index() == 0:
    phantoms.build(root, seed=seed, image_size=config.data.image_size, counts=counts)
  sharding.barrier('phantoms')
  return root


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
  iterator = Prefetch(iterator, lambda host: sharding.to_global(host, mesh))
  epoch = steps_per_epoch(root, config.data.split, config.modalities, batches)
  return Data(root=root, batches=batches, iterator=iterator, steps_per_epoch=epoch)
