"""The emo_jax command: train / eval / predict / export from one ml_collections config.

    python -m emo_jax.main --config=configs/default.py --workdir=./workdir
    python -m emo_jax.main --config=configs/default.py:video --workdir=./wd \\
        --config.optimizer.lr=1e-3 --config.train.num_steps=1000
    python -m emo_jax.main --config=configs/default.py --workdir=./workdir --mode=eval
    python -m emo_jax.main --config=configs/default.py --workdir=./workdir --mode=predict \\
        --input=face.jpg [--question="How does she feel?"]
    python -m emo_jax.main --config=configs/default.py --workdir=./workdir --mode=export
    python -m emo_jax.main --config=configs/au_bp4d.py:bp4d --workdir=./au --mode=au

Multi-host (Cloud TPU pods, several GPU hosts): `jax.distributed.initialize()` runs when
--coordinator_address is given or the environment names a coordinator
(JAX_COORDINATOR_ADDRESS, a TPU pod with several workers, SLURM, ...).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<file>.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, reports, exports).")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "export", "au"],
                  "What to do ('au': only the action-unit stage, config.au).")
flags.DEFINE_string("input", None, "predict: an image or video file.")
flags.DEFINE_string("question", None, "predict: the question (default: the category one).")
flags.DEFINE_string("export_dir", None, "export: output folder (default <workdir>/export).")
flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])

def _multihost_from_env() -> bool:
  """True when the environment describes more than one process."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return True
  for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(env.get(k, "1") or 1) > 1:
      return True
  return False


def _maybe_initialize_distributed() -> None:
  import jax
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif _multihost_from_env():
    jax.distributed.initialize()   # reads the coordinator from the environment


def run(config, workdir: str, mode: str, *, input_path: str | None = None,
        question: str | None = None, export_dir: str | None = None) -> dict:
  """The main job, callable from Python (tests) as well as from the command line."""
  import jax
  from emo_jax.train import affect_eval, au_train, evaluate, export, loop, predict
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  if mode == "train":
    out = loop.train(config, workdir)
    summary = {"step": out["step"], "num_steps": out["num_steps"],
               "preempted": out["preempted"], "skipped": out["skipped"]}
    if out["preempted"]:
      return summary
    model = None
    if config.eval.at_end or config.export.at_end or au_train.enabled(config):
      built = out["built"]
      from emo_jax.train import state as state_lib
      model = state_lib.merge_model(built.graphdef, out["state"].params, out["state"].rngs,
                                    built.frozen)
    if config.eval.at_end:
      summary["eval"] = evaluate.evaluate(config, workdir, model=model, step=out["step"])
    if au_train.enabled(config):   # action units: a head on the trained vision tower
      summary["au"] = au_train.run(config, workdir, model)
    if affect_eval.enabled(config):
      summary["affect"] = affect_eval.run(config, workdir, model, step=out["step"])
    if config.export.at_end:
      summary["export"] = export.export(config, workdir, model=model,
                                        out_dir=export_dir or os.path.join(workdir, "export"))
    return summary
  if mode == "eval":
    out = {"eval": evaluate.evaluate(config, workdir)}
    if au_train.enabled(config):
      out["au"] = au_train.run(config, workdir, train=False)
    if affect_eval.enabled(config):
      out["affect"] = affect_eval.run(config, workdir)
    return out
  if mode == "au":   # the AU head alone, on the workdir's model or the config.init weights
    return {"au": au_train.run(config, workdir, au_train.model_for_au(config, workdir))}
  if mode == "predict":
    if not input_path:
      raise predict.PredictError("--mode=predict needs --input=<image or video file>")
    return predict.predict(config, workdir, input_path, question=question)
  if mode == "export":
    return {"export": export.export(config, workdir,
                                    out_dir=export_dir or os.path.join(workdir, "export"))}
  raise ValueError(f"unknown mode {mode!r}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _maybe_initialize_distributed()
  from emo_jax.train import predict
  try:
    out = run(FLAGS.config, FLAGS.workdir, FLAGS.mode, input_path=FLAGS.input,
              question=FLAGS.question, export_dir=FLAGS.export_dir)
  except predict.PredictError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.mode != "predict":
    print(json.dumps(_brief(out), indent=1, default=str))


def _brief(out: dict) -> dict:
  ev = out.get("eval")
  if isinstance(ev, dict) and "summary" in ev:
    out = dict(out, eval=ev["summary"])
  return out


if __name__ == "__main__":
  app.run(main)
