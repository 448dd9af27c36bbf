"""Cross entropy of a linear LM head, computed per chunk of positions (never the full logits).

`linear_cross_entropy(h, kernel, targets, weights)` equals

    logits = h @ kernel                          # [B, T, V], fp32
    nll = logsumexp(logits) - logits[targets]
    (sum(nll * weights), sum((logits[targets] == max(logits)) * weights))

but walks the sequence in chunks of `chunk` positions, so at most [B, chunk, V] logits exist
at a time instead of [B, T, V] (262 MB per 2048-token sample at a 32k vocabulary in fp32).

When differentiated, the gradient is formed in the same pass (our choice, as fused
"linear cross entropy" kernels do): the chunk's softmax is turned into dlogits right away and
contracted with the kernel to d(h), so neither the logits nor their gradient are stored or
recomputed, and the FLOPs are those of the unfused version (2 B T D V forward, 2 B T D V for
d(h), plus 2 B T D V for d(kernel) only when the kernel itself is differentiated, which a
frozen LoRA base is not).

The batch dimension is never reshaped, so a batch sharded over ('data', 'fsdp') stays sharded.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

# Positions per chunk. 64 at batch 4 gives [256, D] x [D, V] matmuls, which run about 10%
# faster on CPU than 32's [128, D] rows (benchmarks/bench_llama.py config), while one chunk's
# fp32 logits at a 32k vocabulary (B * 64 * V * 4 bytes = 8 MB per sample) stay small.
DEFAULT_CHUNK = 64


def linear_cross_entropy(h: jax.Array, kernel: jax.Array, targets: jax.Array,
                         weights: jax.Array, *, chunk: int = DEFAULT_CHUNK,
                         kernel_layout: str = "dv", dtype=None) -> tuple[jax.Array, jax.Array]:
  """Weighted next-token NLL sum and weighted greedy-correct count, both fp32 scalars.

  h: [B, T, D] hidden states (already final-normed); kernel: [D, V] (`kernel_layout="dv"`, an
  `nnx.Linear` kernel) or [V, D] (`"vd"`, a tied embedding table); targets: int [B, T] (any
  value where weights is 0); weights: [B, T] float (0 masks a position). The second output
  counts positions whose target has the largest logit (greedy-correct; a tie for the maximum
  counts as correct, where argmax would pick the lowest index). The matmul runs in
  `dtype` (default: h's dtype) with fp32 accumulation; softmax statistics are fp32.
  Differentiable in h and kernel (not in weights; targets are integers).
  """
  if h.ndim != 3:
    raise ValueError(f"h must be [B, T, D], got {h.shape}")
  if kernel_layout not in ("dv", "vd"):
    raise ValueError(f"kernel_layout must be 'dv' or 'vd', got {kernel_layout!r}")
  d = kernel.shape[0] if kernel_layout == "dv" else kernel.shape[1]
  if h.shape[-1] != d:
    raise ValueError(f"hidden size {h.shape[-1]} != kernel input size {d}")
  if targets.shape != h.shape[:2] or weights.shape != h.shape[:2]:
    raise ValueError(f"targets {targets.shape} and weights {weights.shape} must be "
                     f"{h.shape[:2]}")
  if chunk <= 0:
    raise ValueError(f"chunk must be positive, got {chunk}")
  dtype = jnp.dtype(dtype or h.dtype)
  fn = _make(int(chunk), kernel_layout, dtype.name)
  return fn(h, kernel, targets.astype(jnp.int32), weights.astype(jnp.float32))


def _to_chunks(x: jax.Array, chunk: int, fill) -> jax.Array:
  """[B, T, ...] -> [n, B, chunk, ...] (T padded with `fill` up to n * chunk)."""
  b, t = x.shape[:2]
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  x = x.reshape((b, n, chunk) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _from_chunks(x: jax.Array, t: int) -> jax.Array:
  """[n, B, chunk, ...] -> [B, t, ...]."""
  n, b, c = x.shape[:3]
  x = jnp.moveaxis(x, 0, 1).reshape((b, n * c) + x.shape[3:])
  return x[:, :t]


@functools.lru_cache(maxsize=None)
def _make(chunk: int, layout: str, dtype_name: str):
  dtype = jnp.dtype(dtype_name)
  logits_eq = "bcd,dv->bcv" if layout == "dv" else "bcd,vd->bcv"
  dh_eq = "bcv,dv->bcd" if layout == "dv" else "bcv,vd->bcd"
  dk_eq = "bcd,bcv->dv" if layout == "dv" else "bcd,bcv->vd"

  def chunk_stats(hc, kernel, tc, wc):
    logits = jnp.einsum(logits_eq, hc.astype(dtype), kernel.astype(dtype),
                        preferred_element_type=jnp.float32)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    lse = (m + jnp.log(s))[..., 0]
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    nll = jnp.sum((lse - picked) * wc)
    # Greedy-correct: the target's logit is the maximum (a tie counts as correct). Comparing
    # with `m` reuses the max reduction; an argmax would be a second, index-tracking pass over
    # the [B, chunk, V] logits (about 10% of this function's time on CPU).
    correct = jnp.sum((picked >= m[..., 0]) * wc)
    return nll, correct, e, s

  def scan_chunks(h, kernel, targets, weights, grad_h: bool, grad_k: bool):
    t = h.shape[1]
    xs = (_to_chunks(h, chunk, 0), _to_chunks(targets, chunk, 0),
          _to_chunks(weights, chunk, 0))
    zero = jnp.zeros((), jnp.float32)
    dk0 = jnp.zeros(kernel.shape, jnp.float32) if grad_k else None

    def body(carry, x):
      nll, correct, dk = carry
      hc, tc, wc = x
      c_nll, c_correct, e, s = chunk_stats(hc, kernel, tc, wc)
      out = None
      if grad_h or grad_k:
        vocab = jnp.arange(e.shape[-1], dtype=jnp.int32)
        dlogits = (e / s - (vocab == tc[..., None])) * wc[..., None]
        dlogits = dlogits.astype(dtype)
        if grad_h:
          out = jnp.einsum(dh_eq, dlogits, kernel.astype(dtype),
                           preferred_element_type=jnp.float32).astype(h.dtype)
        if grad_k:
          dk = dk + jnp.einsum(dk_eq, hc.astype(dtype), dlogits,
                               preferred_element_type=jnp.float32)
      return (nll + c_nll, correct + c_correct, dk), out

    (nll, correct, dk), dh = jax.lax.scan(body, (zero, zero, dk0), xs)
    if grad_h:
      dh = _from_chunks(dh, t)
    if grad_k:
      dk = dk.astype(kernel.dtype)
    return nll, correct, dh, dk

  @jax.custom_vjp
  def fn(h, kernel, targets, weights):
    nll, correct, _, _ = scan_chunks(h, kernel, targets, weights, False, False)
    return nll, correct

  def fwd(h, kernel, targets, weights):
    if weights.perturbed:
      raise ValueError("linear_cross_entropy is not differentiable in `weights`")
    nll, correct, dh, dk = scan_chunks(h.value, kernel.value, targets.value, weights.value,
                                       h.perturbed, kernel.perturbed)
    return (nll, correct), (dh, dk)

  def bwd(res, g):
    dh, dk = res
    g_nll = g[0]
    if isinstance(g_nll, SymbolicZero):
      g_nll = jnp.zeros((), jnp.float32)
    out_h = None if dh is None else (dh * g_nll.astype(dh.dtype))
    out_k = None if dk is None else (dk * g_nll.astype(dk.dtype))
    return out_h, out_k, None, None

  fn.defvjp(fwd, bwd, symbolic_zeros=True)
  return fn
