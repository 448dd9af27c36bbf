"""The main job on the embedded default, end to end: wall time and the scores it reaches.

    python benchmarks/bench_default_run.py [--workdir=/tmp/emo_default] [-- extra main flags]

Runs `python -m emo_jax.main --config=configs/default.py --mode=train` (train, evaluate,
export) in a fresh work directory and writes benchmarks/results/default_run.{json,md}: the
job's wall time, the load average before and after, and WAR / UAR of every evaluation mode
read back from `<workdir>/eval/report.json`. The scores are deterministic (seeded end to
end); the wall time depends on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="", help="'' = a temporary directory, removed after")
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  ap.add_argument("extra", nargs="*", help="flags passed on to emo_jax.main")
  args = ap.parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix="emo_default_")
  if os.path.exists(os.path.join(workdir, "checkpoints")):
    sys.exit(f"error: {workdir} holds checkpoints; the job would resume instead of training")
  cmd = [sys.executable, "-m", "emo_jax.main", "--config=configs/default.py",
         f"--workdir={workdir}", "--mode=train", "--alsologtostderr=false", *args.extra]
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
             TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
  load_before = os.getloadavg()
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)
  wall = time.perf_counter() - t0
  load_after = os.getloadavg()
  if proc.returncode != 0:
    sys.stderr.write(proc.stderr[-4000:])
    sys.exit(f"error: the main job exited with {proc.returncode}")
  report = json.loads(Path(workdir, "eval", "report.json").read_text())
  scores = {mode: {name: {"war": r["war"], "uar": r["uar"], "num_samples": r["num_samples"]}
                   for name, r in per.items()} for mode, per in report["modes"].items()}
  res = {"command": " ".join(["python -m emo_jax.main --config=configs/default.py",
                              "--mode=train", *args.extra]),
         "wall_s": round(wall, 1), "step": report.get("step"),
         "load_avg_before": [round(x, 2) for x in load_before],
         "load_avg_after": [round(x, 2) for x in load_after],
         "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
         "scores": scores}
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "default_run.json").write_text(json.dumps(res, indent=1) + "\n")
  md = ["# The main job on the embedded default", "",
        f"`{res['command']}`: {res['wall_s']} s wall on {res['cpus']} CPUs "
        f"(load average {load_before[0]:.2f} before, {load_after[0]:.2f} after), "
        f"{res['step']} steps.", "", "| mode | eval set | WAR | UAR | samples |",
        "|---|---|---|---|---|"]
  md += [f"| {mode} | {name} | {s['war']:.4f} | {s['uar']:.4f} | {s['num_samples']} |"
         for mode, per in scores.items() for name, s in per.items()]
  (out / "default_run.md").write_text("\n".join(md) + "\n")
  print("\n".join(md))
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  return res


if __name__ == "__main__":
  main()
