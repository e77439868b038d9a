#!/usr/bin/env bash
# Set up a virtual environment (once) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,prep,eval]' 2>&1 | grep -v 'is ignored' || true
# One code style (ruff.toml; ruff pinned in setup.py, as formatters change their output between
# versions): a formatting diff or an unused import fails before any test runs.
.venv/bin/ruff format --check --quiet . || { echo 'ruff format: run `.venv/bin/ruff format .`' >&2; exit 1; }
.venv/bin/ruff check --quiet .
# -n 2: both cores; tests that measure nothing about timing, so parallelism only saves wall time.
exec .venv/bin/python -m pytest -q -n 2 --maxschedchunk=1 tests "$@"
