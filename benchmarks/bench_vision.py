"""Vision benchmark: ViT forward and Q-Former forward, emo_jax (jit) vs transformers (torch CPU),
fp32, same weights, same run, same machine.

    python benchmarks/bench_vision.py            # full measurement
    python benchmarks/bench_vision.py --quick    # fewer repetitions / smaller, proves it runs

Configs:
- ViT: EVA-ViT-G width (1408, 16 heads, MLP 6144, patch 14, 224 px -> 257 tokens) with a
  reduced depth (4 blocks; the real tower has 39 used), batch 4 frames. The torch side is an HF
  `CLIPVisionModel` of the same shape (same FLOPs; quick_gelu vs exact GELU is negligible).
- Q-Former: BERT-base InstructBLIP Q-Former (12 layers, 768, 12 heads, 32 queries, 32 text
  tokens, cross-attention to 257 x 1408 every 2nd layer), batch 4.
Writes benchmarks/results/vision.json and vision.md. Numbers taken while other jobs share the
CPU are noisy; rerun on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import (CLIPVisionConfig, CLIPVisionModel, InstructBlipQFormerConfig,  # noqa: E402
                          InstructBlipQFormerModel)

import emo_jax  # noqa: E402,F401
from emo_jax.convert.vision_hf import clip_vision_from_state_dict, qformer_from_state_dict  # noqa: E402
from emo_jax.models.qformer import QFormerConfig  # noqa: E402
from emo_jax.models.vit import VisionConfig  # noqa: E402


from timing import best_time  # noqa: E402  (benchmarks/timing.py)


def vit_flops(n, t, d, m, layers):
  per_layer = 2 * n * t * (4 * d * d + 2 * d * m) + 4 * n * t * t * d
  return layers * per_layer


def bench_vit(quick: bool, reps: int) -> dict:
  layers = 2 if quick else 4
  batch = 2 if quick else 4
  hc = CLIPVisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=layers,
                        num_attention_heads=16, patch_size=14, image_size=224)
  torch.manual_seed(0)
  tm = CLIPVisionModel(hc).eval()
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  model = clip_vision_from_state_dict(sd, VisionConfig.from_hf_clip_dict(hc.to_dict()))
  gd, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(gd, s)(x))
  x = np.random.RandomState(0).randn(batch, 224, 224, 3).astype(np.float32)
  xj, xt = jnp.asarray(x), torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  diff = float(np.max(np.abs(np.asarray(fwd(state, xj)) - tm(xt).last_hidden_state.detach().numpy())))
  t_jax = best_time(lambda: fwd(state, xj).block_until_ready(), reps)
  with torch.no_grad():
    t_torch = best_time(lambda: tm(xt), reps)
  flops = vit_flops(batch, 257, 1408, 6144, layers)
  return dict(config=dict(layers=layers, batch=batch, width=1408, mlp=6144, tokens=257),
              max_abs_diff=diff, emo_jax_s=t_jax, torch_s=t_torch,
              emo_jax_gflops=flops / t_jax / 1e9, torch_gflops=flops / t_torch / 1e9)


def bench_qformer(quick: bool, reps: int) -> dict:
  layers = 4 if quick else 12
  b, q, t, n = 4, 32, 32, 257
  hc = InstructBlipQFormerConfig(num_hidden_layers=layers, encoder_hidden_size=1408)
  torch.manual_seed(1)
  tm = InstructBlipQFormerModel(hc).eval()
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  sd["query_tokens"] = np.random.RandomState(1).randn(1, q, 768).astype(np.float32) * 0.02
  model = qformer_from_state_dict(sd, QFormerConfig.from_hf_dict(hc.to_dict(), num_query_tokens=q),
                                  prefix="")
  gd, state = nnx.split(model)
  rng = np.random.RandomState(2)
  ids = rng.randint(1, 30000, size=(b, t)).astype(np.int64)
  mask = np.ones((b, q + t), np.int64)
  enc = rng.randn(b, n, 1408).astype(np.float32)
  qe = np.broadcast_to(sd["query_tokens"], (b, q, 768)).copy()
  fwd = jax.jit(lambda s, *a: nnx.merge(gd, s)(*a))
  args = [jnp.asarray(a) for a in (qe, ids, mask, enc)]
  targs = dict(query_embeds=torch.from_numpy(qe), input_ids=torch.from_numpy(ids),
               attention_mask=torch.from_numpy(mask), encoder_hidden_states=torch.from_numpy(enc))
  with torch.no_grad():
    ref = tm(**targs).last_hidden_state[:, :q].numpy()
    diff = float(np.max(np.abs(np.asarray(fwd(state, *args)) - ref)))
    t_torch = best_time(lambda: tm(**targs), reps)
  t_jax = best_time(lambda: fwd(state, *args).block_until_ready(), reps)
  return dict(config=dict(layers=layers, batch=b, queries=q, text=t, encoder_tokens=n),
              max_abs_diff=diff, emo_jax_s=t_jax, torch_s=t_torch)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  reps = 2 if args.quick else 5
  jax.config.update("jax_default_matmul_precision", "highest")
  res = dict(quick=args.quick, machine=platform.platform(), cpus=torch.get_num_threads(),
             jax=jax.__version__, torch=torch.__version__,
             vit=bench_vit(args.quick, reps), qformer=bench_qformer(args.quick, reps))
  out = ROOT / "benchmarks" / "results"
  out.mkdir(parents=True, exist_ok=True)
  (out / "vision.json").write_text(json.dumps(res, indent=2))
  v, qf = res["vit"], res["qformer"]
  md = [f"# Vision forward benchmark ({'quick' if args.quick else 'full'}; fp32, CPU)", "",
        "| part | config | emo_jax (jit) s | torch s | max abs diff |", "|---|---|---|---|---|",
        f"| ViT | {v['config']} | {v['emo_jax_s']:.4f} ({v['emo_jax_gflops']:.1f} GFLOP/s) | "
        f"{v['torch_s']:.4f} ({v['torch_gflops']:.1f} GFLOP/s) | {v['max_abs_diff']:.2e} |",
        f"| Q-Former | {qf['config']} | {qf['emo_jax_s']:.4f} | {qf['torch_s']:.4f} | "
        f"{qf['max_abs_diff']:.2e} |", "",
        "Noisy if other jobs share the CPU; rerun on a quiet machine before quoting."]
  (out / "vision.md").write_text("\n".join(md) + "\n")
  print("\n".join(md))


if __name__ == "__main__":
  main()
