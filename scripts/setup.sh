#!/usr/bin/env bash
# Create .venv (if missing) and install distsparse with the test and example extras.
# torch is pinned to a range that 2.13 satisfies, so a CPU wheel already on disk is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[test,examples]"
