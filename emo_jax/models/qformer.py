"""InstructBLIP Q-Former (BERT layers with query-only cross-attention), Flax NNX.

Learned queries are prepended to the text; every layer self-attends over [queries; text],
every `cross_attention_frequency`-th layer the query slice cross-attends to the vision tokens,
and the query and text slices have separate feed-forwards. The output is the query slice
`[B, Q, H]`. Parameter names follow the BERT / LAVIS layout of LLaMA-VID checkpoints; the
converter (emo_jax/convert/vision_hf.py) also maps HF InstructBLIP's spellings.
Facts and our choices: docs/MODEL.md, "Q-Former"; key layouts: docs/CHECKPOINTS.md.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax.models.layers import activations
from emo_jax.models.module import Module

Dtype = Any

_ACTIVATIONS = activations.ACT2FN   # transformers' hidden_act names


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """Q-Former hyper-parameters; defaults are InstructBLIP / LLaMA-VID (BERT-base)."""
  vocab_size: int = 30522  # LLaMA-VID adds one token: 30523
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  layer_norm_eps: float = 1e-12
  cross_attention_frequency: int = 2
  encoder_hidden_size: int = 1408
  num_query_tokens: int = 32
  pad_token_id: int = 0
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.cross_attention_frequency < 1:
      raise ValueError("cross_attention_frequency must be >= 1")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"unknown hidden_act {self.hidden_act!r}; known: {sorted(_ACTIVATIONS)}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def has_cross_attention(self, layer_idx: int) -> bool:
    return layer_idx % self.cross_attention_frequency == 0

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], **overrides) -> "QFormerConfig":
    """From an HF `InstructBlipQFormerConfig` dict, or a full `InstructBlipConfig` dict
    (then `qformer_config` and the top-level `num_query_tokens` are read)."""
    num_query = overrides.pop("num_query_tokens", None)
    if "qformer_config" in d:
      num_query = num_query or d.get("num_query_tokens")
      d = d["qformer_config"]
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "hidden_act", "max_position_embeddings", "layer_norm_eps",
            "cross_attention_frequency", "encoder_hidden_size", "pad_token_id")
    kw = {k: d[k] for k in keys if k in d and d[k] is not None}
    if num_query is not None:
      kw["num_query_tokens"] = int(num_query)
    kw.update(overrides)
    return cls(**kw)


def _linear(cfg: QFormerConfig, din: int, dout: int, axes: tuple, *,
            rngs: nnx.Rngs) -> nnx.Linear:
  bias_axes = (axes[1] if axes[1] in ("heads", "qformer_mlp") else "norm",)
  return nnx.Linear(din, dout, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=nnx.initializers.normal(0.02),
                    kernel_metadata={"out_sharding": axes},
                    bias_metadata={"out_sharding": bias_axes}, rngs=rngs)


def _layer_norm(cfg: QFormerConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                       param_dtype=cfg.param_dtype, use_fast_variance=False,
                       scale_metadata={"out_sharding": ("norm",)},
                       bias_metadata={"out_sharding": ("norm",)}, rngs=rngs)


def _mask_bias(mask: jax.Array | None) -> jax.Array | None:
  """[B, K] 0/1 key mask -> additive fp32 bias [B, 1, 1, K] (masked keys get -inf-ish)."""
  if mask is None:
    return None
  return jnp.where(mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]


class QFormerMultiHeadAttention(Module):
  """Scaled dot-product attention; keys/values from `kv` (encoder width for cross-attn)."""

  def __init__(self, cfg: QFormerConfig, *, is_cross_attention: bool, rngs: nnx.Rngs):
    self.cfg = cfg
    h = cfg.hidden_size
    kv_in, kv_axis = ((cfg.encoder_hidden_size, "vit_embed") if is_cross_attention
                      else (h, "qformer_embed"))
    self.query = _linear(cfg, h, h, ("qformer_embed", "heads"), rngs=rngs)
    self.key = _linear(cfg, kv_in, h, (kv_axis, "heads"), rngs=rngs)
    self.value = _linear(cfg, kv_in, h, (kv_axis, "heads"), rngs=rngs)

  def __call__(self, x: jax.Array, kv: jax.Array, bias: jax.Array | None) -> jax.Array:
    cfg = self.cfg
    b, tq, _ = x.shape
    tk = kv.shape[1]
    nh, hd = cfg.num_attention_heads, cfg.head_dim
    q = self.query(x).reshape(b, tq, nh, hd)
    k = self.key(kv.astype(cfg.dtype)).reshape(b, tk, nh, hd)
    v = self.value(kv.astype(cfg.dtype)).reshape(b, tk, nh, hd)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * (hd ** -0.5), k,
                        preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, tq, nh * hd)


class QFormerSelfOutput(Module):
  """BERT post-LN residual: LayerNorm(dense(h) + input)."""

  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
    self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, ("heads", "qformer_embed"),
                         rngs=rngs)
    self.LayerNorm = _layer_norm(cfg, rngs=rngs)  # pylint: disable=invalid-name

  def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
    return self.LayerNorm(self.dense(h) + residual).astype(h.dtype)


class QFormerAttention(Module):
  """`self` (multi-head attention, BERT's attribute name) + `output`."""

  def __init__(self, cfg: QFormerConfig, *, is_cross_attention: bool = False,
               rngs: nnx.Rngs):
    setattr(self, "self", QFormerMultiHeadAttention(
        cfg, is_cross_attention=is_cross_attention, rngs=rngs))
    self.output = QFormerSelfOutput(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, kv: jax.Array | None = None,
               bias: jax.Array | None = None) -> jax.Array:
    attn = getattr(self, "self")
    return self.output(attn(x, x if kv is None else kv, bias), x)


class QFormerIntermediate(Module):

  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
    self.act = _ACTIVATIONS[cfg.hidden_act]
    self.dense = _linear(cfg, cfg.hidden_size, cfg.intermediate_size,
                         ("qformer_embed", "qformer_mlp"), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.act(self.dense(x))


class QFormerOutput(Module):

  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
    self.dense = _linear(cfg, cfg.intermediate_size, cfg.hidden_size,
                         ("qformer_mlp", "qformer_embed"), rngs=rngs)
    self.LayerNorm = _layer_norm(cfg, rngs=rngs)  # pylint: disable=invalid-name

  def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
    return self.LayerNorm(self.dense(h) + residual).astype(h.dtype)


class QFormerLayer(Module):
  """Self-attn over [queries; text]; query-only cross-attn (some layers); split FFNs."""

  def __init__(self, cfg: QFormerConfig, layer_idx: int, *, rngs: nnx.Rngs):
    self.has_cross_attention = cfg.has_cross_attention(layer_idx)
    self.attention = QFormerAttention(cfg, rngs=rngs)
    if self.has_cross_attention:
      self.crossattention = QFormerAttention(cfg, is_cross_attention=True, rngs=rngs)
    self.intermediate = QFormerIntermediate(cfg, rngs=rngs)
    self.output = QFormerOutput(cfg, rngs=rngs)
    self.intermediate_query = QFormerIntermediate(cfg, rngs=rngs)
    self.output_query = QFormerOutput(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, self_bias: jax.Array | None,
               enc: jax.Array | None, enc_bias: jax.Array | None,
               query_length: int) -> jax.Array:
    h = self.attention(x, bias=self_bias)
    parts = []
    if query_length > 0:
      hq = h[:, :query_length]
      if self.has_cross_attention:
        if enc is None:
          raise ValueError("encoder_hidden_states must be given: this layer has cross-attention")
        hq = self.crossattention(hq, enc, enc_bias)
      parts.append(self.output_query(self.intermediate_query(hq), hq))
    if h.shape[1] > query_length:
      ht = h[:, query_length:]
      parts.append(self.output(self.intermediate(ht), ht))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


class QFormerEmbeddings(Module):
  """word + position embeddings of the text, queries prepended, then LayerNorm."""

  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(0.02)
    self.word_embeddings = nnx.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=init, embedding_metadata={"out_sharding": ("vocab", "qformer_embed")},
        rngs=rngs)
    self.position_embeddings = nnx.Embed(
        cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, embedding_init=init,
        embedding_metadata={"out_sharding": (None, "qformer_embed")}, rngs=rngs)
    self.LayerNorm = _layer_norm(cfg, rngs=rngs)  # pylint: disable=invalid-name

  def __call__(self, input_ids: jax.Array | None,
               query_embeds: jax.Array | None) -> jax.Array:
    cfg = self.cfg
    parts = []
    if query_embeds is not None:
      parts.append(query_embeds.astype(cfg.dtype))
    if input_ids is not None:
      t = input_ids.shape[1]
      if t > cfg.max_position_embeddings:
        raise ValueError(f"text length {t} exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
      pos = self.position_embeddings.embedding[...][:t].astype(cfg.dtype)
      parts.append(self.word_embeddings(input_ids) + pos[None])
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return self.LayerNorm(x).astype(cfg.dtype)


class QFormerEncoder(Module):

  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.layer = nnx.List([QFormerLayer(cfg, i, rngs=rngs)
                           for i in range(cfg.num_hidden_layers)])

  def __call__(self, x, self_bias, enc, enc_bias, query_length: int) -> jax.Array:
    def apply(layer, h, sb, e, eb):
      return layer(h, sb, e, eb, query_length)

    if self.cfg.remat:
      apply = nnx.remat(apply)
    for layer in self.layer:
      x = apply(layer, x, self_bias, enc, enc_bias)
    return x


class QFormerModel(Module):
  """The Q-Former proper (HF `InstructBlipQFormerModel` semantics).

  `__call__(query_embeds [B, Q, H] | None, input_ids [B, T] | None, attention_mask
  [B, Q+T] or [B, T] (then the queries count as unmasked) | None, encoder_hidden_states
  [B, N, Cv] | None, encoder_attention_mask [B, N] | None)` returns the query outputs
  `[B, Q, H]`; with `query_embeds=None` (text only, no cross-attention) the text
  hidden states `[B, T, H]`.
  """

  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = QFormerEmbeddings(cfg, rngs=rngs)
    self.encoder = QFormerEncoder(cfg, rngs=rngs)

  def __call__(self, query_embeds: jax.Array | None, input_ids: jax.Array | None,
               attention_mask: jax.Array | None, encoder_hidden_states: jax.Array | None,
               encoder_attention_mask: jax.Array | None = None) -> jax.Array:
    if query_embeds is None and input_ids is None:
      raise ValueError("give query_embeds, input_ids, or both")
    q = 0 if query_embeds is None else query_embeds.shape[1]
    t = 0 if input_ids is None else input_ids.shape[1]
    b = (query_embeds if query_embeds is not None else input_ids).shape[0]
    if query_embeds is not None and query_embeds.shape[-1] != self.cfg.hidden_size:
      raise ValueError(f"query_embeds width {query_embeds.shape[-1]} != hidden_size "
                       f"{self.cfg.hidden_size}")
    if attention_mask is not None:
      if q > 0 and attention_mask.shape == (b, t):
        attention_mask = jnp.concatenate(
            [jnp.ones((b, q), attention_mask.dtype), attention_mask], axis=1)
      if attention_mask.shape != (b, q + t):
        raise ValueError(f"attention_mask must be [B, Q+T]={b, q + t} or [B, T]={b, t}, "
                         f"got {attention_mask.shape}")
    x = self.embeddings(input_ids, query_embeds)
    out = self.encoder(x, _mask_bias(attention_mask), encoder_hidden_states,
                       _mask_bias(encoder_attention_mask), q)
    return out[:, :q] if q > 0 else out


class InstructBlipQFormer(Module):
  """Q-Former plus its learned `query_tokens` [1, Q, H] (held by the parent model in HF).

  `__call__(query_embeds | None, input_ids, attention_mask, encoder_hidden_states,
  encoder_attention_mask=None) -> [B, Q, H]`: with `query_embeds=None` the learned
  query tokens are broadcast over the batch (what InstructBLIP / LLaMA-VID do);
  given explicitly, the result equals HF `InstructBlipQFormerModel` on those inputs.
  """

  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.query_tokens = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (1, cfg.num_query_tokens, cfg.hidden_size),
                                      cfg.param_dtype),
        out_sharding=(None, None, "qformer_embed"))
    self.qformer = QFormerModel(cfg, rngs=rngs)

  def __call__(self, query_embeds: jax.Array | None, input_ids: jax.Array | None,
               attention_mask: jax.Array | None, encoder_hidden_states: jax.Array,
               encoder_attention_mask: jax.Array | None = None) -> jax.Array:
    if query_embeds is None:
      b = encoder_hidden_states.shape[0]
      qt = self.query_tokens[...]
      query_embeds = jnp.broadcast_to(qt, (b,) + qt.shape[1:])
    return self.qformer(query_embeds, input_ids, attention_mask, encoder_hidden_states,
                        encoder_attention_mask)
