"""LLaMA benchmark: LoRA fine-tuning step and greedy KV-cache decoding, emo_jax vs
transformers (+ peft) on torch CPU, measured in the same run on the same machine.

    python benchmarks/bench_llama.py            # full measurement
    python benchmarks/bench_llama.py --quick    # fewer repetitions, proves the script runs

Configs (fixed, so results compare across runs and machines):
- LoRA step (fp32): 4 layers, hidden 512, FFN 1376, 8 heads, vocab 32000, seq 512, batch 4,
  LoRA r=16 alpha=32 on q/k/v/o; forward + backward + AdamW on the LoRA params only.
- Greedy decode: same model, batch 4, prompt 64, 128 new tokens, KV cache.

Timing: each measured thing is called once per round, round after round (matmul, jax step,
torch step; then jax decode, HF generate), and the best round of each is kept, so a slow phase of
a shared machine slows every side instead of whichever happened to run then.

Reported next to the machine's own limits: a measured fp32 2048^3 matmul throughput (model
FLOP/s as a fraction of it) and a measured memory read bandwidth (decode steps/s as a fraction of
the weight-streaming limit = bandwidth / bytes of weights + KV cache read per step).

Model FLOPs of a LoRA step: `emo_jax.perf.flops.lora_step_flops`, the matmuls the step must
compute (frozen weights get no weight gradient, layer 0's q/k/v no input gradient, attention
counted over all T x T pairs, no remat recompute); tests/test_flops.py checks it against the
matmuls autodiff traces.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import emo_jax  # noqa: E402,F401
from emo_jax.perf.flops import lora_step_flops  # noqa: E402
from emo_jax.models.generation import generate  # noqa: E402
from emo_jax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from emo_jax.models.lora import apply_lora, trainable_filter  # noqa: E402
from emo_jax.xla_options import train_compiler_options  # noqa: E402

MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
             rms_norm_eps=1e-5)
BATCH, SEQ = 4, 512
RANK, ALPHA, TARGETS = 16, 32, ("q_proj", "k_proj", "v_proj", "o_proj")
DEC_BATCH, PROMPT, NEW = 4, 64, 128


from timing import allocator_env, best_time, interleaved  # noqa: E402  (benchmarks/timing.py)


def matmul_runners() -> dict:
  """fp32 2048^3 matmul in jax and torch (the machine's practical FLOP/s limit)."""
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  import torch
  ta, tb = torch.randn(n, n), torch.randn(n, n)
  f(a, b).block_until_ready()  # compile outside the timed rounds
  return {"matmul_jax": lambda: f(a, b).block_until_ready(), "matmul_torch": lambda: ta @ tb}


MATMUL_FLOPS = 2 * 2048 ** 3


def measure_bandwidth(reps: int) -> float:
  """Read bandwidth in GB/s: a jitted sum over a 512 MiB fp32 array."""
  x = jnp.ones((128, 1024, 1024), jnp.float32)
  f = jax.jit(jnp.sum)
  t = best_time(lambda: f(x).block_until_ready(), reps)
  return x.nbytes / t / 1e9


def step_flops(cfg: LlamaConfig) -> float:
  return lora_step_flops(cfg, batch=BATCH, seq=SEQ, rank=RANK, targets=TARGETS)["total"]


def next_token_loss(model, ids):
  """Mean next-token cross entropy (fp32) over all positions, as HF's `labels=ids` loss, with
  the library's chunked LM-head cross entropy (`LlamaForCausalLM.cross_entropy`, the loss the
  training code uses): same FLOPs, no [B, T, V] logits in memory."""
  h, _ = model.model(ids)
  targets = ids[:, 1:]
  nll, _ = model.cross_entropy(h[:, :-1], targets, jnp.ones(targets.shape, jnp.float32))
  return nll / targets.size


def make_lora_train_step(graphdef, tx):
  """(trainable, opt_state, frozen, ids) -> (trainable, opt_state, loss): one AdamW step on
  the LoRA factors under `next_token_loss`; frozen weights are an input, never updated."""
  def train_step(trainable, opt_state, frozen, ids):
    def loss_fn(tr):
      return next_token_loss(nnx.merge(graphdef, tr, frozen), ids)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss
  return train_step


def jax_lora_runner(cfg: LlamaConfig, ids: np.ndarray):
  """(run one LoRA step, info with first-call time and loss)."""
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  apply_lora(model, rank=RANK, alpha=ALPHA, targets=TARGETS, rngs=nnx.Rngs(1))
  graphdef, trainable, frozen = nnx.split(model, trainable_filter(), ...)
  tx = optax.adamw(1e-4)
  opt_state = tx.init(trainable)
  train_step = make_lora_train_step(graphdef, tx)

  # The library's training-step options (what `train.step.jit_train_step` compiles with).
  step = jax.jit(train_step, donate_argnums=(0, 1), compiler_options=train_compiler_options())
  batch = jnp.asarray(ids)
  t0 = time.perf_counter()
  trainable, opt_state, loss = step(trainable, opt_state, frozen, batch)
  loss.block_until_ready()
  compile_s = time.perf_counter() - t0
  state = {"tr": trainable, "opt": opt_state}

  def run():
    state["tr"], state["opt"], l = step(state["tr"], state["opt"], frozen, batch)
    l.block_until_ready()
  return run, {"first_call_s": compile_s, "loss": float(loss)}


def torch_model(cfg: LlamaConfig, lora: bool):
  import torch
  import transformers
  hf_cfg = transformers.LlamaConfig(**{k: v for k, v in MODEL.items()}, attention_bias=False,
                                    tie_word_embeddings=False)
  torch.manual_seed(0)
  m = transformers.LlamaForCausalLM(hf_cfg)
  if lora:
    import peft
    m = peft.get_peft_model(m, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                               target_modules=list(TARGETS),
                                               task_type="CAUSAL_LM"))
  return m


