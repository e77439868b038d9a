"""Run a check in a fresh Python process on N fake CPU devices (float64 proofs need their own
process: `jax_enable_x64` and the device count are fixed at JAX's start)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_check(code: str, devices: int) -> str:
  """Runs `python -c code` on `devices` CPU devices; asserts it exits 0 and returns its stdout
  (the callers assert the check's 'OK:' line)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = (
    ' '.join(f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f)
    + f' --xla_force_host_platform_device_count={devices}'
  )
  proc = subprocess.run(
    [sys.executable, '-c', code],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,  # minutes of compilation on a loaded machine; no test depends on speed
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout
