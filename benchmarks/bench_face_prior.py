"""Face crops per second through the frozen face prior network (FaceXFormer, Swin-B at 224).

    python benchmarks/bench_face_prior.py [--batch_size=8 --iters=5 --dtype=float32 --tiny]

Times the jitted crops -> FacePriors function (the same one `emo_jax.jobs.precompute_priors`
uses) on random weights (speed does not depend on the values) and random normalised crops.
Compile time is reported separately; throughput is the median over --iters timed calls after
one warm-up. Writes benchmarks/results/face_prior.json and .md. Numbers taken on a shared
machine are noisy; rerun on a quiet one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from emo_jax.dtypes import NAMES as DTYPE_NAMES, to_dtype  # noqa: E402
from emo_jax.models import facexformer as fx  # noqa: E402
from emo_jax.jobs.precompute_priors import PriorRunner  # noqa: E402


def _random_model(cfg: fx.FaceXFormerConfig) -> fx.FaceXFormer:
  """Shape-only model filled with numpy noise (speed does not depend on the values; compiling
  a jitted random init of Swin-B costs minutes on CPU)."""
  from flax import nnx
  model = fx.abstract_model(cfg)
  rng = np.random.default_rng(0)
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      var.set_value(jnp.asarray(0.02 * rng.standard_normal(var.shape), var.dtype))
  return model


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
  parser.add_argument("--tiny", action="store_true", help="tiny config (smoke test)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "face_prior"))
  args = parser.parse_args(argv)

  dtype = to_dtype(args.dtype)
  if args.tiny:
    cfg = fx.tiny_config(dtype=dtype)
  else:
    import dataclasses
    cfg = fx.FaceXFormerConfig(swin=dataclasses.replace(fx.FaceXFormerConfig().swin, dtype=dtype),
                               dtype=dtype)
  size = cfg.swin.image_size
  t0 = time.perf_counter()
  model = _random_model(cfg)
  init_s = time.perf_counter() - t0
  runner = PriorRunner(model, batch_size=args.batch_size)
  crops = np.random.default_rng(0).standard_normal(
      (args.batch_size, size, size, 3)).astype(np.float32)

  t0 = time.perf_counter()
  runner(crops)  # compile + first run
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.iters):
    t0 = time.perf_counter()
    runner(crops)
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(runner._state))
  result = {
      "benchmark": "face_prior",
      "model": "FaceXFormer tiny" if args.tiny else "FaceXFormer (Swin-B, 224)",
      "params": n_params, "image_size": size, "batch_size": args.batch_size,
      "dtype": args.dtype, "iters": args.iters, "init_s": round(init_s, 2),
      "compile_and_first_call_s": round(compile_s, 2),
      "batch_seconds_median": round(med, 4), "batch_seconds_all": [round(t, 4) for t in times],
      "crops_per_s": round(args.batch_size / med, 3),
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(), "machine": platform.machine(),
      "note": "shared machine while measured: noisy; rerun on a quiet machine",
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w") as fh:
    json.dump(result, fh, indent=2)
  with open(args.out + ".md", "w") as fh:
    fh.write("# Face prior throughput\n\n"
             f"{result['model']}, {n_params / 1e6:.1f} M parameters, {args.dtype}, "
             f"batch {args.batch_size}, backend {result['backend']} ({result['cpu_count']} CPUs).\n\n"
             "| crops/s | s / batch (median) | compile + 1st call (s) | iters |\n"
             "|---|---|---|---|\n"
             f"| {result['crops_per_s']} | {result['batch_seconds_median']} | "
             f"{result['compile_and_first_call_s']} | {args.iters} |\n\n"
             f"{result['note']}.\n")
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