def torch_lora_runner(cfg: LlamaConfig, ids: np.ndarray):
  import torch
  m = torch_model(cfg, lora=True).train()
  opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
  x = torch.as_tensor(ids, dtype=torch.long)

  def run():
    opt.zero_grad(set_to_none=True)
    out = m(input_ids=x, labels=x)
    out.loss.backward()
    opt.step()
  return run, {"threads": torch.get_num_threads()}


def jax_decode_runner(cfg: LlamaConfig, prompt: np.ndarray):
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  mask = jnp.ones(prompt.shape, jnp.int32)
  ids = jnp.asarray(prompt)

  def run():
    generate(model, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None,
             pad_token_id=0).block_until_ready()
  t0 = time.perf_counter()
  run()
  return run, {"first_call_s": time.perf_counter() - t0}


def torch_decode_runner(cfg: LlamaConfig, prompt: np.ndarray):
  import torch
  m = torch_model(cfg, lora=False).eval()
  x = torch.as_tensor(prompt, dtype=torch.long)

  def run():
    with torch.no_grad():
      out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW,
                       min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert out.shape[1] == PROMPT + NEW
  return run, {}


def decode_bytes_per_step(cfg: LlamaConfig) -> float:
  """Bytes read per decode step: every weight except the embedding table (4 rows are gathered)
  plus the whole (static-shape) KV cache, fp32."""
  d, f, v, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
  hq = cfg.num_attention_heads * cfg.head_dim
  hkv = cfg.num_key_value_heads * cfg.head_dim
  weights = L * (d * hq + 2 * d * hkv + hq * d + 3 * d * f + 2 * d) + d + d * v
  kv = 2 * L * DEC_BATCH * (PROMPT + NEW) * hkv
  return 4.0 * (weights + kv)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="1 round instead of 8")
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  ap.add_argument("--allocator", choices=("reuse", "default"), default="reuse",
                  help="glibc malloc for the whole process (both sides): 'reuse' keeps freed "
                       "memory (timing.MALLOC_REUSE), 'default' is glibc's own; results go to "
                       "llama.{json,md} and llama_default_malloc.{json,md}")
  args = ap.parse_args(argv)
  tunables = allocator_env(args.allocator, argv)
  reps = 1 if args.quick else 8
  cfg = LlamaConfig(**MODEL)
  rng = np.random.RandomState(0)
  ids = rng.randint(3, cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)
  prompt = rng.randint(3, cfg.vocab_size, (DEC_BATCH, PROMPT)).astype(np.int32)

  res: dict = {"config": {"model": MODEL, "batch": BATCH, "seq": SEQ, "lora_rank": RANK,
                          "lora_alpha": ALPHA, "lora_targets": TARGETS,
                          "decode": {"batch": DEC_BATCH, "prompt": PROMPT, "new": NEW}},
               "quick": args.quick, "machine": {
                 "platform": platform.platform(), "cpu_count": os.cpu_count(),
                 "jax": jax.__version__, "backend": jax.default_backend(),
                 "loadavg_1m": os.getloadavg()[0],
                 "allocator": args.allocator, "glibc_tunables": tunables}}
  bw = measure_bandwidth(reps + 2)
  mm_runners = matmul_runners()

  # LoRA step: matmul, jax and torch timed round by round.
  flops = step_flops(cfg)
  runners = dict(mm_runners)
  jax_run, jax_info = jax_lora_runner(cfg, ids)
  runners["jax"] = jax_run
  if not args.skip_torch:
    torch_run, torch_info = torch_lora_runner(cfg, ids)
    runners["torch_peft"] = torch_run
  best, faults = interleaved(runners, reps, warmup=0 if args.quick else 1)
  del runners, jax_run
  mm = {"jax_gflops": MATMUL_FLOPS / best["matmul_jax"] / 1e9,
        "torch_gflops": MATMUL_FLOPS / best["matmul_torch"] / 1e9}
  mm["peak_gflops"] = max(mm["jax_gflops"], mm["torch_gflops"])
  res["machine"].update(matmul_fp32_2048=mm, read_bandwidth_gbs=bw)
  print(f"matmul fp32 2048^3: jax {mm['jax_gflops']:.1f} / torch {mm['torch_gflops']:.1f} "
        f"GFLOP/s; read bandwidth {bw:.1f} GB/s", flush=True)
  lora = {"model_flops_per_step": flops, "rounds": reps, "jax": dict(jax_info)}
  if not args.skip_torch:
    lora["torch_peft"] = dict(torch_info)
  for side in ("jax", "torch_peft"):
    if side in lora:
      r = lora[side]
      r["step_s"] = best[side]
      r["minor_page_faults_per_step"] = faults[side]
      r["tokens_per_s"] = BATCH * SEQ / r["step_s"]
      r["model_gflops"] = flops / r["step_s"] / 1e9
      r["fraction_of_matmul"] = r["model_gflops"] / mm["peak_gflops"]
  if "torch_peft" in lora:
    lora["speedup_tokens_per_s"] = lora["jax"]["tokens_per_s"] / lora["torch_peft"]["tokens_per_s"]
  res["lora_step"] = lora
  print("lora step:", json.dumps(lora, indent=1), flush=True)

  # Greedy decode: jax and HF generate timed round by round.
  per_step = decode_bytes_per_step(cfg)
  limit_steps = bw * 1e9 / per_step
  jax_run, jax_info = jax_decode_runner(cfg, prompt)
  runners = {"jax": jax_run}
  if not args.skip_torch:
    runners["hf_generate"] = torch_decode_runner(cfg, prompt)[0]
  best, faults = interleaved(runners, reps, warmup=0 if args.quick else 1)
  dec = {"bytes_per_step": per_step, "weight_streaming_limit_steps_per_s": limit_steps,
         "rounds": reps, "jax": dict(jax_info, total_s=best["jax"],
                                     tokens_per_s=DEC_BATCH * NEW / best["jax"],
                                     steps_per_s=NEW / best["jax"],
                                     minor_page_faults_per_call=faults["jax"])}
  dec["jax"]["fraction_of_streaming_limit"] = dec["jax"]["steps_per_s"] / limit_steps
  if not args.skip_torch:
    dec["hf_generate"] = {"total_s": best["hf_generate"],
                          "tokens_per_s": DEC_BATCH * NEW / best["hf_generate"],
                          "minor_page_faults_per_call": faults["hf_generate"]}
    dec["speedup_tokens_per_s"] = dec["jax"]["tokens_per_s"] / dec["hf_generate"]["tokens_per_s"]
  res["decode"] = dec
  print("decode:", json.dumps(dec, indent=1), flush=True)

  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = "llama" if args.allocator == "reuse" else "llama_default_malloc"
  (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str))
  (out / f"{stem}.md").write_text(_markdown(res))
  print(f"wrote {out / stem}.json and {out / stem}.md")


