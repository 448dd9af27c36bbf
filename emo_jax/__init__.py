"""emo_jax: EMO-LLaMA (LLaMA-VID + Face Info Mining) in JAX / Flax NNX."""

from flax import nnx as _nnx

# Weights carry logical axis names as metadata; placement happens explicitly through
# emo_jax.sharding (jit with out_shardings), never eagerly at module construction.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
