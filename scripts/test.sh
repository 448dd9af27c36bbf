#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh --test: runtime + test requirements), runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
bash scripts/install_browser.sh
. .venv/bin/activate
exec python -m pytest -q -n 2 --dist=loadfile "$@" tests
