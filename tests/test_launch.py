"""The launch scripts run the project's interpreter and fail when a process fails."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_process_script_fails_when_its_processes_fail(tmp_path):
  env = dict(os.environ)
  # With no $PYTHON the script must find the repository's .venv itself (a bare `python` lacks
  # absl); without a .venv (another setup) this interpreter stands in for it.
  env.pop('PYTHON', None)
  if not os.path.exists(os.path.join(ROOT, '.venv', 'bin', 'python')):
    env['PYTHON'] = sys.executable
  # An unknown key: both processes stop while parsing their flags, before JAX is imported.
  proc = subprocess.run(
    ['bash', 'launch/local_two_process_cpu.sh', str(tmp_path), '--config.optim.nope=1'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  # Both processes share the pipe, so count the line rather than split on newlines.
  assert proc.stderr.count('error: --config.optim.nope: not a key of the config') == 2
  assert 'ModuleNotFoundError' not in proc.stderr


def test_launch_scripts_use_the_project_interpreter():
  for name in sorted(os.listdir(os.path.join(ROOT, 'launch'))):
    if name == 'python.sh':
      continue
    text = open(os.path.join(ROOT, 'launch', name)).read()
    assert 'launch/python.sh' in text, name
    # "$PY" (escaped inside tpu_vm.sh's remote command string).
    assert re.search(r'\\?"\\?\$PY\\?" -m aacp_jax\.(main|study)', text), name
    assert ' python -m' not in text and 'python3 -m' not in text, name
