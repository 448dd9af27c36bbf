"""RMSNorm (Zhang & Sennrich 2019), as used by LLaMA; computed in fp32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax.models.module import Module


class RMSNorm(Module):
  """y = weight * x / sqrt(mean(x^2) + eps).

  The parameter is called `weight` (HF name, ones-initialised) and carries the
  logical axis `norm` (replicated). Statistics are always computed in fp32 (our
  choice, as HF does); the result is cast to `dtype` (default: the input dtype).
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init
    self.eps = eps
    self.dtype = dtype
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    out_dtype = self.dtype or x.dtype
    xf = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    normed = xf * jax.lax.rsqrt(var + self.eps)
    return (self.weight[...].astype(jnp.float32) * normed).astype(out_dtype)
