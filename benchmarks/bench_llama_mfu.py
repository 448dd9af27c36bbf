"""Model TFLOP/s and MFU of a LLaMA LoRA train step on whatever device jax runs on.

    python benchmarks/bench_llama_mfu.py                         # LLaMA-2-7B shape (accelerator)
    python benchmarks/bench_llama_mfu.py --shape tiny --steps 3  # the same code path on a CPU
    python benchmarks/bench_llama_mfu.py --plan-only             # 7B memory plan, no weights

The `7b` shape is the accelerator measurement: LLaMA-2-7B (32 layers, d4096, FFN 11008, 32
heads, vocab 32000), bf16 weights and compute, seq 2048, LoRA r16 alpha32 on q/k/v/o (the
bench_llama targets; `--targets` takes others), layers scanned, a remat policy
(`--remat`, default `dots_no_batch`: keep projection outputs, recompute attention), the
library's chunked LM-head cross entropy, AdamW on the LoRA factors only. Weights are random
and made on the device inside one jit (no host copy of 13 GB).

Reported:
- model TFLOP/s = `emo_jax.perf.flops.lora_step_flops` / step time (what the step must
  compute; no remat recompute, attention over all T x T pairs);
- MFU = model TFLOP/s / the device's peak dense bf16 FLOP/s (spec-sheet table
  `emo_jax.train.loop.PEAK_FLOPS`, or `--peak-tflops`);
- HFU = the matmuls the compiled step actually traces (remat recompute in, masked attention
  blocks skipped) / step time / peak;
- a measured square matmul in the step's dtype, the device's practical limit.
MaxText's published LLaMA-2-7B figure (about 50% MFU) is for full fine-tuning; a LoRA step
does no frozen-weight gradients, so its model FLOPs are about 2/3 of full training's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_llama as bl  # noqa: E402  (sets up sys.path for emo_jax)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from emo_jax.dtypes import to_dtype  # noqa: E402
from emo_jax.perf.flops import jaxpr_matmul_flops, lora_step_flops  # noqa: E402
from emo_jax.perf.memory_plan import read_stats  # noqa: E402
from emo_jax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from emo_jax.models.lora import apply_lora, trainable_filter  # noqa: E402
from emo_jax.train.loop import peak_flops_of_kind  # noqa: E402
from emo_jax.xla_options import train_compiler_options  # noqa: E402
from timing import best_time  # noqa: E402  (benchmarks/timing.py)

SHAPES = {
  "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
  "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512),
}
DEFAULTS = {"7b": dict(batch=4, seq=2048, dtype="bfloat16", matmul=8192),
            "tiny": dict(batch=2, seq=256, dtype="float32", matmul=1024)}


def device_peak_flops(device, override_tflops: float | None) -> float | None:
  if override_tflops:
    return override_tflops * 1e12
  return peak_flops_of_kind(device.device_kind) or None


def measured_matmul_flops(n: int, dtype, reps: int = 10) -> float:
  """FLOP/s of an n^3 matmul in `dtype` (fp32 accumulation) on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(dtype))
  return 2 * n ** 3 / best_time(lambda: f(a, b).block_until_ready(), reps)


def make_model_fn(cfg: LlamaConfig, rank: int, targets):
  def make_model():
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, rank=rank, alpha=2 * rank, targets=targets, rngs=nnx.Rngs(1))
    return model
  return make_model


