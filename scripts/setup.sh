#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned requirements plus this package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q -r requirements.txt
# gradio declares pillow<13 but runs on the pinned pillow: installed without its
# dependency metadata; its dependencies are pinned in requirements.txt.
python -m pip install -q --no-deps -r requirements-nodeps.txt
python -m pip install -q --no-deps --no-build-isolation -e .
