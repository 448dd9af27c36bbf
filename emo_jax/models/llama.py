"""LLaMA decoder (LLaMA-1/2/3, Vicuna, ...) in Flax NNX with HF-mirroring parameter names.

Pre-norm RMSNorm blocks, rotate-half RoPE, SwiGLU MLP, grouped-query attention, as HF
`LlamaForCausalLM`. `dtype` is the compute dtype and `param_dtype` the storage dtype; norms,
softmax and logits run in fp32; layers can be scanned (`scan_layers`) and rematerialised;
the KV cache is a plain dict pytree (`init_cache`). Facts vs our choices: docs/MODEL.md, "LLM".

Parameter layout: nnx.Linear kernels are [in, out] (HF weights transposed), `embed_tokens` is an
`nnx.Embed` with `embedding` [vocab, hidden], RMSNorm scales are called `weight`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax.dtypes import to_dtype
from emo_jax.models.layers import (DEFAULT_CHUNK, RMSNorm, apply_rotary,
                                   chunked_causal_attention, dot_product_attention,
                                   linear_cross_entropy,
                                   make_attention_mask, rope_cos_sin, rope_inv_freq)
from emo_jax.models.layers import activations
from emo_jax.models.layers.rotary import rope_type
from emo_jax.models.module import Module
from emo_jax.sharding import constrain

Cache = dict[str, jax.Array]

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a LLaMA-family decoder (HF field names)."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] | None = None  # None | {'rope_type': 'linear'|'dynamic'|'llama3', ...}
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"   # the MLP's gate activation (transformers' ACT2FN names)
  initializer_range: float = 0.02
  bos_token_id: int | None = 1
  eos_token_id: int | list[int] | None = 2
  pad_token_id: int | None = None
  # emo_jax-only fields (not in HF config.json).
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat_policy: str = "none"
  # Without a cache, attend per block of this many queries to the keys up to the block's end
  # (skips the masked upper triangle; 0 = one block). Exact, a speed choice only.
  attention_chunk: int = 128

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}")
    activations.get(self.hidden_act)   # refuses an unsupported name
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
    if self.rope_scaling is not None:
      scaling = dict(self.rope_scaling)
      rope_type(scaling)
      rope_inv_freq(self.head_dim, self.rope_theta, scaling)  # validates the type early
      object.__setattr__(self, "rope_scaling", _FrozenDict(scaling))
    object.__setattr__(self, "dtype", to_dtype(self.dtype))
    object.__setattr__(self, "param_dtype", to_dtype(self.param_dtype))

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], **overrides) -> "LlamaConfig":
    """Read an HF config.json dict: transformers-5 `rope_parameters` or legacy top-level
    `rope_theta` / `rope_scaling` (with `type` or `rope_type`)."""
    d = dict(d)
    # LLaMA-VID / LLaVA checkpoints keep a llama body under other model types: accept any
    # config that has the llama fields, refuse the rest clearly.
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f"not a LLaMA config (model_type={d.get('model_type')!r}): "
                       f"missing {missing}")
    check_hf_fields(d)
    theta = d.get("rope_theta")
    scaling = d.get("rope_scaling")
    params = d.get("rope_parameters")
    if isinstance(params, Mapping):
      params = dict(params)
      theta = params.pop("rope_theta", theta)
      if params.get("rope_type", params.get("type", "default")) not in (None, "default"):
        scaling = params
    if isinstance(scaling, Mapping):
      scaling = dict(scaling)
      kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
      scaling.pop("type", None)
      scaling.pop("rope_theta", None)
      scaling = None if kind == "default" else {"rope_type": kind, **scaling}
    field_names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in field_names and k not in _EMO_ONLY_FIELDS}
    kw["rope_theta"] = float(theta if theta is not None else 10000.0)
    kw["rope_scaling"] = scaling
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict[str, Any]:
    """config.json for transformers (writes both `rope_parameters` and the legacy keys)."""
    rope_params = {"rope_type": "default", "rope_theta": self.rope_theta}
    legacy_scaling = None
    if self.rope_scaling:
      rope_params = {**dict(self.rope_scaling), "rope_theta": self.rope_theta}
      legacy_scaling = {**dict(self.rope_scaling)}
      legacy_scaling["type"] = legacy_scaling["rope_type"]
    return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_hidden_layers,
      "num_attention_heads": self.num_attention_heads,
      "num_key_value_heads": self.num_key_value_heads,
      "head_dim": self.head_dim,
      "hidden_act": self.hidden_act,
      "rms_norm_eps": self.rms_norm_eps,
      "rope_theta": self.rope_theta,
      "rope_scaling": legacy_scaling,
      "rope_parameters": rope_params,
      "max_position_embeddings": self.max_position_embeddings,
      "tie_word_embeddings": self.tie_word_embeddings,
      "attention_bias": self.attention_bias,
      "attention_dropout": 0.0,
      "mlp_bias": self.mlp_bias,
      "initializer_range": self.initializer_range,
      "bos_token_id": self.bos_token_id,
      "eos_token_id": self.eos_token_id,
      "pad_token_id": self.pad_token_id,
      "torch_dtype": jnp.dtype(self.param_dtype).name,
      "use_cache": True,
    }


# HF config.json fields that change what a LLaMA-family model computes but that this
# implementation does not have, with the values that mean "off". Another value is refused.
_UNSUPPORTED_HF_FIELDS = {
    "attention_dropout": (0, 0.0, None), "hidden_dropout": (0, 0.0, None),
    "sliding_window": (None,), "use_sliding_window": (False, None),
    "embedding_multiplier": (1, 1.0, None), "residual_multiplier": (1, 1.0, None),
    "attention_multiplier": (None,), "logits_scaling": (1, 1.0, None),
    "logit_scale": (1, 1.0, None), "final_logit_softcapping": (None,),
    "attn_logit_softcapping": (None,), "query_pre_attn_scalar": (None,),
    "partial_rotary_factor": (1, 1.0, None), "qk_layernorm": (False, None),
    "use_qk_norm": (False, None), "no_rope_layers": (None,),
}
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim",
               "max_position_embeddings")
_FLOAT_FIELDS = ("rms_norm_eps", "rope_theta")
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias")


def check_hf_fields(d: Mapping[str, Any]) -> None:
  """ValueError naming the first field of an HF config dict that has the wrong type or a
  value this implementation cannot compute (see _UNSUPPORTED_HF_FIELDS, `hidden_act`)."""
  for k in _INT_FIELDS:
    v = d.get(k)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
      raise ValueError(f"field {k!r} must be a positive integer, got {v!r}")
  for k in _FLOAT_FIELDS:
    v = d.get(k)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
      raise ValueError(f"field {k!r} must be a number, got {v!r}")
  for k in _BOOL_FIELDS:
    v = d.get(k)
    if v is not None and not isinstance(v, bool):
      raise ValueError(f"field {k!r} must be true or false, got {v!r}")
  act = d.get("hidden_act", "silu")
  if not isinstance(act, str) or act not in activations.ACT2FN:
    raise ValueError(f"field 'hidden_act' = {act!r} is not supported; supported: "
                     f"{sorted(activations.ACT2FN)}")
  for k, neutral in _UNSUPPORTED_HF_FIELDS.items():
    if k in d and d[k] not in neutral:
      raise ValueError(f"field {k!r} = {d[k]!r} changes the computation and is not "
                       "supported by this LLaMA implementation")
  for k in ("rope_scaling", "rope_parameters"):
    if d.get(k) is not None and not isinstance(d[k], Mapping):
      raise ValueError(f"field {k!r} must be an object or null, got {d[k]!r}")


_EMO_ONLY_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_chunk")


class _FrozenDict(dict):
  """Hashable dict for the rope_scaling field (so configs can be static jit arguments)."""

  def __hash__(self):  # type: ignore[override]
    return hash(tuple(sorted((k, repr(v)) for k, v in self.items())))

  def __setitem__(self, *a):
    raise TypeError("rope_scaling is immutable")


def _linear(cfg: LlamaConfig, d_in: int, d_out: int, names: tuple[str, str], bias: bool,
            rngs: nnx.Rngs, **kw) -> nnx.Linear:
  init = nnx.initializers.normal(cfg.initializer_range)
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=nnx.with_partitioning(init, names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]),
                    rngs=rngs, **kw)


class LlamaAttention(Module):
  """Multi-head / grouped-query self-attention with RoPE (HF `LlamaAttention` names)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.num_heads = cfg.num_attention_heads
    self.num_kv_heads = cfg.num_key_value_heads
    self.head_dim = cfg.head_dim
    self.attention_chunk = cfg.attention_chunk
    d, hq, hkv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, (
      cfg.num_key_value_heads * cfg.head_dim)
    self.q_proj = _linear(cfg, d, hq, ("embed", "heads"), cfg.attention_bias, rngs)
    self.k_proj = _linear(cfg, d, hkv, ("embed", "kv_heads"), cfg.attention_bias, rngs)
    self.v_proj = _linear(cfg, d, hkv, ("embed", "kv_heads"), cfg.attention_bias, rngs)
    self.o_proj = _linear(cfg, hq, d, ("heads", "embed"), cfg.attention_bias, rngs)

  def __call__(self, x, cos, sin, mask, kv=None, index=None, layer_idx=None):
    """x [B, T, D]; mask bool [B, T, S]; kv: optional (k, v) cache [B, K, S, d] (heads-major)
    written at slot `index` (or the whole stack [L, B, K, S, d] with this layer's `layer_idx`,
    updated in place). Returns (out [B, T, D], new (k, v) or None)."""
    b, t, _ = x.shape
    q = constrain(self.q_proj(x), ("batch", "length", "heads"))
    k = constrain(self.k_proj(x), ("batch", "length", "kv_heads"))
    v = constrain(self.v_proj(x), ("batch", "length", "kv_heads"))
    q = apply_rotary(q.reshape(b, t, self.num_heads, self.head_dim), cos, sin)
    k = apply_rotary(k.reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    new_kv = None
    if kv is not None:
      ck, cv = kv
      # The new keys/values are transposed to heads-major ([B, K, t, d], small); the cache
      # itself is then read by both attention contractions in place.
      k = jnp.swapaxes(k, 1, 2)
      v = jnp.swapaxes(v, 1, 2)
      if layer_idx is None:
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, index, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, index, 0))
        k, v = ck.astype(q.dtype), cv.astype(q.dtype)
      else:
        at = (layer_idx, 0, 0, index, 0)
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), at)
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), at)
        k, v = ck[layer_idx].astype(q.dtype), cv[layer_idx].astype(q.dtype)
      new_kv = (ck, cv)
      out = dot_product_attention(q, k, v, mask, kv_layout="bksd")
    else:
      out = chunked_causal_attention(q, k, v, mask, chunk=self.attention_chunk)
    out = constrain(out.reshape(b, t, self.num_heads * self.head_dim), ("batch", "length", "heads"))
    return self.o_proj(out), new_kv


