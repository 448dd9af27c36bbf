"""GRPO speed on the tiny default (CPU) and the memory plan of a 7B GRPO step.

    python benchmarks/bench_grpo.py --part tiny       # rollout tokens/s, update step time
    python benchmarks/bench_grpo.py --part plan_7b    # 8 fake devices, abstract shapes

tiny: the embedded default's model (configs/posttrain.py), random weights, B prompts of the
default's bucket length (left-padded, one image each), G samples per prompt from the
KV-cache sampler (temperature 1; a random model seldom stops early, so every row decodes
all N tokens), then the jitted GRPO update (policy forward + backward, reference forward,
bnpo loss). Reported: best wall time over reps, generated tokens per second, seconds per
update step. Written to benchmarks/results/grpo_tiny.{json,md}.

plan_7b: the paper model (configs/posttrain.py:7b: Vicuna-7B + LoRA r128, EVA-ViT-G, 4
frames) as abstract shapes on 8 fake CPU devices (FSDP rules of the config), compiled twice:
the rollout (prompt encoding + prefill + G-sample decode loop with its KV cache) and the
update step (policy forward + backward over B x G sequences, the reference forward with
LoRA switched off, AdamW on the trainables). XLA's per-device buffer assignment is read
back as for SFT (the memory plan module; same caveats: XLA:CPU's numbers, to be confirmed
on hardware). Written to benchmarks/results/grpo_memory_plan_7b.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = REPO / "benchmarks" / "results"


def _memory_plan():
  from emo_jax.perf import memory_plan  # pylint: disable=g-import-not-at-top
  return memory_plan


def _force_devices(n: int) -> None:
  """n fake CPU devices; before jax's backend starts."""
  keep = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(keep + [f"--xla_force_host_platform_device_count={n}"])
  os.environ["JAX_PLATFORMS"] = "cpu"


