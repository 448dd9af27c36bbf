"""Causal self-attention, forward + backward, fp32, alone: emo_jax's blockwise causal
attention against the plain masked attention over all keys and torch's causal SDPA.

    python benchmarks/bench_attention.py                      # reuse allocator (default)
    python benchmarks/bench_attention.py --allocator default  # glibc's own malloc

Shape: the issue-2 LoRA step's attention, q/k/v [4, 512, 8, 64] (batch, tokens, heads,
head dim); the loss is sum(out * g) for a fixed random g. All three are timed round by round
(each called once per round) and the best round of each is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from emo_jax.models.layers.attention import (chunked_causal_attention,  # noqa: E402
                                             dot_product_attention, make_attention_mask)
from emo_jax.xla_options import train_compiler_options  # noqa: E402
from timing import allocator_env, interleaved  # noqa: E402  (benchmarks/timing.py)

B, T, H, D = 4, 512, 8, 64
CHUNK = 128


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=30)
  ap.add_argument("--allocator", choices=("reuse", "default"), default="reuse")
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = ap.parse_args(argv)
  tunables = allocator_env(args.allocator, argv)
  key = jax.random.key(0)
  q, k, v, g = [jax.random.normal(jax.random.fold_in(key, i), (B, T, H, D)) for i in range(4)]
  mask = make_attention_mask(jnp.ones((B, T), jnp.int32), jnp.arange(T), T)

  def grad_fn(attn):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v) * g), argnums=(0, 1, 2)),
                   compiler_options=train_compiler_options())

  blockwise = grad_fn(lambda q, k, v: chunked_causal_attention(q, k, v, mask, chunk=CHUNK))
  full = grad_fn(lambda q, k, v: dot_product_attention(q, k, v, mask))
  got, want = blockwise(q, k, v), full(q, k, v)
  max_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want))

  import torch
  tq, tk, tv, tg = [torch.tensor(np.asarray(x)).transpose(1, 2).contiguous().requires_grad_()
                    for x in (q, k, v, g)]

  def torch_sdpa():
    for x in (tq, tk, tv):
      x.grad = None
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    (out * tg).sum().backward()

  runners = {f"jax_blockwise_{CHUNK}": lambda: jax.block_until_ready(blockwise(q, k, v)),
             "jax_all_keys": lambda: jax.block_until_ready(full(q, k, v)),
             "torch_sdpa_causal": torch_sdpa}
  best, _ = interleaved(runners, args.rounds)
  res = {"shape_btHd": [B, T, H, D], "rounds": args.rounds, "allocator": args.allocator,
         "glibc_tunables": tunables, "loadavg_1m": os.getloadavg()[0],
         "grad_max_abs_diff_blockwise_vs_all_keys": max_diff,
         "fwd_bwd_ms": {name: 1e3 * t for name, t in best.items()}}
  print(json.dumps(res, indent=1))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = "attention" if args.allocator == "reuse" else "attention_default_malloc"
  (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
  lines = ["# Causal attention forward + backward, fp32, [4, 512, 8, 64]", "",
           f"glibc malloc: {args.allocator}; best of {args.rounds} interleaved rounds; "
           f"load {res['loadavg_1m']:.1f}; blockwise vs all-keys gradient max abs diff "
           f"{max_diff:.1e}.", "", "| implementation | ms |", "|---|---|"]
  lines += [f"| {name} | {ms:.1f} |" for name, ms in res["fwd_bwd_ms"].items()]
  (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
  print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
  main()
