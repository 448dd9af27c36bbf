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
  _check_heads(h, kh)
  qg = q.reshape(b, t, kh, h // kh, d)
  out = _attend(qg, k, v, mask, d ** -0.5 if scale is None else scale, "btkgd", kv_layout)
  return out.reshape(b, t, h, d)


def _check_heads(h: int, kh: int) -> None:
  if h % kh:
    raise ValueError(f"num heads {h} is not a multiple of num kv heads {kh}")


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
            q_layout: str, kv_layout: str) -> jax.Array:
  """Masked fp32 softmax attention on grouped queries laid out as `q_layout` ("btkgd" or
  "bkgtd"); the output has q's layout and v's dtype.

  Normalised after the value contraction (our choice, as flash attention does):
  softmax(s) @ v = (exp(s - m) @ v) / sum(exp(s - m)), so the division touches the [.., T, d]
  output instead of the [.., T, S] weights, and the backward pass needs no row sum over S of
  dP * P. The row max m only keeps exp in range and is not differentiated.
  """
  scores = jnp.einsum(f"{q_layout},{kv_layout}->bkgts", q, k, preferred_element_type=jnp.float32)
  big_neg = jnp.finfo(jnp.float32).min
  scores = jnp.where(mask[:, None, None, :, :], scores * scale, big_neg)
  m = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  weights = jnp.exp(scores - m)  # masked keys: exp(-huge) = 0; a row with no key: all ones
  total = jnp.sum(weights, axis=-1)  # [b, k, g, t], >= 1
  out = jnp.einsum(f"bkgts,{kv_layout}->{q_layout}", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  total = total if q_layout == "bkgtd" else jnp.einsum("bkgt->btkg", total)
  return (out / total[..., None]).astype(v.dtype)


def chunked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                             *, chunk: int, scale: float | None = None) -> jax.Array:
  """`dot_product_attention` for a causal self-attention without cache, computed per block of
  `chunk` queries against only the keys up to the block's end (static slices).

  Equal to the full computation because `mask` is causal by slot (query t never sees keys
  after t); skips the masked upper triangle, ~(n+1)/(2n) of the work for n blocks (our
  optimisation; a static-shape cousin of blockwise / flash attention). q, k and v are moved
  to heads-major once ([B, K, G, T, d] and [B, K, S, d]), so every block's two contractions
  and their gradients read contiguous per-head rows instead of each re-transposing its slice.
  """
  b, t, h, d = q.shape
  kh = k.shape[2]
  if chunk <= 0 or t <= chunk:
    return dot_product_attention(q, k, v, mask, scale=scale)
  _check_heads(h, kh)
  scale = d ** -0.5 if scale is None else scale
  qh = q.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4)
  k_hm, v_hm = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  outs = []
  for start in range(0, t, chunk):
    end = min(start + chunk, t)
    outs.append(_attend(qh[:, :, :, start:end], k_hm[:, :, :end], v_hm[:, :, :end],
                        mask[:, start:end, :end], scale, "bkgtd", "bksd"))
  out = jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
