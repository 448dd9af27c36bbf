"""FLOP counts for MFU and benchmark reports.

`jaxpr_matmul_flops` counts the matmuls of any traced program (loop trip counts included,
which XLA's `cost_analysis()` does not do for a scanned layer stack). `lora_step_flops` is
the model FLOPs of a LLaMA LoRA fine-tuning step, from the config alone.

`lora_step_flops` counts 2 * M * N * K per matmul of what the step has to compute, and
nothing else:

- forward: every projection, attention's Q K^T and P V over all T x T query-key pairs (the
  usual convention; a causal kernel that skips the masked half does less work than counted),
  the LM head on the positions that carry a loss;
- backward: only the gradients something trainable needs. Frozen weights get no weight
  gradient. An activation gets an input gradient only where it depends on a trainable
  parameter: the embeddings are frozen (unless `input_live`), so layer 0's q/k/v
  projections need no input gradient, and where no LoRA sits on q/k/v the layer-0
  attention needs no backward at all.
  LoRA factors always get their weight gradients (dB = (x A)^T dy needs x A, dA = x^T (dy B^T)
  needs dy B^T) and an input gradient where their input is live;
- no remat recompute (that is hardware FLOPs, not model FLOPs), no elementwise work.

`tests/test_flops.py` checks this count against the matmuls autodiff actually traces.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from emo_jax.models.llama import LlamaConfig
from emo_jax.models.lora import target_matcher

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def lora_targets_per_layer(cfg: LlamaConfig, targets: str | Iterable[str]) -> list[set[str]]:
  """The projection names that `apply_lora(..., targets=targets)` wraps in each layer (same
  matching rules: a plain name matches the last path component, anything else is a regex
  over the whole dotted path). Scanned layers share one module path, so all get the same."""
  match = target_matcher(targets)
  out = []
  for i in range(cfg.num_hidden_layers):
    layer = "model.layers" if cfg.scan_layers else f"model.layers.{i}"
    out.append({n for n in ATTENTION_PROJECTIONS if match(f"{layer}.self_attn.{n}")}
               | {n for n in MLP_PROJECTIONS if match(f"{layer}.mlp.{n}")})
  if not any(out):
    raise ValueError(f"LoRA targets {targets!r} match no projection of the decoder")
  return out


def lora_step_flops(cfg: LlamaConfig, *, batch: int, seq: int, rank: int,
                    targets: str | Iterable[str], loss_positions: int | None = None,
                    input_live: bool = False) -> dict:
  """Matmul FLOPs of one LoRA train step on [batch, seq] tokens, LoRA of `rank` wherever
  `apply_lora` would put it for `targets` (names such as "q_proj", or a path regex), frozen
  everything else.

  loss_positions: positions per sequence that go through the LM head (default seq - 1, the
  next-token loss). input_live: the decoder's input embeddings need a gradient, because
  something before the decoder trains (EMO-LLaMA's projectors feeding `inputs_embeds`). A
  scanned layer stack also computes every layer's backward as if it were (one body for all
  iterations), so its traced count equals this one's. Returns {"forward", "backward",
  "total"} in FLOPs.
  """
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  hq = cfg.num_attention_heads * cfg.head_dim
  hkv = cfg.num_key_value_heads * cfg.head_dim
  t = batch * seq
  p = batch * (seq - 1 if loss_positions is None else loss_positions)
  per_layer = lora_targets_per_layer(cfg, targets)
  shapes = {"q_proj": (d, hq), "k_proj": (d, hkv), "v_proj": (d, hkv), "o_proj": (hq, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
  attn_pair = 2 * batch * seq * seq * hq        # one [T, T] x head-dims contraction

  fwd = bwd = 0.0

  def projection(name: str, input_live: bool, lora: set[str]) -> bool:
    """Adds one projection's FLOPs; returns whether its output depends on a trainable."""
    nonlocal fwd, bwd
    i, o = shapes[name]
    fwd += 2 * t * i * o
    if input_live:
      bwd += 2 * t * i * o                      # dx through the frozen kernel
    if name in lora:
      fwd += 2 * t * rank * (i + o)
      bwd += 2 * t * rank * o * 2 + 2 * t * rank * i   # dB, dy B^T, dA
      if input_live:
        bwd += 2 * t * rank * i                 # dx through A
    return input_live or name in lora

  live = input_live                             # the residual stream needs a gradient
  for lora in per_layer:
    q_live, k_live, v_live = (projection(n, live, lora) for n in ("q_proj", "k_proj", "v_proj"))
    fwd += 2 * attn_pair                        # Q K^T and P V
    if q_live or k_live:
      bwd += attn_pair                          # dP = dO V^T
    bwd += attn_pair * (q_live + k_live + v_live)   # dQ = dS K, dK = dS^T Q, dV = P^T dO
    attn_live = q_live or k_live or v_live
    live = projection("o_proj", attn_live, lora) or live
    gate_live, up_live = projection("gate_proj", live, lora), projection("up_proj", live, lora)
    live = projection("down_proj", gate_live or up_live, lora) or live
  fwd += 2 * p * d * v                          # LM head
  if live:
    bwd += 2 * p * d * v                        # d(hidden); the head itself is frozen
  return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


def _sub_jaxprs(value):
  """Jaxprs nested in an equation parameter (ClosedJaxpr, Jaxpr, or sequences of them)."""
  from jax.extend import core
  if isinstance(value, core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def jaxpr_matmul_flops(jaxpr) -> tuple[float, int]:
  """Matmul + convolution FLOPs of a jaxpr, loop trip counts included.

  Counts 2*M*N*K per dot_general and per convolution (the usual model-FLOPs convention;
  elementwise work is ignored). `scan` bodies count `length` times, `cond` takes its most
  expensive branch, remat / pjit / custom-derivative calls recurse. Returns
  (flops, number of `while` loops whose trip count is unknown and counted once).
  """
  total, unknown = 0.0, 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      k = float(np.prod([lhs[d] for d in lc])) if lc else 1.0
      total += 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * k
      continue
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      dn = eqn.params["dimension_numbers"]
      out_feature_dim = dn.rhs_spec[0]
      per_out = float(np.prod(rhs)) / rhs[out_feature_dim]
      total += 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * per_out
      continue
    subs = [(k, j) for k, v in eqn.params.items() for j in _sub_jaxprs(v)]
    if not subs:
      continue
    counted = [jaxpr_matmul_flops(j) for _, j in subs]
    if name == "cond":
      total += max(c[0] for c in counted)
      unknown += max(c[1] for c in counted)
      continue
    mult = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
    if name == "while":
      unknown += 1
    total += mult * sum(c[0] for c in counted)
    unknown += sum(c[1] for c in counted)
  return total, unknown
