"""Batched autoregressive generation with the functional KV cache.

One `jax.jit` compiles prefill + the whole decode loop (`lax.while_loop`) for a given set of
static shapes (batch, prompt length, max_new_tokens) and sampling settings; no recompilation
per token. Prompts are left-padded (attention_mask 0 on the left); padding slots do not
advance position ids, so results equal HF `generate` on the same padded batch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import flax
import jax.numpy as jnp
from flax import nnx

from emo_jax.xla_options import decode_compiler_options  # noqa: F401  (re-exported)


@dataclasses.dataclass(frozen=True)
class GreedyConfig:
  """Arg-max decoding."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Ancestral sampling from softmax(logits / temperature) restricted to the top-k tokens
  (0 = off) and the smallest nucleus of probability >= top_p (1.0 = off)."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature <= 0:
      raise ValueError("temperature must be > 0 (use GreedyConfig for arg-max decoding)")
    if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"invalid top_k={self.top_k} / top_p={self.top_p}")


@flax.struct.dataclass
class RowSampling:
  """Per-row decoding settings as arrays, so that one compiled program serves any mix of
  requests in a batch: temperature [B] (0 = arg-max), top_p [B] (1 = off) and
  max_new_tokens [B] (a row is finished after that many tokens; at most the static
  `max_new_tokens` of the call)."""
  temperature: jax.Array
  top_p: jax.Array
  max_new_tokens: jax.Array


