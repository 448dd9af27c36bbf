"""Post-training demonstration on the embedded default (CPU): SFT stopped early, then GRPO
and, separately, DPO from its checkpoint; test UAR / WAR before and after, reward curves.

    python benchmarks/posttrain_demo.py --workdir=/tmp/posttrain_demo \\
        [--sft_steps=400 --grpo_steps=150 --dpo_steps=150 --eval_modes=generate]

Every stage is the main command (`python -m emo_jax.main`), run in a subprocess and timed:
  1. SFT with configs/default.py for --sft_steps steps (of the default's 2400), evaluated
     (--skip_sft reuses <workdir>/sft and its sft_summary.json from an earlier run);
  2. GRPO (configs/posttrain.py, --mode=grpo) from the SFT checkpoint, evaluated;
  3. DPO (--mode=dpo, ambiguity-aware pairs built from the training labels), evaluated.
Writes benchmarks/results/posttrain_demo.{json,md} and posttrain_demo_rewards.png (GRPO's
mean reward and DPO's reward accuracy / margin per logged step, from one run each).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")


def _run(args: list[str], log_path: str) -> tuple[dict, float]:
  cmd = [sys.executable, "-m", "emo_jax.main"] + args
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  t0 = time.time()
  with open(log_path, "w") as f:
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
  wall = time.time() - t0
  with open(log_path, "a") as f:
    f.write(p.stdout)
  if p.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}); see {log_path}")
  out = p.stdout
  return json.loads(out[out.rindex("\n{") if "\n{" in out else out.index("{"):]), wall


def _scores(summary: dict) -> dict:
  ev = summary["eval"]
  return {mode: {name: {"uar": r["uar"], "war": r["war"]} for name, r in per.items()}
          for mode, per in ev.items()}


def _log(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "posttrain_log.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _plot(grpo_log, dpo_log, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  ax = axes[0]
  steps = [r["step"] for r in grpo_log]
  for key in sorted(k for k in grpo_log[0] if k.startswith("rewards/")):
    ax.plot(steps, [r[key] for r in grpo_log], label=key.split("/", 1)[1])
  ax.set_xlabel("GRPO step")
  ax.set_ylabel("mean reward of the rollouts")
  ax.set_title("GRPO")
  ax.legend()
  ax = axes[1]
  steps = [r["step"] for r in dpo_log]
  ax.plot(steps, [r["rewards/accuracies"] for r in dpo_log], label="reward accuracy")
  ax.set_xlabel("DPO step")
  ax.set_ylabel("chosen reward > rejected (fraction)")
  ax2 = ax.twinx()
  ax2.plot(steps, [r["rewards/margins"] for r in dpo_log], color="tab:orange",
           label="reward margin")
  ax2.set_ylabel("reward margin")
  ax.set_title("DPO")
  lines = ax.get_lines() + ax2.get_lines()
  ax.legend(lines, [l.get_label() for l in lines], loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--sft_steps", type=int, default=400)
  ap.add_argument("--grpo_steps", type=int, default=150)
  ap.add_argument("--dpo_steps", type=int, default=150)
  ap.add_argument("--eval_modes", default="generate",
                  help="comma list of evaluation modes (generate, likelihood) for every run")
  ap.add_argument("--extra", action="append", default=[],
                  help="one more --config.x=y for the post-training runs (repeatable)")
  ap.add_argument("--skip_sft", action="store_true", help="reuse <workdir>/sft")
  ap.add_argument("--note", action="append", default=[], help="a line for the report")
  for m in ("grpo", "dpo"):
    ap.add_argument(f"--{m}_done", default="",
                    help=f"reuse a finished {m} workdir (its eval/report.json and log) "
                    "instead of running the stage; with --{m}_wall its measured seconds")
    ap.add_argument(f"--{m}_wall", type=float, default=None)
  a = ap.parse_args()
  wd = os.path.abspath(a.workdir)
  os.makedirs(wd, exist_ok=True)
  sft = os.path.join(wd, "sft")
  data = os.path.join(sft, "data")
  modes = tuple(m for m in a.eval_modes.split(",") if m)
  quiet = ["--config.export.at_end=False", f"--config.eval.modes={modes!r}"]
  report: dict = {"command": "python benchmarks/posttrain_demo.py " + " ".join(sys.argv[1:]),
                  "cpu_count": os.cpu_count()}
  if a.skip_sft:
    with open(os.path.join(wd, "sft_summary.json")) as f:
      s, wall = json.load(f), None
  else:
    s, wall = _run(["--config=configs/default.py", f"--workdir={sft}",
                    f"--config.train.num_steps={a.sft_steps}",
                    f"--config.checkpoint.every_steps={a.sft_steps}"] + quiet,
                   os.path.join(wd, "sft.log"))
    with open(os.path.join(wd, "sft_summary.json"), "w") as f:
      json.dump(s, f)
  report["sft"] = {"steps": a.sft_steps, "default_steps": 2400, "wall_s": wall,
                   "eval": _scores(s)}
  logs: dict = {}
  for mode, steps in (("grpo", a.grpo_steps), ("dpo", a.dpo_steps)):
    w = os.path.join(wd, mode)
    if getattr(a, f"{mode}_done"):
      w = os.path.abspath(getattr(a, f"{mode}_done"))
      with open(os.path.join(w, "eval", "report.json")) as f:
        ev = json.load(f)
      summ = {name: {"uar": r["uar"], "war": r["war"]} for name, r in
              ev["modes"]["generate"].items()} if "generate" in ev["modes"] else {}
      report[mode] = {"steps": ev["step"], "wall_s": getattr(a, f"{mode}_wall"),
                      "eval": {"generate": summ}, "workdir": w}
      logs[mode] = _log(w)
      continue
    if os.path.exists(os.path.join(w, "checkpoints")):
      # A second run would resume the first one's checkpoint under the new settings.
      sys.exit(f"error: {w} holds an earlier {mode} run; delete it or pass --{mode}_done={w}")
    s, wall = _run(["--config=configs/posttrain.py", f"--mode={mode}", f"--workdir={w}",
                    f"--config.{mode}.init_workdir={sft}", f"--config.data.root={data}",
                    f"--config.{mode}.num_steps={steps}", "--config.train.log_every=5",
                    f"--config.checkpoint.every_steps={steps}"] + quiet + a.extra,
                   os.path.join(wd, f"{mode}.log"))
    report[mode] = {"steps": steps, "wall_s": wall, "eval": _scores(s), "last": s.get("last"),
                    "reference": s.get("reference")}
    logs[mode] = _log(w)
    print(mode, json.dumps(report[mode]), flush=True)
  os.makedirs(RESULTS, exist_ok=True)
  png = os.path.join(RESULTS, "posttrain_demo_rewards.png")
  _plot(logs["grpo"], logs["dpo"], png)
  report["rewards_png"] = os.path.relpath(png, REPO)
  lines = ["# Post-training demonstration (embedded default, CPU)", "",
           f"Command: `{report['command']}` ({report['cpu_count']} CPUs)", "",
           "| run | steps | wall (s) | mode | UAR | WAR |", "|---|---|---|---|---|---|"]
  for run in ("sft", "grpo", "dpo"):
    r = report[run]
    for mode, per in r["eval"].items():
      for name, v in per.items():
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] else "-"
        lines.append(f"| {run} | {r['steps']} | {wall} | {mode} ({name}) | {v['uar']:.4f} "
                     f"| {v['war']:.4f} |")
  lines += ["", f"Reward curves: `{report['rewards_png']}`", ""] + [f"- {n}" for n in a.note]
  report["notes"] = a.note
  with open(os.path.join(RESULTS, "posttrain_demo.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(RESULTS, "posttrain_demo.md"), "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
