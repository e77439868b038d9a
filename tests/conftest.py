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
