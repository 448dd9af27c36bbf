#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv (scripts/setup.sh), generates the
# synthetic data into ./workdir/data, trains the tiny EMO-LLaMA on CPU, evaluates it
# (UAR/WAR report in ./workdir/eval/report.md) and exports it to ./workdir/export.
# Extra arguments go to emo_jax.main (e.g. --config.train.num_steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
WORKDIR=${WORKDIR:-./workdir}
start=$(date +%s)
python -m emo_jax.main --config=configs/default.py --workdir="$WORKDIR" --mode=train \
  --alsologtostderr=false "$@"
end=$(date +%s)
echo "main job: $((end - start)) s wall; report: $WORKDIR/eval/report.md; export: $WORKDIR/export"