def _config(arg):
  import importlib.util
  spec = importlib.util.spec_from_file_location("posttrain_cfg", REPO / "configs" / "posttrain.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _write(name: str, report: dict, md_rows: list[tuple[str, str]], title: str):
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
  lines = [f"# {title}", "", f"Command: `{report['command']}`", "", "| quantity | value |",
           "|---|---|"] + [f"| {k} | {v} |" for k, v in md_rows]
  (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


def tiny(args):
  import jax
  import numpy as np
  from flax import nnx
  from timing import best_time
  from emo_jax.models import generation
  from emo_jax.models.emo_llama import dummy_batch
  from emo_jax.posttrain import data as data_lib
  from emo_jax.posttrain import grpo as grpo_lib
  from emo_jax.posttrain import reference as ref_lib
  from emo_jax.train import optimizer as opt_lib
  from emo_jax.train import state as state_lib
  from emo_jax.train import step as step_lib
  from emo_jax.train import task as task_lib

  config = _config(None)
  pc = config.grpo
  mcfg = task_lib.model_config(config)
  model = task_lib.build_model(config)
  graphdef, params, rngs, frozen = state_lib.split_model(model, task_lib.trainable_filter(mcfg))
  b, g, n = int(pc.batch_size), int(pc.num_generations), args.completion_len
  t = max(config.data.pipeline.bucket_lengths)
  tpf = mcfg.tokens_per_frame
  batch = dummy_batch(mcfg, [1] * b, num_frames=1, prefix_len=t - tpf - 3, answer_len=3)
  prompt = data_lib.prompt_batch(batch, pad_id=0)
  model_prompt = {k: v for k, v in prompt.items() if k in task_lib.MODEL_KEYS}
  rollout = grpo_lib.make_rollout(graphdef, num_generations=g, max_new_tokens=n,
                                  sampling=generation.SamplingConfig(temperature=1.0),
                                  eos_id=-1, pad_id=0)   # no EOS: every row decodes N tokens
  key = jax.random.key(0)
  comps = None

  def do_rollout():
    nonlocal comps
    comps = np.asarray(rollout(params, rngs, frozen, model_prompt, key))
  t_roll = best_time(do_rollout, args.reps)
  rng = np.random.default_rng(0)
  adv = grpo_lib.group_advantages(rng.integers(0, 2, b * g).astype(float) + 0.01 *
                                  rng.normal(size=b * g), g)
  ub = grpo_lib.update_batch(prompt, comps, adv, g, eos_id=2, pad_id=0)
  tx, _ = opt_lib.make_optimizer(config.optimizer.to_dict(), 100, params)
  ref_mode = ref_lib.resolve_mode(pc.reference, model)
  ref = ref_lib.reference_params(params, ref_mode)
  fn = grpo_lib.make_loss_fn(prompt_len=prompt["input_ids"].shape[1], beta=float(pc.beta),
                             epsilon=float(pc.epsilon), epsilon_high=None,
                             loss_type=pc.loss_type, reference=ref_mode)
  step = step_lib.jit_train_step(graphdef, tx, fn, with_extra=True, donate=False)
  st = state_lib.create_train_state(params, rngs, tx)

  def do_update():
    jax.block_until_ready(step(st, frozen, ub, ref))
  t_upd = best_time(do_update, args.reps)
  report = {"command": "python benchmarks/bench_grpo.py " + " ".join(sys.argv[1:]),
            "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "prompts": b, "num_generations": g, "prompt_len": int(prompt["input_ids"].shape[1]),
            "completion_len": n, "rollout_s": t_roll,
            "rollout_tokens_per_s": b * g * n / t_roll, "update_step_s": t_upd,
            "update_sequences_per_s": b * g / t_upd, "reference": ref_mode,
            "trainable_params": opt_lib.count_params(params)}
  _write("grpo_tiny", report, [
      ("prompts x generations", f"{b} x {g}"), ("prompt / completion length",
                                                f"{report['prompt_len']} / {n}"),
      ("rollout (best of %d)" % args.reps, f"{t_roll:.3f} s"),
      ("rollout tokens/s", f"{report['rollout_tokens_per_s']:.0f}"),
      ("update step (best of %d)" % args.reps, f"{t_upd:.3f} s"),
      ("update sequences/s", f"{report['update_sequences_per_s']:.1f}"),
      ("reference", ref_mode)], "GRPO on the tiny default (CPU)")


def plan_7b(args):
  _force_devices(args.devices)
  mp = _memory_plan()
  import jax
  import jax.numpy as jnp
  from emo_jax import sharding as sharding_lib
  from emo_jax.models import generation
  from emo_jax.posttrain import grpo as grpo_lib
  from emo_jax.posttrain import reference as ref_lib
  from emo_jax.train import step as step_lib
  from emo_jax.train import task as task_lib

  config = _config("7b")
  pc = config.grpo
  program = mp.program_from_config(config)
  mesh = sharding_lib.make_mesh((1, args.devices, 1))
  state = mp.abstract_train_state(program)
  state_sh, frozen_sh = sharding_lib.state_and_frozen_shardings(state, program.frozen, mesh,
                                                            program.rules)
  ref = jax.eval_shape(lambda p: ref_lib.reference_params(p, "lora_off"), program.params)
  ref_sh = sharding_lib.tree_shardings(ref, mesh, program.rules)
  mcfg = task_lib.model_config(config)
  pcfg = task_lib.pipeline_config(config, mcfg)
  b = args.prompts_per_device * args.devices
  g, p, n, f = int(pc.num_generations), args.prompt_len, int(pc.max_completion_length), \
      pcfg.num_frames
  sds = jax.ShapeDtypeStruct
  media = {"frames": sds((b, f, pcfg.image_size, pcfg.image_size, 3), jnp.uint8),
           "frame_mask": sds((b, f), jnp.bool_),
           "qformer_ids": sds((b, pcfg.qformer_max_length), jnp.int32),
           "qformer_mask": sds((b, pcfg.qformer_max_length), jnp.int32),
           "face_crops": sds((b, f, pcfg.face_size, pcfg.face_size, 3), jnp.uint8)}
  upd = dict(media, seq_input_ids=sds((b, g, p + n), jnp.int32),
             seq_attention_mask=sds((b, g, p + n), jnp.int32),
             completion_mask=sds((b, g, n), jnp.int32), advantages=sds((b, g), jnp.float32))
  prompt = dict(media, input_ids=sds((b, p), jnp.int32), attention_mask=sds((b, p), jnp.int32))
  batch_sh = sharding_lib.batch_sharding(mesh)
  loss_fn = grpo_lib.make_loss_fn(prompt_len=p, beta=float(pc.beta), epsilon=float(pc.epsilon),
                                  epsilon_high=None, loss_type=pc.loss_type,
                                  reference="lora_off")
  fn = step_lib.jit_train_step(program.graphdef, program.tx, loss_fn, state_shardings=state_sh,
                               frozen_shardings=frozen_sh, batch_sharding=batch_sh,
                               extra_shardings=ref_sh, with_extra=True,
                               compute_dtype=program.compute_dtype, compiler_options=None)
  out = {}
  with sharding_lib.use_mesh_rules(mesh, program.rules), jax.set_mesh(mesh):
    t0 = time.time()
    out["update"] = mp.read_stats(fn.lower(state, program.frozen, upd, ref).compile())
    out["update"]["compile_s"] = time.time() - t0
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    roll = grpo_lib.make_rollout(
        program.graphdef, num_generations=g, max_new_tokens=n,
        sampling=generation.SamplingConfig(temperature=float(pc.temperature)), eos_id=2,
        pad_id=0, in_shardings=(state_sh.params, state_sh.rngs, frozen_sh, batch_sh, rep))
    t0 = time.time()
    key = jax.eval_shape(lambda: jax.random.key(0))
    out["rollout"] = mp.read_stats(roll.lower(state.params, state.rngs, program.frozen, prompt,
                                              key).compile())
    out["rollout"]["compile_s"] = time.time() - t0
  gib = 1024 ** 3
  report = {"command": "python benchmarks/bench_grpo.py " + " ".join(sys.argv[1:]),
            "devices": args.devices, "mesh": "1,%d,1" % args.devices,
            "prompts_global": b, "num_generations": g, "prompt_len": p, "completion_len": n,
            "num_frames": f, "lora_rank": mcfg.lora_rank, "reference": "lora_off",
            "compute_dtype": str(config.train.compute_dtype), **out,
            "info": program.info}
  rows = [("mesh (data, fsdp, tensor)", report["mesh"]),
          ("prompts (global) x generations", f"{b} x {g}"),
          ("prompt / completion tokens", f"{p} / {n}"),
          ("frames per prompt", str(f))]
  for part in ("rollout", "update"):
    s = out[part]
    rows += [(f"{part}: peak per device", f"{s['peak_bytes'] / gib:.2f} GiB"),
             (f"{part}: arguments / temporaries per device",
              f"{s['argument_bytes'] / gib:.2f} / {s['temp_bytes'] / gib:.2f} GiB")]
  _write("grpo_memory_plan_7b", report, rows, "Memory plan: 7B GRPO step on 8 fake devices")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--part", choices=("tiny", "plan_7b"), required=True)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--completion_len", type=int, default=32)
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--prompts_per_device", type=int, default=1)
  ap.add_argument("--prompt_len", type=int, default=256)
  args = ap.parse_args()
  tiny(args) if args.part == "tiny" else plan_7b(args)


if __name__ == "__main__":
  main()
