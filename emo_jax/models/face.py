"""Face Info Mining (EMO-LLaMA) and the age-gender-race (AGR) prompt.

`FaceInfoMining` turns a frozen face network's global and local features into a few face
tokens for the LLM (one cross-attention + MLP block over the features, queries learned or
taken from the Q-Former); `agr_sentences` turns the AGR predictions into sentences for the
user prompt (template and tables: `input_pipeline.contract`). The paper describes the idea but gives no code: the block's
structure, the query modes and the sentence wording are our choices, all config fields
(docs/MODEL.md, "Face Info Mining and the AGR prompt").
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.models.face_prior import FacePriors
from emo_jax.models.module import Module
from input_pipeline.contract import AGR_TEMPLATE, agr_indices, agr_sentence, agr_sentences_from_indices

QUERY_MODES = ("learned", "qformer")


@dataclasses.dataclass(frozen=True)
class FaceMiningConfig:
  """Face Info Mining sizes (our choices; see the module docstring).

  face_dim: Cf of the face priors. hidden_dim/num_heads: the cross-attention width.
  num_tokens: K face tokens per frame. out_dim: D_llm. query_mode: 'learned' | 'qformer'.
  qformer_dim: width of the Q-Former outputs (768) used when query_mode == 'qformer'.
  """
  face_dim: int = 16
  hidden_dim: int = 32
  num_heads: int = 2
  num_tokens: int = 4
  out_dim: int = 64
  mlp_ratio: int = 4
  query_mode: str = "learned"
  qformer_dim: int = 768
  layer_norm_eps: float = 1e-6

  def __post_init__(self):
    if self.query_mode not in QUERY_MODES:
      raise ValueError(f"query_mode must be one of {QUERY_MODES}, got {self.query_mode!r}")
    if self.hidden_dim % self.num_heads:
      raise ValueError(f"hidden_dim {self.hidden_dim} not divisible by num_heads {self.num_heads}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "FaceMiningConfig":
    return cls(**d)


def _linear(i: int, o: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs,
            use_bias: bool = True) -> nnx.Linear:
  return nnx.Linear(i, o, use_bias=use_bias, rngs=rngs, kernel_metadata={"out_sharding": axes})


class FaceInfoMining(Module):
  """Queries cross-attend over concat(global, local) face features -> K tokens -> D_llm."""

  def __init__(self, config: FaceMiningConfig, *, rngs: nnx.Rngs):
    self.config = config
    h = config.hidden_dim
    if config.query_mode == "learned":
      self.query_tokens = nnx.Param(
          0.02 * jax.random.normal(rngs.params(), (config.num_tokens, h), jnp.float32),
          out_sharding=(None, "face_embed"))
    else:
      self.query_proj = _linear(config.qformer_dim, h, ("qformer_embed", "face_embed"), rngs)
    self.input_proj = _linear(config.face_dim, h, (None, "face_embed"), rngs)
    self.query_layernorm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, rngs=rngs)
    self.kv_layernorm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, rngs=rngs)
    self.q_proj = _linear(h, h, ("face_embed", "heads"), rngs)
    self.k_proj = _linear(h, h, ("face_embed", "heads"), rngs)
    self.v_proj = _linear(h, h, ("face_embed", "heads"), rngs)
    self.o_proj = _linear(h, h, ("heads", "face_embed"), rngs)
    self.mlp_layernorm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, rngs=rngs)
    self.fc1 = _linear(h, h * config.mlp_ratio, ("face_embed", "mlp"), rngs)
    self.fc2 = _linear(h * config.mlp_ratio, h, ("mlp", "face_embed"), rngs)
    self.final_layernorm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, rngs=rngs)
    self.out_proj = _linear(h, config.out_dim, ("face_embed", "embed"), rngs)

  def queries(self, n: int, qformer_queries: jax.Array | None) -> jax.Array:
    """[N, K, hidden] queries for N faces."""
    cfg = self.config
    if cfg.query_mode == "learned":
      return jnp.broadcast_to(self.query_tokens[...][None], (n,) + self.query_tokens.shape)
    if qformer_queries is None:
      raise ValueError("query_mode='qformer' needs the Q-Former query outputs [N, Q, 768]")
    q = qformer_queries.shape[1]
    if q % cfg.num_tokens:
      raise ValueError(f"num_tokens {cfg.num_tokens} must divide the number of Q-Former "
                       f"queries {q}")
    grouped = qformer_queries.reshape(n, cfg.num_tokens, q // cfg.num_tokens, -1).mean(axis=2)
    return self.query_proj(grouped)

  def __call__(self, global_feats: jax.Array, local_feats: jax.Array,
               qformer_queries: jax.Array | None = None) -> jax.Array:
    """global_feats [N, G, Cf], local_feats [N, L, Cf] (+ Q-Former queries [N, Q, 768] in
    'qformer' mode) -> face tokens [N, K, out_dim]."""
    cfg = self.config
    n = global_feats.shape[0]
    feats = jnp.concatenate([global_feats, local_feats], axis=1)
    kv = self.kv_layernorm(self.input_proj(feats))
    x = self.queries(n, qformer_queries)
    heads = cfg.num_heads
    d = cfg.hidden_dim // heads
    xq = self.query_layernorm(x)
    q = self.q_proj(xq).reshape(n, -1, heads, d)
    k = self.k_proj(kv).reshape(n, -1, heads, d)
    v = self.v_proj(kv).reshape(n, -1, heads, d)
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * d ** -0.5
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    att = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, -1, cfg.hidden_dim)
    x = x + self.o_proj(att)
    x = x + self.fc2(jax.nn.gelu(self.fc1(self.mlp_layernorm(x)), approximate=False))
    return self.out_proj(self.final_layernorm(x))

  def from_priors(self, priors: FacePriors, qformer_queries: jax.Array | None = None) -> jax.Array:
    return self(priors.global_feats, priors.local_feats, qformer_queries)


def agr_sentences(priors: FacePriors, frame_mask=None, template: str = AGR_TEMPLATE,
                  media: str | Sequence[str] = "image") -> list[str]:
  """One AGR sentence per sample from FacePriors with [B, F, ...] (or [B, ...]) logits."""
  idx = agr_indices(priors.age_logits, priors.gender_logits, priors.race_logits, frame_mask)
  return agr_sentences_from_indices(idx, template, media)
