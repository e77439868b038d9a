"""Test-wide JAX settings, set before any test imports jax (subprocesses inherit them).

- Eight fake CPU devices, so sharded code paths run as on an 8-GPU host.
- XLA's LLVM backend at optimisation level 0: the tests compile many small programs and run each
  a few times, so compilation (about a third shorter) outweighs the slower kernels.
- A persistent compilation cache: the end-to-end tests start several processes that compile the
  same train step; all but the first load it from disk.
"""

import os
import tempfile

os.environ.setdefault(
  'XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0'
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'aacp_jax_test_jit_cache')
)


# The longest tests (minutes of compilation each on 2 cores) start first, one per xdist worker,
# so the short ones fill in around them instead of one worker running them alone at the end.
# scripts/test.sh passes --maxschedchunk=1: xdist would otherwise hand each worker the first
# quarter of its share in one chunk, i.e. every slow test to the first worker. Each worker
# holds two tests, so the slow ones alternate with short ones to land on different workers.
SLOW_FIRST = (
  'test_train_e2e.py::',
  'test_step_sharded.py::',
  'test_multiprocess.py::',
  'test_inspect_bench.py::test_bench_step',
  'test_landmarks_e2e.py::',
  'test_notebook.py::test_notebook_runs',
)


def pytest_collection_modifyitems(config, items):
  def rank(item):
    for i, name in enumerate(SLOW_FIRST):
      if name in item.nodeid:
        return i
    return len(SLOW_FIRST)

  slow = sorted((it for it in items if rank(it) < len(SLOW_FIRST)), key=rank)
  rest = [it for it in items if rank(it) == len(SLOW_FIRST)]
  head = []
  for i, it in enumerate(slow):
    head.append(it)
    if i < len(rest):
      head.append(rest[i])
  items[:] = head + rest[len(slow) :]
