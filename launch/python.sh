# Sourced by the launch scripts: PY, the project's interpreter. $PYTHON when set, else the
# repository's .venv (what scripts/demo.sh and scripts/test.sh set up), else python3. A bare
# `python` may be another environment without the project's packages.
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
if ! "$PY" -c 'import absl.flags, ml_collections' 2>/dev/null; then
  echo "error: $PY lacks the project's packages; run scripts/demo.sh once (sets up .venv) or set PYTHON" >&2
  exit 2
fi
