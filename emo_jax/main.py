"""The emo_jax command: train / eval / predict / export from one ml_collections config.

    python -m emo_jax.main --config=configs/default.py --workdir=./workdir
    python -m emo_jax.main --config=configs/default.py:video --workdir=./wd \\
        --config.optimizer.lr=1e-3 --config.train.num_steps=1000
    python -m emo_jax.main --config=configs/default.py --workdir=./workdir --mode=eval
    python -m emo_jax.main --config=configs/default.py --workdir=./workdir --mode=predict \\
        --input=face.jpg [--question="How does she feel?"]
    python -m emo_jax.main --config=configs/default.py --workdir=./workdir --mode=export
    python -m emo_jax.main --config=configs/posttrain.py --workdir=./grpo --mode=grpo \\
        --config.grpo.init_workdir=./workdir      # also --mode=dpo (docs/POST_TRAINING.md)
    python -m emo_jax.main --config=configs/au_bp4d.py:bp4d --workdir=./au --mode=au   # the AU head alone

Only training writes `<workdir>/config.json`; eval, predict and export read the workdir
and use its saved config for the model and data sections (`--nouse_saved_config` to use
the command line's), create nothing in it, and write their outputs to `--output_dir` /
`--export_dir` when given. A setting, input or workdir the job cannot use ends with one
`error: ...` line and exit status 2.

Multi-host (Cloud TPU pods, several GPU hosts): `jax.distributed.initialize()` runs when
--coordinator_address is given or the environment names a coordinator
(JAX_COORDINATOR_ADDRESS, a TPU pod with several workers, SLURM, ...). Hosts started by
hand may describe themselves with JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES +
JAX_PROCESS_ID (flags win over them). With an explicit address, process 0 first checks
that the coordinator port is free on its host (exit 2 if another program holds it).
"""
from __future__ import annotations

import errno
import json
import logging as py_logging
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")   # TensorFlow's C++ INFO lines

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from emo_jax.train.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<file>.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, reports, exports).")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "export", "dpo", "grpo", "au"],
                  "What to do (dpo / grpo: post-training, emo_jax.posttrain; au: only the "
                  "action-unit stage, config.au).")
flags.DEFINE_string("input", None, "predict: an image or video file.")
flags.DEFINE_string("question", None, "predict: the question (default: the category one).")
flags.DEFINE_string("export_dir", None, "export: output folder (default <workdir>/export).")
flags.DEFINE_string("output_dir", None, "eval / predict: where the report / a long video's "
                    "timeline go (default <workdir>/eval, <workdir>/predict).")
flags.DEFINE_bool("use_saved_config", True, "eval / predict / export: take the model and "
                  "data sections from <workdir>/config.json (the run's own config).")
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