def _markdown(res: dict) -> str:
  m = res["machine"]
  lora, dec = res["lora_step"], res["decode"]
  lines = [
    "# LLaMA benchmark (emo_jax vs transformers/peft, torch CPU)", "",
    f"{'QUICK run (1 repetition): not a final number. ' if res['quick'] else ''}"
    f"Machine: {m['cpu_count']} CPUs, load {m['loadavg_1m']:.1f}, jax {m['jax']} "
    f"({m['backend']}), glibc malloc: {m.get('allocator', 'default')}"
    f"{' (' + m['glibc_tunables'] + ')' if m.get('glibc_tunables') else ''}. fp32 2048^3 matmul: {m['matmul_fp32_2048']['peak_gflops']:.1f} GFLOP/s; "
    f"read bandwidth {m['read_bandwidth_gbs']:.1f} GB/s.", "",
    "| LoRA step (4L, d512, seq 512, batch 4, r16 qkvo, fp32) | s/step | tokens/s | "
    "model GFLOP/s | of matmul | page faults/step |", "|---|---|---|---|---|---|"]
  for side in ("jax", "torch_peft"):
    if side in lora:
      r = lora[side]
      lines.append(f"| {side} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                   f"{r['model_gflops']:.1f} | {100 * r['fraction_of_matmul']:.0f}% | "
                   f"{r.get('minor_page_faults_per_step', '')} |")
  if "speedup_tokens_per_s" in lora:
    lines.append(f"\nLoRA step speed-up (tokens/s): {lora['speedup_tokens_per_s']:.2f}x")
  lines += ["", "| greedy decode (batch 4, prompt 64, 128 new) | s | tokens/s | "
            "of weight-streaming limit |", "|---|---|---|---|",
            f"| jax | {dec['jax']['total_s']:.3f} | {dec['jax']['tokens_per_s']:.0f} | "
            f"{100 * dec['jax']['fraction_of_streaming_limit']:.0f}% |"]
  if "hf_generate" in dec:
    lines.append(f"| hf generate | {dec['hf_generate']['total_s']:.3f} | "
                 f"{dec['hf_generate']['tokens_per_s']:.0f} | |")
    lines.append(f"\nDecode speed-up (tokens/s): {dec['speedup_tokens_per_s']:.2f}x")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
