#!/usr/bin/env bash
# Set up a virtual environment (once), pretrain on built-in phantoms on CPU, then linear probes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORKDIR=${WORKDIR:-/tmp/aacp_demo}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v 'is ignored' || true
exec .venv/bin/python -m aacp_jax.main --config=configs/pretrain.py:demo --workdir="$WORKDIR" "$@"
