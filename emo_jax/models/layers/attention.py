"""Scaled dot-product attention with grouped KV heads (GQA / MQA) and fp32 softmax."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def make_attention_mask(key_valid: jax.Array, query_slots: jax.Array, num_keys: int) -> jax.Array:
  """Boolean [B, T, S] mask: key slot s is visible from query t iff it is valid and s <= slot(t).

  key_valid: [B, S] (nonzero = real token); query_slots: [T] or [B, T] absolute slot index of
  each query in the key sequence (causality is by slot, so left padding works).
  """
  key_slots = jnp.arange(num_keys)
  if query_slots.ndim == 1:
    query_slots = query_slots[None]
  causal = key_slots[None, None, :] <= query_slots[:, :, None]
  return causal & (key_valid[:, None, :] != 0)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          *, scale: float | None = None, kv_layout: str = "bskd") -> jax.Array:
  """q: [B, T, H, d], k/v: [B, S, K, d] (`kv_layout="bskd"`) or [B, K, S, d] (`"bksd"`, the
  KV cache's heads-major layout, which the score and value contractions read without a
  transpose) with H % K == 0, mask: bool [B, T, S].

  Scores and softmax in fp32 (our choice, as HF). Masked scores get the most negative finite
  fp32 value instead of -inf, so a query that sees no key (a left-padding slot) yields a finite
  uniform average rather than NaN; such outputs are meaningless and must be masked downstream.
  Returns [B, T, H, d] in v's dtype.
  """
  if kv_layout not in ("bskd", "bksd"):
    raise ValueError(f"kv_layout must be 'bskd' or 'bksd', got {kv_layout!r}")
  b, t, h, d = q.shape
  kh = k.shape[2] if kv_layout == "bskd" else k.shape[1]
  if h % kh:
    raise ValueError(f"num heads {h} is not a multiple of num kv heads {kh}")
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, t, kh, h // kh, d)
  scores = jnp.einsum(f"btkgd,{kv_layout}->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores * scale
  big_neg = jnp.finfo(jnp.float32).min
  scores = jnp.where(mask[:, None, None, :, :], scores, big_neg)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"bkgts,{kv_layout}->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def chunked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                             *, chunk: int, scale: float | None = None) -> jax.Array:
  """`dot_product_attention` for a causal self-attention without cache, computed per block of
  `chunk` queries against only the keys up to the block's end (static slices).

  Equal to the full computation because `mask` is causal by slot (query t never sees keys
  after t); skips the masked upper triangle, ~(n+1)/(2n) of the work for n blocks (our
  optimisation; a static-shape cousin of blockwise / flash attention).
  """
  t = q.shape[1]
  if chunk <= 0 or t <= chunk:
    return dot_product_attention(q, k, v, mask, scale=scale)
  outs = []
  for start in range(0, t, chunk):
    end = min(start + chunk, t)
    outs.append(dot_product_attention(q[:, start:end], k[:, :end], v[:, :end],
                                      mask[:, start:end, :end], scale=scale))
  return jnp.concatenate(outs, axis=1)
