"""Group Relative Policy Optimization (Shao et al. 2024) with verifiable rewards.

Per prompt, G completions are sampled from the policy (`rollout`: the KV-cache sampler,
temperature / top-k / top-p, the prompt's visual tokens made once and shared by its G rows).
Their rewards r (rewards.py, weighted sum) give group-relative advantages
  A = (r - mean_group(r)) / (std_group(r) + eps)      (`scale_rewards=False`: r - mean, as
                                                       Dr.GRPO; std with Bessel's correction
                                                       as torch's / TRL's)
and the per-token objective (TRL's GRPOTrainer, Tunix's GrpoLearner names):
  ratio = exp(logp - logp_old),  l = -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A)
  l += beta * KL,   KL = exp(ref - logp) - (ref - logp) - 1    (k3 estimator, per token)
with logp_old = stop_gradient(logp) when each rollout batch is used for one update
(`num_iterations=1`; the ratio is then 1 and its gradient that of logp), else the log-probs
at rollout time. Reduction over the completion tokens (`loss_type`):
  'grpo'     mean over each completion's tokens, then over completions;
  'bnpo'     token-level: sum over all completion tokens of the batch / their number;
  'dr_grpo'  sum over tokens / (completions x max_completion_length) (Dr.GRPO, unbiased in
             the completion length).
Completion tokens after the first EOS are masked out (the EOS itself counts).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.models import generation
from emo_jax.posttrain import logps as logps_lib
from emo_jax.posttrain import reference as ref_lib

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


def group_advantages(rewards: np.ndarray, num_generations: int, *, scale_rewards: bool = True,
                     eps: float = 1e-4) -> np.ndarray:
  """Advantages [B*G] (float32) of rewards [B*G] in groups of G consecutive completions."""
  r = np.asarray(rewards, np.float64).reshape(-1, num_generations)
  if num_generations < 2:
    raise ValueError("GRPO needs num_generations >= 2 (a group's std is undefined for one)")
  a = r - r.mean(axis=1, keepdims=True)
  if scale_rewards:
    a = a / (r.std(axis=1, ddof=1, keepdims=True) + eps)
  return a.reshape(-1).astype(np.float32)


def completion_mask(completions: np.ndarray | jax.Array, eos_id: int):
  """1 up to and including the first EOS of each row (all ones when there is none)."""
  xp = jnp if isinstance(completions, jax.Array) else np
  is_eos = completions == eos_id
  n = completions.shape[-1]
  first = xp.where(is_eos.any(-1), xp.argmax(is_eos, axis=-1), n)
  return (xp.arange(n) <= first[..., None]).astype(xp.int32)


def per_token_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None,
                   advantages: jax.Array, *, beta: float, epsilon: float,
                   epsilon_high: float | None = None) -> tuple[jax.Array, dict]:
  """Per-token GRPO loss [..., N] and its parts ('kl', 'clipped') for logps [..., N] and
  advantages [...] (one per completion)."""
  eps_hi = epsilon if epsilon_high is None else epsilon_high
  ratio = jnp.exp(logp - old_logp)
  clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + eps_hi)
  a = advantages[..., None]
  loss = -jnp.minimum(ratio * a, clipped * a)
  parts = {"clipped": ((ratio * a) > (clipped * a)).astype(jnp.float32)}
  if beta != 0.0 and ref_logp is not None:
    d = ref_logp - logp
    kl = jnp.exp(d) - d - 1.0
    loss = loss + beta * kl
    parts["kl"] = kl
  return loss, parts


def reduce_loss(loss: jax.Array, mask: jax.Array, loss_type: str
                ) -> tuple[jax.Array, jax.Array]:
  """(sum, weight) whose ratio is the batch loss of `loss_type`; sums and weights of
  micro-batches add up to the global batch's (train.step divides once)."""
  mask = mask.astype(jnp.float32)
  if loss_type == "bnpo":
    return (loss * mask).sum(), mask.sum()
  if loss_type == "grpo":
    per_seq = (loss * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    return per_seq.sum(), jnp.asarray(per_seq.size, jnp.float32)
  if loss_type == "dr_grpo":
    return (loss * mask).sum(), jnp.asarray(mask.size, jnp.float32)
  raise ValueError(f"unknown GRPO loss_type {loss_type!r}; known: {LOSS_TYPES}")


def make_loss_fn(*, prompt_len: int, beta: float, epsilon: float, epsilon_high: float | None,
                 loss_type: str, reference: str):
  """`loss_fn(model, batch, ref_params) -> (sum, weight, metric sums)` for train.step.

  batch: media [B, ...], `seq_input_ids` / `seq_attention_mask` [B, G, P + N] (prompt +
  completion), `completion_mask` [B, G, N], `advantages` [B, G], optional `old_logps`
  [B, G, N]."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; known: {LOSS_TYPES}")

  def loss_fn(model, batch: Mapping[str, Any], ref_params):
    logp, visual = logps_lib.completion_logps(model, batch, prompt_len)
    old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logp)
    ref = None
    if beta != 0.0:
      share = reference == "lora_off" and not jax.tree.leaves(ref_params)
      ref = ref_lib.forward(model, ref_params, reference, lambda m: logps_lib.completion_logps(
          m, batch, prompt_len, jax.lax.stop_gradient(visual) if share else None)[0])
    mask = jnp.asarray(batch["completion_mask"]).astype(jnp.float32)
    loss, parts = per_token_loss(logp, old, ref, jnp.asarray(batch["advantages"]), beta=beta,
                                 epsilon=epsilon, epsilon_high=epsilon_high)
    total, weight = reduce_loss(loss, mask, loss_type)
    sums = {f"{k}_sum": (v * mask).sum() for k, v in parts.items()}
    sums["completion_tokens"] = mask.sum()
    sums["completions"] = jnp.asarray(mask.shape[0] * mask.shape[1], jnp.float32)
    return total, weight, sums

  return loss_fn


# ------------------------------------------------------------------------------ rollout


def global_order(batch_size: int, process_count: int) -> np.ndarray:
  """Row permutation from the global array's layout to the data pipeline's global order.

  A global batch array holds each process's rows as one block (process i: rows
  i*b .. i*b+b-1, b = batch_size / process_count), while the pipeline gives process i the
  examples i, i+count, i+2*count, ... of the global order. `x[global_order(...)]` puts the
  rows in that global order (identity for one process)."""
  b = batch_size // process_count
  g = np.arange(batch_size)
  return (g % process_count) * b + g // process_count


def _rollout(graphdef, params, rngs, frozen, batch, key, *, num_generations, max_new_tokens,
             sampling, eos_id, pad_id, process_count=1):
  model = nnx.merge(graphdef, params, rngs, frozen)
  embeds, mask = model.embed_multimodal(batch)
  g, b = num_generations, embeds.shape[0]
  # Sample in the pipeline's global order: the random stream of a row depends on its
  # position, so this keeps the samples independent of the number of processes.
  order = global_order(b, process_count)
  embeds, mask = embeds[order], mask[order]
  comps = generation.generate(
      model.language_model, inputs_embeds=jnp.repeat(embeds, g, axis=0),
      attention_mask=jnp.repeat(mask, g, axis=0), max_new_tokens=max_new_tokens,
      eos_token_id=eos_id, pad_token_id=pad_id, sampling=sampling, rng=key)
  back = np.argsort(order)
  return comps.reshape(b, g, -1)[back].reshape(b * g, -1)


def make_rollout(graphdef, *, num_generations: int, max_new_tokens: int,
                 sampling: generation.SamplingConfig, eos_id: int, pad_id: int,
                 in_shardings=None, process_count: int = 1):
  """jit of `(params, rngs, frozen, prompt batch, key) -> completions int32 [B*G, N]`:
  G samples per left-padded prompt, the prompt's media encoded once, rows in the batch's
  own layout (sampled in the pipeline's global order over `process_count` processes).
  Compiled once per prompt shape (bucket); the weights are the train state's, on its mesh."""
  fn = functools.partial(_rollout, graphdef, num_generations=num_generations,
                         max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id,
                         pad_id=pad_id, process_count=process_count)
  kw = {} if in_shardings is None else {"in_shardings": in_shardings}
  return jax.jit(fn, compiler_options=generation.decode_compiler_options(), **kw)


def make_old_logps(graphdef, *, prompt_len: int):
  """jit of `(params, rngs, frozen, update batch) -> logps [B, G, N]` (for num_iterations > 1)."""

  def fn(params, rngs, frozen, batch):
    model = nnx.merge(graphdef, params, rngs, frozen)
    model.eval()
    return logps_lib.completion_logps(model, batch, prompt_len)[0]
  return jax.jit(fn)


def update_batch(prompt: Mapping[str, np.ndarray], completions: np.ndarray,
                 advantages: np.ndarray, num_generations: int, eos_id: int, pad_id: int
                 ) -> dict:
  """The update step's batch from the left-padded prompt batch [B, P] and completions
  [B*G, N]: media [B, ...], sequences [B, G, P + N], masks and advantages [B, G]."""
  b, p = prompt["input_ids"].shape
  g = num_generations
  comp = np.asarray(completions, np.int32).reshape(b, g, -1)
  cmask = completion_mask(comp, eos_id)
  rep = lambda x: np.repeat(np.asarray(x)[:, None], g, axis=1)   # noqa: E731
  out = {k: np.asarray(prompt[k]) for k in logps_lib.MEDIA_KEYS if k in prompt}
  out["seq_input_ids"] = np.concatenate([rep(prompt["input_ids"]),
                                         np.where(cmask > 0, comp, pad_id)], axis=2)
  out["seq_attention_mask"] = np.concatenate([rep(prompt["attention_mask"]), cmask], axis=2)
  out["completion_mask"] = cmask
  out["advantages"] = np.asarray(advantages, np.float32).reshape(b, g)
  return out
