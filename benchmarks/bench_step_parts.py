"""Where the time of bench_llama's LoRA step goes: the whole jitted step against its parts,
each jitted and timed on its own, in the same interleaved rounds.

    python benchmarks/bench_step_parts.py                      # reuse allocator (default)
    python benchmarks/bench_step_parts.py --allocator default  # glibc's own malloc

Parts (shapes of the bench_llama step: batch 4, seq 512, d512, vocab 32000, 4 layers):
- `lm_head_ce`: the chunked LM-head cross entropy, forward + d(hidden), as the step runs it
  (`layers.linear_cross_entropy`, 511 target positions, chunk `DEFAULT_CHUNK`);
- `lm_head_matmuls`: the same two matmuls per chunk (h @ W and dlogits @ W^T) with nothing
  between them, i.e. that part's floor at this machine's matmul speed;
- `attention_x_layers`: one layer's causal attention forward + backward
  (`layers.chunked_causal_attention`, chunk 128, q/k/v [4, 512, 8, 64]) times the layer
  count;
- `matmul_jax`, `matmul_torch`: the 2048^3 fp32 matmul in either library; the faster is the
  practical FLOP/s limit.
What the step spends outside the first and third (decoder matmuls and their input
gradients, LoRA, norms, rotary, AdamW) is the remainder. A part timed alone can run a little
faster or slower than inside the step (caches, fusion across its boundary), so the split is
an estimate, not an exact decomposition.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_llama as bl  # noqa: E402  (sets up sys.path for emo_jax)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from emo_jax.models.layers import (DEFAULT_CHUNK, chunked_causal_attention,  # noqa: E402
                                   linear_cross_entropy, make_attention_mask)
from emo_jax.models.llama import LlamaConfig  # noqa: E402
from emo_jax.xla_options import train_compiler_options  # noqa: E402
from timing import allocator_env, interleaved  # noqa: E402

ATTENTION_CHUNK = 128


def ce_runners(cfg: LlamaConfig) -> tuple[dict, float]:
  """(runners for the LM-head cross entropy and its bare matmuls, FLOPs of either)."""
  b, t, d, v = bl.BATCH, bl.SEQ - 1, cfg.hidden_size, cfg.vocab_size
  keys = jax.random.split(jax.random.key(2), 4)
  h = jax.random.normal(keys[0], (b, t, d), jnp.float32)
  kernel = jax.random.normal(keys[1], (d, v), jnp.float32) * 0.02
  targets = jax.random.randint(keys[2], (b, t), 0, v)
  weights = jnp.ones((b, t), jnp.float32)
  opts = train_compiler_options()
  ce = jax.jit(jax.grad(lambda h, w: linear_cross_entropy(h, w, targets, weights)[0]),
               compiler_options=opts)

  n = -(-t // DEFAULT_CHUNK)
  hc = jax.random.normal(keys[0], (n, b, DEFAULT_CHUNK, d), jnp.float32)
  gc = jax.random.normal(keys[3], (n, b, DEFAULT_CHUNK, v), jnp.float32)

  def two_matmuls(hc, gc, w):
    # Independent operands, so XLA cannot reassociate (h @ W) @ W^T into h @ (W @ W^T).
    return jax.lax.map(lambda x: (jnp.einsum("bcd,dv->bcv", x[0], w),
                                  jnp.einsum("bcv,dv->bcd", x[1], w)), (hc, gc))
  mm = jax.jit(two_matmuls, compiler_options=opts)
  jax.block_until_ready((ce(h, kernel), mm(hc, gc, kernel)))
  flops = 2 * 2 * b * t * d * v
  return {"lm_head_ce": lambda: ce(h, kernel).block_until_ready(),
          "lm_head_matmuls": lambda: jax.block_until_ready(mm(hc, gc, kernel))}, flops


def attention_runner(cfg: LlamaConfig):
  b, t, hq = bl.BATCH, bl.SEQ, cfg.num_attention_heads
  q, k, v, g = [jax.random.normal(jax.random.fold_in(jax.random.key(3), i),
                                  (b, t, hq, cfg.head_dim)) for i in range(4)]
  mask = make_attention_mask(jnp.ones((b, t), jnp.int32), jnp.arange(t), t)
  f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
    chunked_causal_attention(q, k, v, mask, chunk=ATTENTION_CHUNK) * g), argnums=(0, 1, 2)),
    compiler_options=train_compiler_options())
  jax.block_until_ready(f(q, k, v))
  return lambda: jax.block_until_ready(f(q, k, v))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=8)
  ap.add_argument("--allocator", choices=("reuse", "default"), default="reuse")
  ap.add_argument("--out", default=str(bl.ROOT / "benchmarks" / "results"))
  args = ap.parse_args(argv)
  tunables = allocator_env(args.allocator, argv)
  cfg = LlamaConfig(**bl.MODEL)
  ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (bl.BATCH, bl.SEQ)).astype(np.int32)

  step, _ = bl.jax_lora_runner(cfg, ids)
  runners = {"step": step}
  ce, ce_flops = ce_runners(cfg)
  runners.update(ce)
  runners["attention_one_layer"] = attention_runner(cfg)
  runners.update(bl.matmul_runners())   # jax and torch; the faster one is the limit, as in
                                        # bench_llama (one library's kernel can have a bad day)
  best, _ = interleaved(runners, args.rounds)

  layers = cfg.num_hidden_layers
  step_s, ce_s = best["step"], best["lm_head_ce"]
  attn_s = layers * best["attention_one_layer"]
  peak = bl.MATMUL_FLOPS / min(best["matmul_jax"], best["matmul_torch"]) / 1e9
  step_flops = bl.step_flops(cfg)
  parts = {
    "step": {"s": step_s, "gflops": step_flops / 1e9},
    "lm_head_ce": {"s": ce_s, "gflops": ce_flops / 1e9},
    "lm_head_matmuls": {"s": best["lm_head_matmuls"], "gflops": ce_flops / 1e9},
    "attention_x_layers": {"s": attn_s},
    "remainder": {"s": step_s - ce_s - attn_s},
  }
  for p in parts.values():
    p["share_of_step"] = p["s"] / step_s
    if "gflops" in p:
      p["gflop_per_s"] = p["gflops"] / p["s"]
      p["fraction_of_matmul"] = p["gflop_per_s"] / peak
  res = {"allocator": args.allocator, "glibc_tunables": tunables, "rounds": args.rounds,
         "loadavg_1m": os.getloadavg()[0], "matmul_2048_gflop_per_s": peak,
         "layers": layers, "attention_chunk": ATTENTION_CHUNK, "ce_chunk": DEFAULT_CHUNK,
         "parts": parts}
  print(json.dumps(res, indent=1))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = "step_parts" if args.allocator == "reuse" else "step_parts_default_malloc"
  (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
  lines = [f"# LoRA step of bench_llama, by part ({args.allocator} malloc)", "",
           f"Best of {args.rounds} interleaved rounds; load {res['loadavg_1m']:.1f}; matmul "
           f"2048^3 {peak:.1f} GFLOP/s.", "",
           "| part | ms | share of step | GFLOP | GFLOP/s | of matmul |", "|---|---|---|---|---|---|"]
  for name, p in parts.items():
    g = (f"{p['gflops']:.1f} | {p['gflop_per_s']:.1f} | {p['fraction_of_matmul']:.0%}"
         if "gflops" in p else "| |")
    lines.append(f"| {name} | {1e3 * p['s']:.0f} | {p['share_of_step']:.0%} | {g} |")
  (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
  print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
  main()