def _top_p_filter(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
  """Keeps the smallest nucleus of probability >= top_p per row (top_p scalar or [B, 1])."""
  neg = jnp.finfo(jnp.float32).min
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
  keep_sorted = before < top_p  # always keeps the most likely token
  keep = jnp.zeros_like(keep_sorted).at[
    jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits, neg)


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Temperature, top-k and top-p applied to fp32 logits [B, V]; removed tokens get -inf."""
  logits = logits.astype(jnp.float32) / cfg.temperature
  neg = jnp.finfo(jnp.float32).min
  if cfg.top_k and cfg.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if cfg.top_p < 1.0:
    logits = _top_p_filter(logits, cfg.top_p)
  return logits


def _next_token_rows(logits, rows: RowSampling, rng):
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  t = jnp.where(rows.temperature > 0, rows.temperature, 1.0).astype(jnp.float32)
  filtered = _top_p_filter(logits / t[:, None], rows.top_p.astype(jnp.float32)[:, None])
  sampled = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
  return jnp.where(rows.temperature > 0, sampled, greedy)


def _next_token(logits, sampling, rng, rows=None):
  if rows is not None:
    return _next_token_rows(logits, rows, rng)
  if isinstance(sampling, GreedyConfig):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


def _eos_tuple(eos_token_id) -> tuple[int, ...]:
  if eos_token_id is None:
    return ()
  if isinstance(eos_token_id, int):
    return (int(eos_token_id),)
  return tuple(int(e) for e in eos_token_id)


@functools.lru_cache(maxsize=None)
def _jitted(backend: str):
  """The jitted generate loop for a backend (compiler options differ on CPU)."""
  return jax.jit(_generate_loop, static_argnames=("graphdef", "max_new_tokens", "eos", "pad",
                                                  "sampling"),
                 compiler_options=decode_compiler_options(backend))


def _generate_loop(graphdef, state, input_ids, inputs_embeds, attention_mask, rng, rows=None,
                   *, max_new_tokens, eos, pad, sampling):
  model = nnx.merge(graphdef, state)
  model.eval()  # dropout off (on this traced copy only; the caller's model is untouched)
  b, t = attention_mask.shape
  cache = model.init_cache(b, t + max_new_tokens)
  logits, cache = model(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        cache=cache, logits_to_keep=1)
  eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

  def pick(logits_last, done, rng, i):
    rng, sub = jax.random.split(rng)
    tok = _next_token(logits_last, sampling, sub, rows)
    tok = jnp.where(done, pad, tok)
    done = done | jnp.isin(tok, eos_arr)
    if rows is not None:   # token i is the row's (i+1)-th: its last when i+1 >= its budget
      done = done | (i + 1 >= rows.max_new_tokens)
    return tok, done, rng

  out = jnp.full((b, max_new_tokens), pad, jnp.int32)
  tok, done, rng = pick(logits[:, -1], jnp.zeros((b,), bool), rng, 0)
  out = out.at[:, 0].set(tok)

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, done, out, rng = carry
    step_mask = jnp.ones((b, 1), jnp.int32)
    logits, cache = model(tok[:, None], attention_mask=step_mask, cache=cache)
    tok, done, rng = pick(logits[:, -1], done, rng, i)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
    return i + 1, tok, cache, done, out, rng

  carry = (jnp.asarray(1, jnp.int32), tok, cache, done, out, rng)
  carry = jax.lax.while_loop(cond, body, carry)
  return carry[4]


def generate(model: nnx.Module, input_ids: jax.Array | None = None, *,
             inputs_embeds: jax.Array | None = None, attention_mask: jax.Array | None = None,
             max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None,
             sampling: GreedyConfig | SamplingConfig = GreedyConfig(),
             rng: jax.Array | None = None, rows: RowSampling | None = None) -> jax.Array:
  """Generate `max_new_tokens` tokens after left-padded prompts; returns int32 [B, N].

  `model` is a `LlamaForCausalLM` (or anything with the same call / `init_cache` contract).
  Prompts come as `input_ids` [B, T] or `inputs_embeds` [B, T, D] (e.g. with spliced visual
  tokens), with `attention_mask` [B, T] (default: all ones). After a row emits an EOS token it
  is finished; its later positions hold `pad_token_id`. The loop stops early once every row has
  finished. `pad_token_id` defaults to the first EOS id (as HF) or 0.

  `rows` (a RowSampling) gives every row its own temperature / top-p / token budget as
  traced arrays (then `sampling` must stay GreedyConfig and an `rng` is needed): a server
  batches requests with different settings through one compiled program, and a row with
  temperature 0 gets the same tokens as GreedyConfig.
  """
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("pass exactly one of input_ids and inputs_embeds")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not isinstance(sampling, (GreedyConfig, SamplingConfig)):
    raise TypeError(f"sampling must be GreedyConfig or SamplingConfig, got {type(sampling)}")
  prompt = input_ids if input_ids is not None else inputs_embeds
  b, t = prompt.shape[:2]
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  if attention_mask.shape != (b, t):
    raise ValueError(f"attention_mask shape {attention_mask.shape} != prompt shape {(b, t)}")
  eos = _eos_tuple(eos_token_id)
  if pad_token_id is None:
    pad_token_id = eos[0] if eos else 0
  if rows is not None:
    if not isinstance(sampling, GreedyConfig):
      raise ValueError("pass either rows (per-row settings) or a SamplingConfig, not both")
    if rng is None:
      raise ValueError("rows needs an rng key")
    rows = jax.tree.map(lambda x: jnp.asarray(x).reshape(b), rows)
  if rng is None:
    if isinstance(sampling, SamplingConfig):
      raise ValueError("sampling needs an rng key")
    rng = jax.random.key(0)
  graphdef, state = nnx.split(model)
  # Inside an outer jit (e.g. the evaluator's jitted generate) the loop is inlined into the
  # caller's program, where per-jit compiler options are not allowed.
  traced = any(isinstance(x, jax.core.Tracer)
               for x in jax.tree.leaves((state, input_ids, inputs_embeds, attention_mask, rows)))
  return _jitted("traced" if traced else jax.default_backend())(
    graphdef, state, None if input_ids is None else jnp.asarray(input_ids, jnp.int32),
    inputs_embeds, attention_mask, rng, rows, max_new_tokens=int(max_new_tokens), eos=eos,
    pad=int(pad_token_id), sampling=sampling)