class LlamaMLP(Module):
  """Gated feed-forward: down_proj(act(gate_proj(x)) * up_proj(x)), act = `hidden_act`
  (SiLU: SwiGLU, LLaMA's own)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _linear(cfg, d, f, ("embed", "mlp"), cfg.mlp_bias, rngs)
    self.up_proj = _linear(cfg, d, f, ("embed", "mlp"), cfg.mlp_bias, rngs)
    self.down_proj = _linear(cfg, f, d, ("mlp", "embed"), cfg.mlp_bias, rngs)
    self.act = activations.get(cfg.hidden_act)

  def __call__(self, x):
    h = self.act(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(constrain(h, ("batch", "length", "mlp")))


class LlamaDecoderLayer(Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.dtype,
                                   param_dtype=cfg.param_dtype)
    self.self_attn = LlamaAttention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                            dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.mlp = LlamaMLP(cfg, rngs=rngs)

  def __call__(self, h, cos, sin, mask, kv=None, index=None, layer_idx=None):
    attn, new_kv = self.self_attn(self.input_layernorm(h), cos, sin, mask, kv, index, layer_idx)
    h = constrain(h + attn, ("batch", "length", "embed"))
    h = h + self.mlp(self.post_attention_layernorm(h))
    return constrain(h, ("batch", "length", "embed")), new_kv


def _remat_policy(name: str):
  return {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[name]


class LlamaModel(Module):
  """Embeddings + decoder stack + final norm (HF `LlamaModel`, path prefix `model.`)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embed_tokens = nnx.Embed(
      cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      embedding_init=nnx.with_partitioning(nnx.initializers.normal(cfg.initializer_range),
                                           ("vocab", "embed")),
      rngs=rngs)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_hidden_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make(r):
        return LlamaDecoderLayer(cfg, rngs=r)
      self.layers = make(rngs)
    else:
      self.layers = nnx.List([LlamaDecoderLayer(cfg, rngs=rngs)
                              for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype)

  def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None,
               position_ids=None, cache: Cache | None = None):
    cfg = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is None:
      if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
      h = self.embed_tokens(input_ids.astype(jnp.int32))
    else:
      if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
        raise ValueError(f"inputs_embeds must be [B, T, {cfg.hidden_size}], got "
                         f"{inputs_embeds.shape}")
      h = inputs_embeds.astype(cfg.dtype)
    h = constrain(h, ("batch", "length", "embed"))
    b, t = h.shape[:2]
    mask = (jnp.ones((b, t), jnp.int32) if attention_mask is None
            else attention_mask.astype(jnp.int32))
    if mask.shape != (b, t):
      raise ValueError(f"attention_mask shape {mask.shape} != {(b, t)}")

    if cache is None:
      start = jnp.zeros((b,), jnp.int32)
      index = None
      key_valid = mask
      num_keys = t
      query_slots = jnp.arange(t)
    else:
      start = cache["positions"]
      index = cache["index"]
      key_valid = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, index))
      num_keys = key_valid.shape[1]
      query_slots = index + jnp.arange(t)
    if position_ids is None:
      position_ids = jnp.maximum(start[:, None] + jnp.cumsum(mask, axis=1) - 1, 0)
      next_positions = start + jnp.sum(mask, axis=1)
    else:
      next_positions = position_ids[:, -1].astype(jnp.int32) + 1
    position_ids = position_ids.astype(jnp.int32)
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    cos, sin = rope_cos_sin(position_ids, inv_freq, head_dim=cfg.head_dim,
                            theta=cfg.rope_theta, scaling=cfg.rope_scaling,
                            max_position_embeddings=cfg.max_position_embeddings)
    attn_mask = make_attention_mask(key_valid, query_slots, num_keys)

    kv = None if cache is None else (cache["k"], cache["v"])
    h, new_kv = self._run_layers(h, cos, sin, attn_mask, kv, index)
    h = self.norm(h)
    if cache is None:
      return h, None
    new_cache = {
      "k": new_kv[0], "v": new_kv[1], "index": index + t, "mask": key_valid,
      "positions": next_positions,
    }
    return h, new_cache

  def _run_layers(self, h, cos, sin, mask, kv, index):
    cfg = self.config
    policy = None if cfg.remat_policy == "none" else _remat_policy(cfg.remat_policy)
    if cfg.scan_layers:
      # Parameters are stacked along the scanned axis; other state (the RNG streams of LoRA
      # dropout, shared by all layers) is threaded through the loop as carry, so each layer
      # draws fresh dropout masks and the stream advances as in the unscanned model.
      graphdef, params, rest = nnx.split(self.layers, nnx.Param, ...)

      def body(carry, xs):
        h, rest = carry
        layer_params, layer_kv = xs
        layer = nnx.merge(graphdef, layer_params, rest)
        out, new_kv = layer(h, cos, sin, mask, layer_kv, index)
        return (out, nnx.split(layer, nnx.Param, ...)[2]), new_kv

      if policy is not None:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
      (h, rest), new_kv = jax.lax.scan(body, (h, rest), (params, kv))
      if jax.tree.leaves(rest):
        nnx.update(self.layers, rest)
      return h, new_kv

    def call(layer, h, kv, i):
      return layer(h, cos, sin, mask, kv, index, i)
    if policy is not None:
      call = nnx.remat(call, policy=policy, prevent_cse=True, static_argnums=(3,))
    for i, layer in enumerate(self.layers):
      # The stacked cache goes through every layer and is updated in place (no re-stacking).
      h, kv = call(layer, h, kv, None if kv is None else i)
    return h, kv


