#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned requirements plus this package.
#   bash scripts/setup.sh          runtime only (requirements.txt): what training needs
#   bash scripts/setup.sh --test   also the test-only references and tools
#                                  (requirements-test.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
REQS=requirements.txt
if [ "${1:-}" = "--test" ]; then
  REQS=requirements-test.txt
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/setup.sh [--test]" >&2
  exit 2
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q -r "$REQS"
# gradio declares pillow<13 but runs on the pinned pillow: installed without its
# dependency metadata; its dependencies are pinned in requirements.txt.
python -m pip install -q --no-deps -r requirements-nodeps.txt
python -m pip install -q --no-deps --no-build-isolation -e .