def port_in_use(port: int) -> bool:
  """True when a program on this host holds TCP `port` on an IPv6 or IPv4 wildcard bind,
  as a server (the JAX coordination service binds [::]) would need it. A family this host
  lacks is skipped."""
  import socket
  for family, wildcard in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as servers bind
        s.bind((wildcard, port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        return True
  return False


def check_coordinator(address: str, process_id: int | None) -> None:
  """Raises UserError for a coordinator address without a port, or, on process 0 (which
  runs the coordination service on that port, on every interface), for a port that some
  other program holds: the service would crash its process and the other hosts would wait
  for it until their timeout."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"coordinator address {address!r} is not host:port")
  if process_id == 0 and port_in_use(int(port)):
    raise UserError(f"the coordinator port {port} is in use on this host (is an earlier "
                    "run still running?); stop it or choose another port")


def _maybe_initialize_distributed() -> None:
  import jax
  env = os.environ
  if FLAGS.coordinator_address:
    check_coordinator(FLAGS.coordinator_address, FLAGS.process_id)
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES") and \
      env.get("JAX_PROCESS_ID"):
    check_coordinator(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_PROCESS_ID"]))
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                               int(env["JAX_PROCESS_ID"]))
  elif _multihost_from_env():
    jax.distributed.initialize()   # reads the coordinator from the environment


# Libraries whose INFO lines (orbax logs each save in many) stay off the terminal; their
# warnings and errors still show, and so do our own INFO lines (progress, clu's reports).
QUIET_LIBRARIES = ("orbax", "grain", "jax", "absl", "etils", "tensorflow", "matplotlib",
                   "optax", "flax")


class _LibraryInfoFilter(py_logging.Filter):
  """Drops INFO and below from QUIET_LIBRARIES on absl's handler (absl logs every library
  through one 'absl' logger, so the source file's package decides)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    where = record.pathname.replace(os.sep, "/")
    return not any(f"/{lib}/" in where for lib in QUIET_LIBRARIES)


def configure_logging() -> None:
  """Our INFO lines and library warnings on the terminal; library INFO chatter off."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())
  for name in ("orbax", "grain", "jax", "etils"):
    py_logging.getLogger(name).setLevel(py_logging.WARNING)


TRAINING_MODES = ("train", "dpo", "grpo", "au")   # the modes that write into the workdir


def run(config, workdir: str, mode: str, *, input_path: str | None = None,
        question: str | None = None, export_dir: str | None = None,
        output_dir: str | None = None, use_saved_config: bool = True) -> dict:
  """The main job, callable from Python (tests) as well as from the command line.

  Only the training modes (train, dpo, grpo, au) write into the workdir; the other modes check the settings, the
  checkpoint and their output folder before any heavy work."""
  import jax
  from emo_jax.train import affect_eval, au_train, evaluate, export, loop, predict
  from emo_jax.train import checkpoint as ckpt_lib
  from emo_jax.train import saved_config, validate
  from input_pipeline import paths
  workdir = paths.resolve(workdir)   # local: absolute; gs://...: unchanged
  if mode not in TRAINING_MODES:
    config = saved_config.resolve(config, workdir, use_saved=use_saved_config)
  validate.validate(config, mode)
  if mode == "train":
    paths.makedirs(workdir)
    if jax.process_index() == 0:
      saved_config.write(config, workdir)
    out = loop.train(config, workdir)
    summary = {"step": out["step"], "num_steps": out["num_steps"],
               "trained_steps": out["trained_steps"],
               "preempted": out["preempted"], "skipped": out["skipped"]}
    if out["trained_steps"] == 0:
      summary["note"] = (f"nothing was trained: the checkpoint was already at step "
                         f"{out['step']} (train.num_steps={out['num_steps']})")
    if out["preempted"]:
      return summary
    model = None
    if config.eval.at_end or config.export.at_end or au_train.enabled(config):
      built = out["built"]
      from emo_jax.train import state as state_lib
      model = state_lib.merge_model(built.graphdef, out["state"].params, out["state"].rngs,
                                    built.frozen)
    if config.eval.at_end:
      summary["eval"] = evaluate.evaluate(config, workdir, model=model, step=out["step"],
                                          out_dir=output_dir)
    if (au_train.enabled(config) or affect_eval.enabled(config)) and jax.process_count() > 1:
      # The AU stage and the affective evaluation run on one host; a multi-host run
      # says so and leaves them to `--mode=au` on one host.
      logging.warning("AU stage and affective evaluation skipped: they run single-host "
                      "(%d processes); run --mode=au on one host", jax.process_count())
      summary["au"] = "skipped: multi-host run"
    else:
      if au_train.enabled(config):   # action units: a head on the trained vision tower
        summary["au"] = au_train.run(config, workdir, model)
      if affect_eval.enabled(config):
        summary["affect"] = affect_eval.run(config, workdir, model, step=out["step"])
    if config.export.at_end:
      summary["export"] = export.export(config, workdir, model=model,
                                        out_dir=export_dir or paths.join(workdir, "export"))
    return summary
  if mode in ("dpo", "grpo"):
    from emo_jax.posttrain import runner  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
      paths.makedirs(workdir)
      saved_config.write(config, workdir)
    return runner.run(config, workdir, mode)
  if mode == "au":   # the AU head alone, on the workdir's model or the config.init weights
    if jax.process_count() > 1:
      from emo_jax.train.errors import ConfigError  # pylint: disable=g-import-not-at-top
      raise ConfigError("--mode=au runs on one host; start it on a single process")
    if jax.process_index() == 0:
      paths.makedirs(workdir)
    return {"au": au_train.run(config, workdir, au_train.model_for_au(config, workdir))}
  if mode == "predict":
    if not input_path:
      raise predict.PredictError("--mode=predict needs --input=<image or video file>")
    out_dir = output_dir or paths.join(workdir, "predict")
    return predict.predict(config, workdir, input_path, question=question, out_dir=out_dir)
  ckpt_lib.require_checkpoint(workdir)
  if mode == "eval":
    out_dir = output_dir or paths.join(workdir, "eval")
    ckpt_lib.check_writable(out_dir, "--output_dir")
    return {"eval": evaluate.evaluate(config, workdir, out_dir=out_dir)}
  if mode == "export":
    out_dir = export_dir or paths.join(workdir, "export")
    ckpt_lib.check_writable(out_dir, "--export_dir")
    return {"export": export.export(config, workdir, out_dir=out_dir)}
  raise ValueError(f"unknown mode {mode!r}")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; a mistyped `--config.x` override is one error line, exit 2."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:
    text = str(e)
    names = re.findall(r"'([^'\\]+)", text)
    field = names[0] if names else "?"
    bad = [a.split("=", 1)[0] for a in argv[1:]
           if a.startswith("--config.") and field in a.split("=", 1)[0].split(".")]
    hint = re.search(r'Did you mean "([^"]+)"', text)
    print(f"error: unknown config field {bad[0] if bad else field!r}"
          + (f" (did you mean {hint.group(1)!r}?)" if hint else ""), file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  configure_logging()
  from input_pipeline.records import BadInputError
  try:
    _maybe_initialize_distributed()
    out = run(FLAGS.config, FLAGS.workdir, FLAGS.mode, input_path=FLAGS.input,
              question=FLAGS.question, export_dir=FLAGS.export_dir,
              output_dir=FLAGS.output_dir, use_saved_config=FLAGS.use_saved_config)
  except (UserError, BadInputError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.mode != "predict":
    if out.get("note"):
      print(out["note"], file=sys.stderr)
    print(json.dumps(_brief(out), indent=1, default=str))


def _brief(out: dict) -> dict:
  ev = out.get("eval")
  if isinstance(ev, dict) and "summary" in ev:
    out = dict(out, eval=ev["summary"])
  return out


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
