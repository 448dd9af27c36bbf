#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh --test: runtime + test requirements), runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
exec python -m pytest -q -n 2 --dist=loadfile "$@" tests