def memory_stats(compiled) -> dict:
  """XLA's buffer assignment of the compiled step and the peak it implies, in bytes
  (`memory_plan.read_stats`, keys without the `_bytes` suffix); {} on a backend without
  memory_analysis()."""
  try:
    stats = read_stats(compiled)
  except RuntimeError:
    return {}
  return {k.removesuffix("_bytes"): v for k, v in stats.items() if k.endswith("_bytes")}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
  ap.add_argument("--batch", type=int)
  ap.add_argument("--seq", type=int)
  ap.add_argument("--dtype", choices=("bfloat16", "float32"))
  ap.add_argument("--layers", type=int, help="override the shape's layer count")
  ap.add_argument("--rank", type=int, default=bl.RANK)
  ap.add_argument("--targets", default=",".join(bl.TARGETS),
                  help="comma-separated projection names, e.g. q_proj,v_proj")
  ap.add_argument("--remat", default="dots_no_batch",
                  help="LlamaConfig.remat_policy: none, full, dots, dots_no_batch")
  ap.add_argument("--no-scan", action="store_true", help="unrolled layers instead of a scan")
  ap.add_argument("--attention-chunk", type=int, default=128)
  ap.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up")
  ap.add_argument("--matmul", type=int, help="side of the measured square matmul")
  ap.add_argument("--peak-tflops", type=float,
                  help="the device's peak dense FLOP/s in the step's dtype, in TFLOP/s "
                       "(default: emo_jax.train.loop.PEAK_FLOPS by device kind)")
  ap.add_argument("--plan-only", action="store_true",
                  help="compile against abstract shapes and report XLA's memory plan and the "
                       "FLOP counts, without making weights or running (a CPU can plan 7B)")
  ap.add_argument("--out", default=str(bl.ROOT / "benchmarks" / "results"))
  ap.add_argument("--tag", default="",
                  help="appended to the result file names (keeps variants apart)")
  args = ap.parse_args(argv)
  d = DEFAULTS[args.shape]
  batch, seq = args.batch or d["batch"], args.seq or d["seq"]
  dtype = to_dtype(args.dtype or d["dtype"])
  targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
  shape = dict(SHAPES[args.shape])
  if args.layers:
    shape["num_hidden_layers"] = args.layers
  cfg = LlamaConfig(**shape, dtype=dtype, param_dtype=dtype,
                    scan_layers=not args.no_scan, remat_policy=args.remat,
                    attention_chunk=args.attention_chunk)
  device = jax.devices()[0]
  peak = device_peak_flops(device, args.peak_tflops)
  print(f"device {device.device_kind} ({jax.default_backend()}), peak "
        f"{'unknown' if peak is None else f'{peak / 1e12:.4g} TFLOP/s'}", flush=True)

  # Compile against abstract shapes first: the plan (memory, FLOPs) needs no weights.
  make_model = make_model_fn(cfg, args.rank, targets)
  graphdef, abs_trainable, abs_frozen = nnx.split(nnx.eval_shape(make_model),
                                                  trainable_filter(), ...)
  tx = optax.adamw(1e-4)
  abs_opt = jax.eval_shape(tx.init, abs_trainable)
  abs_ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  step = jax.jit(bl.make_lora_train_step(graphdef, tx), donate_argnums=(0, 1),
                 compiler_options=train_compiler_options())
  t0 = time.perf_counter()
  traced = step.trace(abs_trainable, abs_opt, abs_frozen, abs_ids)
  traced_flops, unknown_loops = jaxpr_matmul_flops(traced.jaxpr.jaxpr)
  compiled = traced.lower().compile()
  compile_s = time.perf_counter() - t0
  memory = memory_stats(compiled)
  print(f"compiled in {compile_s:.1f} s; XLA peak {memory.get('peak', 0) / 2**30:.2f} GiB "
        f"(temp {memory.get('temp', 0) / 2**30:.2f} GiB)", flush=True)
  model_flops = lora_step_flops(cfg, batch=batch, seq=seq, rank=args.rank, targets=targets)
  res = {
    "config": {"shape": args.shape, "model": shape, "batch": batch, "seq": seq,
               "dtype": dtype.name, "lora_rank": args.rank, "lora_targets": targets,
               "remat_policy": cfg.remat_policy, "scan_layers": cfg.scan_layers,
               "attention_chunk": cfg.attention_chunk},
    "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                "jax": jax.__version__, "backend": jax.default_backend(),
                "device_kind": device.device_kind, "peak_flops": peak},
    "plan_only": args.plan_only, "compile_s": compile_s, "memory_bytes": memory,
    "model_flops_per_step": model_flops["total"],
    "traced_matmul_flops_per_step": traced_flops, "traced_unknown_loops": unknown_loops,
  }
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.plan_only:
    stem = f"llama_mfu_{args.shape}_plan{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    print(f"wrote {out / stem}.json")
    return res

  mm = measured_matmul_flops(args.matmul or d["matmul"], dtype)
  print(f"measured {args.matmul or d['matmul']}^3 {dtype.name} matmul: {mm / 1e12:.2f} "
        f"TFLOP/s", flush=True)
  t0 = time.perf_counter()
  # The weights are made on the device inside one jit (no host copy).
  trainable, frozen = jax.jit(lambda: nnx.split(make_model(), trainable_filter(), ...)[1:])()
  opt_state = jax.jit(tx.init)(trainable)
  jax.block_until_ready((trainable, frozen, opt_state))
  init_s = time.perf_counter() - t0
  ids = jax.random.randint(jax.random.key(2), (batch, seq), 3, cfg.vocab_size, jnp.int32)

  t0 = time.perf_counter()
  trainable, opt_state, loss = compiled(trainable, opt_state, frozen, ids)
  first_loss = float(loss)
  warmup_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    trainable, opt_state, loss = compiled(trainable, opt_state, frozen, ids)
    loss.block_until_ready()
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)

  res["machine"]["measured_matmul_flops"] = mm
  res.update({
    "init_s": init_s, "first_step_s": warmup_s,
    "step_s_median": step_s, "step_s_best": min(times), "steps": len(times),
    "loss_first": first_loss, "loss_last": float(loss),
    "tokens_per_s": batch * seq / step_s,
    "model_tflops": model_flops["total"] / step_s / 1e12,
    "of_measured_matmul": model_flops["total"] / step_s / mm,
    "mfu": None if peak is None else model_flops["total"] / step_s / peak,
    "hfu": None if peak is None else traced_flops / step_s / peak,
  })
  print(json.dumps(res, indent=1), flush=True)
  stem = f"llama_mfu_{args.shape}{args.tag}"
  (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
  pct = (lambda x: "n/a" if x is None else f"{100 * x:.1f}%")
  (out / f"{stem}.md").write_text("\n".join([
    f"# LLaMA LoRA step MFU ({args.shape})", "",
    f"Device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; peak "
    f"{'unknown' if peak is None else f'{peak / 1e12:.4g}'} TFLOP/s; measured "
    f"{args.matmul or d['matmul']}^3 {dtype.name} matmul {mm / 1e12:.2f} TFLOP/s.", "",
    f"Config: batch {batch}, seq {seq}, {dtype.name}, LoRA r{args.rank} on "
    f"{'/'.join(targets)}, remat {cfg.remat_policy}, scan {cfg.scan_layers}. XLA memory "
    f"plan: peak {memory.get('peak', 0) / 2**30:.2f} GiB, of it temporaries "
    f"{memory.get('temp', 0) / 2**30:.2f} GiB.", "",
    "| step s (median of %d) | tokens/s | model TFLOP/s | MFU | HFU | of measured matmul |"
    % len(times),
    "|---|---|---|---|---|---|",
    f"| {step_s:.4f} | {res['tokens_per_s']:.0f} | {res['model_tflops']:.2f} | "
    f"{pct(res['mfu'])} | {pct(res['hfu'])} | {pct(res['of_measured_matmul'])} |", ""]))
  print(f"wrote {out / stem}.json and .md")
  return res


if __name__ == "__main__":
  main()
