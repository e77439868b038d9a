"""Reusable host-batch buffers: a large batch array serves again once nothing references it.

A CT host batch of 32 slabs at 358² x 64 int16 is 0.5 GiB. Allocated fresh every step it is a new
mapping (above glibc's mmap threshold) whose 131k pages the kernel zeroes and faults in on the
first write: ~3 ms a slab, as much as reading it (docs/PERFORMANCE.md, "Array files").

Reuse is exactly as safe as numpy's own memory management. numpy frees an array's memory when its
reference count reaches zero, so anything that may still read a batch (a batch dict, a numpy view:
it references its base; a memoryview; a Grain queue; a JAX transfer or zero-copy CPU array, which
keep their source alive) holds a reference. The pool holds one itself; a buffer with no other is
unreachable, and only such a buffer is handed out again.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

# Only batches this large are pooled: smaller ones come from glibc's heap, already reused.
MIN_BYTES = 32 << 20
# Buffers kept per pool: Grain's prefetch holds 4 host batches, its threads build 2 more and the
# loop holds one in flight; beyond this a fresh array is handed out and not kept.
MAX_BUFFERS = 8
# sys.getrefcount of an array referenced only by the pool's list (the list + the call's argument).
_UNREFERENCED = 2


class BufferPool:
  """``take(shape, dtype)``: an uninitialised array, an unreferenced earlier one when possible."""

  def __init__(self, max_buffers: int | None = None, min_bytes: int | None = None):
    self.max_buffers = int(MAX_BUFFERS if max_buffers is None else max_buffers)
    self.min_bytes = int(MIN_BYTES if min_bytes is None else min_bytes)
    self._buffers: list[np.ndarray] = []
    self._lock = threading.Lock()  # Grain's read threads batch concurrently

  def take(self, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    if dtype.itemsize * int(np.prod(shape, dtype=np.int64)) < self.min_bytes:
      return np.empty(shape, dtype)
    with self._lock:
      spare = None  # a free buffer of another shape: replaced by the new one
      for i in range(len(self._buffers)):
        if sys.getrefcount(self._buffers[i]) != _UNREFERENCED:
          continue
        if self._buffers[i].shape == shape and self._buffers[i].dtype == dtype:
          return self._buffers[i]
        spare = i
      buffer = np.empty(shape, dtype)
      if spare is not None:
        self._buffers[spare] = buffer
      elif len(self._buffers) < self.max_buffers:
        self._buffers.append(buffer)
      return buffer

  def __len__(self) -> int:
    return len(self._buffers)

  def __getstate__(self):
    # A Grain worker process gets its own, empty pool (buffers and locks stay in this process).
    return {'max_buffers': self.max_buffers, 'min_bytes': self.min_bytes}

  def __setstate__(self, state):
    self.__init__(**state)