class LlamaForCausalLM(Module):
  """Decoder + LM head (HF `LlamaForCausalLM`). Logits are returned in fp32."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.model = LlamaModel(config, rngs=rngs)
    if not config.tie_word_embeddings:
      self.lm_head = _linear(config, config.hidden_size, config.vocab_size, ("embed", "vocab"),
                             False, rngs, preferred_element_type=jnp.float32)
    else:
      self.lm_head = None

  def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None,
               position_ids=None, cache: Cache | None = None, return_hidden: bool = False,
               logits_to_keep: int = 0):
    """Returns fp32 logits [B, T, V] (`cache is None`) or `(logits, new_cache)`.

    `logits_to_keep=n > 0` computes the logits of the last n positions only ([B, n, V], HF's
    argument of the same name): a prefill needs just the last one.

    With `return_hidden=True` the final-normed hidden states [B, T, D] are appended to the
    output tuple: `(logits, hidden)` or `(logits, new_cache, hidden)`. Logits at masked
    positions are meaningless.
    """
    h, new_cache = self.model(input_ids, inputs_embeds=inputs_embeds,
                              attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache)
    logits = self.logits(h[:, -logits_to_keep:] if logits_to_keep else h)
    out = (logits,) if cache is None else (logits, new_cache)
    if return_hidden:
      out = out + (h,)
    return out[0] if len(out) == 1 else out

  def logits(self, h: jax.Array) -> jax.Array:
    """fp32 logits from final hidden states [..., D]."""
    if self.lm_head is None:
      w = self.model.embed_tokens.embedding[...].astype(self.config.dtype)
      logits = jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
    else:
      logits = self.lm_head(h)
    logits = logits.astype(jnp.float32)
    return constrain(logits, ("batch", "length", "vocab")) if logits.ndim == 3 else logits

  def cross_entropy(self, h: jax.Array, targets: jax.Array, weights: jax.Array, *,
                    chunk: int = DEFAULT_CHUNK) -> tuple[jax.Array, jax.Array]:
    """(weighted NLL sum, weighted greedy-correct count) of `targets` [B, T] under the logits
    of hidden states `h` [B, T, D], without materialising [B, T, V] logits
    (`layers.linear_cross_entropy`, `chunk` positions at a time). Alignment is the caller's:
    for next-token prediction pass h[:, :-1] and ids[:, 1:]. An LM head carrying a LoRA
    adapter takes the unfused path (full logits)."""
    if self.lm_head is None:
      kernel, layout = self.model.embed_tokens.embedding[...], "vd"
    elif type(self.lm_head) is nnx.Linear:
      kernel, layout = self.lm_head.kernel[...], "dv"
    else:
      logits = self.logits(h)
      lse = jax.nn.logsumexp(logits, axis=-1)
      picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
      w = weights.astype(jnp.float32)
      correct = jnp.sum((picked >= jnp.max(logits, axis=-1)) * w)
      return jnp.sum((lse - picked) * w), correct
    return linear_cross_entropy(h, kernel, targets, weights, chunk=chunk, kernel_layout=layout,
                                dtype=self.config.dtype or h.dtype)

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Cache:
    return init_cache(self.config, batch, max_len, dtype)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
  """An empty KV cache: k/v [layers, B, kv_heads, max_len, head_dim] (heads-major, so decode
  attention reads it without a per-step transpose), the write `index` (scalar), the valid-slot
  `mask` [B, max_len] and each row's next position id [B]."""
  dtype = cfg.dtype if dtype is None else to_dtype(dtype)
  shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
  return {
    "k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
    "index": jnp.zeros((), jnp.int32), "mask": jnp.zeros((batch, max_len), jnp.int32),
    "positions": jnp.zeros((batch,), jnp.int32),
  }
