"""Memory plan of a config's train step on fake CPU devices, without hardware.

  python -m emo_jax.perf --config=configs/emo_llama_7b.py --devices=8 --mesh=1,8,1 \\
      --micro_batch=1 --search --out=benchmarks/results/memory_plan_7b

Writes <out>.json and <out>.md (emo_jax.perf.memory_plan explains the numbers).
"""
import os
import sys


def _requested_devices(argv) -> int:
  for i, a in enumerate(argv):
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
    if a == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return 8


def _force_devices(n: int) -> None:
  """Ask for n fake CPU devices; must run before jax's backend starts."""
  keep = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(keep + [f"--xla_force_host_platform_device_count={n}"])
  os.environ["JAX_PLATFORMS"] = "cpu"


_force_devices(_requested_devices(sys.argv[1:]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from absl import app, flags
from ml_collections import config_flags

from emo_jax import sharding as sharding_lib
from emo_jax.perf import memory_plan as mp

config_flags.DEFINE_config_file("config", None, "configs/*.py[:arg] file", lock_config=False)
flags.DEFINE_integer("devices", 8, "number of fake CPU devices")
flags.DEFINE_string("mesh", "1,8,1", "data,fsdp,tensor mesh shape")
flags.DEFINE_integer("micro_batch", 1, "per-device micro-batch to report in full")
flags.DEFINE_boolean("search", True, "search the largest micro-batch for v5e / v5p HBM")
flags.DEFINE_enum("rules", None, ["dp", "fsdp", "fsdp_tp"], "override the config's rules")
flags.DEFINE_integer("seq_len", 2048, "sequence length (built-in LLaMA-7B plan, no --config)")
flags.DEFINE_string("out", None, "write <out>.json and <out>.md")
FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  if len(jax.devices()) != FLAGS.devices:
    raise app.UsageError(f"wanted {FLAGS.devices} fake devices, jax has {len(jax.devices())}")
  if FLAGS.config is not None:
    program = mp.program_from_config(FLAGS.config)
  else:
    program = mp.llama_lora_program(mp.llama2_7b_config(), seq_len=FLAGS.seq_len, lora_rank=8,
                                    name="llama2_7b_lora_r8")
  if FLAGS.rules:
    program.rules = sharding_lib.PRESETS[FLAGS.rules]
  command = "python -m emo_jax.perf " + " ".join(sys.argv[1:])
  report = mp.run_plan(program, mp.parse_mesh(FLAGS.mesh), FLAGS.micro_batch, FLAGS.search,
                       out=FLAGS.out, command=command, log=lambda s: print(s, flush=True))
  print(mp.to_markdown(report, command))


if __name__ == "__main__":
  app.run(main)
