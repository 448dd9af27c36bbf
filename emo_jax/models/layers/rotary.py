"""Rotary position embeddings (RoPE, Su et al. 2021) in the rotate-half layout of HF LLaMA.

Frequency schedules (facts from the respective releases):
- `default`: inv_freq[i] = theta^(-2i/d).
- `linear` (position interpolation, Chen et al. 2023): inv_freq / factor.
- `dynamic` (dynamic NTK): theta is enlarged once the sequence is longer than the original
  context: theta' = theta * (factor * L / L0 - (factor - 1))^(d / (d - 2)). Here L is the
  largest position in the current call + 1 (our functional choice; HF keeps a running max).
- `llama3`: wavelength-dependent interpolation with low/high frequency factors.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None,
                  ) -> np.ndarray:
  """Static inverse frequencies [head_dim // 2] (fp32) for `default`, `linear`, `llama3`.

  `dynamic` returns the unscaled frequencies; the model rescales them per call.
  """
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
  inv = inv.astype(np.float32)
  kind = rope_type(scaling)
  if kind in ("default", "dynamic"):
    return inv
  if kind == "linear":
    return (inv / np.float32(scaling["factor"])).astype(np.float32)
  if kind == "llama3":
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise ValueError(f"unsupported rope scaling type {kind!r} (supported: none, linear, dynamic, "
                   "llama3)")


def rope_type(scaling: Mapping[str, Any] | None) -> str:
  if not scaling:
    return "default"
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  return "default" if kind in (None, "default") else str(kind)


def rope_cos_sin(position_ids: jax.Array, inv_freq: np.ndarray, *, head_dim: int, theta: float,
                 scaling: Mapping[str, Any] | None = None, max_position_embeddings: int = 2048,
                 ) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [B, T, head_dim] in fp32 for integer `position_ids` [B, T]."""
  inv = jnp.asarray(inv_freq, jnp.float32)
  if rope_type(scaling) == "dynamic":
    factor = float(scaling["factor"])
    orig = float(scaling.get("original_max_position_embeddings", max_position_embeddings))
    seq_len = jnp.maximum(jnp.max(position_ids).astype(jnp.float32) + 1.0, orig)
    base = theta * (factor * seq_len / orig - (factor - 1.0)) ** (head_dim / (head_dim - 2))
    inv = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = position_ids.astype(jnp.float32)[..., None] * inv  # [B, T, d/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE. x: [B, T, N, d]; cos/sin: [B, T, d] (fp32). Returns x's dtype."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)
