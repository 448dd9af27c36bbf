#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_browser.sh
. .venv/bin/activate
exec python -m pytest -q -n 2 --dist=loadfile "$@" tests
