"""Shared building blocks (RMSNorm, rotary embeddings, attention, LM-head cross entropy) for
the emo_jax models."""
from emo_jax.models.layers.attention import (chunked_causal_attention, dot_product_attention,
                                             make_attention_mask)
from emo_jax.models.layers.cross_entropy import DEFAULT_CHUNK, linear_cross_entropy
from emo_jax.models.layers.norms import RMSNorm
from emo_jax.models.layers.rotary import apply_rotary, rope_cos_sin, rope_inv_freq

__all__ = [
  "DEFAULT_CHUNK", "RMSNorm", "apply_rotary", "chunked_causal_attention", "dot_product_attention",
  "linear_cross_entropy", "make_attention_mask", "rope_cos_sin", "rope_inv_freq",
]
