"""The host-batch buffer pool: a buffer is handed out again only when nothing references it."""

import numpy as np

from aacp_jax.data import buffers


def test_reuse_only_when_unreferenced():
  pool = buffers.BufferPool(max_buffers=2, min_bytes=0)
  a = pool.take((4, 3), np.int16)
  b = pool.take((4, 3), np.int16)
  assert a is not b  # a is still held here
  a_id = id(a)
  del a
  c = pool.take((4, 3), np.int16)
  assert id(c) == a_id  # a's buffer, free again
  view = c[1:]  # a view references its base: c's buffer must stay in use
  del c
  d = pool.take((4, 3), np.int16)
  assert id(d) != a_id and len(pool) == 2
  del view, d, b
  e = pool.take((5, 3), np.int16)  # another shape replaces a free buffer, the pool stays bounded
  assert e.shape == (5, 3) and len(pool) == 2
  held = [pool.take((5, 3), np.int16) for _ in range(3)]  # beyond the bound: fresh, not kept
  assert len({id(x) for x in held + [e]}) == 4 and len(pool) == 2


def test_small_arrays_are_not_pooled_and_the_pool_pickles_empty():
  import copy

  pool = buffers.BufferPool(min_bytes=1024)
  small = pool.take((8,), np.uint8)
  assert small.shape == (8,) and len(pool) == 0
  big = pool.take((2048,), np.uint8)
  assert len(pool) == 1 and big.nbytes == 2048
  twin = copy.deepcopy(pool)  # what a Grain worker process receives: an empty pool of its own
  assert len(twin) == 0 and twin.min_bytes == 1024
