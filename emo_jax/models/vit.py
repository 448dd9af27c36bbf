"""Vision Transformer covering CLIP ViT (HF `CLIPVisionModel`) and EVA-ViT-G (LAVIS).

`VisionConfig.kind` selects the flavour: `'clip'` (HF layout; `__call__` returns HF's
`last_hidden_state` for `feature_layer=-1`) or `'eva'` (EVA-ViT-G as LAVIS builds it and
LLaMA-VID uses it). Parameter names mirror HF CLIP for both, so the HF and LAVIS checkpoints
import through one mapping table (emo_jax/convert/vision_hf.py, emo_jax/convert/eva.py).
`feature_layer` indexes HF's `hidden_states` tuple and only the blocks it needs are built;
position embeddings are interpolated when the input size differs from `image_size`.
Pixels are NHWC `[N, H, W, 3]`, frames folded into the batch by the caller.
Facts and our choices per flavour: docs/MODEL.md, "Visual encoder".
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.models.layers import activations
from emo_jax.models.module import Module

Dtype = Any

_ACTIVATIONS = activations.ACT2FN   # transformers' hidden_act names


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """ViT hyper-parameters (data only).

  `image_size` is the resolution the position table was trained at; inputs of
  another size get an interpolated table when `interpolate_pos_encoding` is true
  (else a ValueError, as HF without `interpolate_pos_encoding=True`).
  """
  kind: str = "clip"  # 'clip' | 'eva'
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  patch_size: int = 14
  image_size: int = 224
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  feature_layer: int = -1
  interpolate_pos_encoding: bool = True
  scan_layers: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32  # activation / compute dtype
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.kind not in ("clip", "eva"):
      raise ValueError(f"VisionConfig.kind must be 'clip' or 'eva', got {self.kind!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"unknown hidden_act {self.hidden_act!r}; known: {sorted(_ACTIVATIONS)}")
    self.num_used_layers  # validates feature_layer

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_used_layers(self) -> int:
    """Blocks that run: `feature_layer` resolved like an index into HF `hidden_states`."""
    n = self.num_hidden_layers
    k = self.feature_layer
    used = k + n + 1 if k < 0 else k
    if not 0 <= used <= n:
      raise ValueError(f"feature_layer={k} out of range for {n} layers "
                       f"(valid: {-(n + 1)}..{n})")
    return used

  @classmethod
  def from_hf_clip_dict(cls, d: Mapping[str, Any], **overrides) -> "VisionConfig":
    """From an HF `CLIPVisionConfig` dict (or a `CLIPConfig` dict holding `vision_config`)."""
    if "vision_config" in d and "hidden_size" not in d:
      d = d["vision_config"]
    kw = dict(
        kind="clip",
        hidden_size=d.get("hidden_size", 768),
        intermediate_size=d.get("intermediate_size", 3072),
        num_hidden_layers=d.get("num_hidden_layers", 12),
        num_attention_heads=d.get("num_attention_heads", 12),
        patch_size=d.get("patch_size", 32),
        image_size=d.get("image_size", 224),
        num_channels=d.get("num_channels", 3),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        hidden_act=d.get("hidden_act", "quick_gelu"),
    )
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def eva_vit_g(cls, **overrides) -> "VisionConfig":
    """EVA-ViT-G/14 as in LLaMA-VID (paper/checkpoint facts): 40 blocks, block 39 used."""
    kw = dict(kind="eva", hidden_size=1408, intermediate_size=6144, num_hidden_layers=40,
              num_attention_heads=16, patch_size=14, image_size=224, layer_norm_eps=1e-6,
              hidden_act="gelu", feature_layer=39)
    kw.update(overrides)
    return cls(**kw)


# ----------------------------------------------------------------------------- helpers


def _bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out, in] matrix of torch's bicubic resize (align_corners=False, clamped borders)."""
  def cc1(x):
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def cc2(x):
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  m = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for o in range(out_size):
    src = scale * (o + 0.5) - 0.5
    i0 = math.floor(src)
    t = src - i0
    weights = (cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t))
    for k, w in enumerate(weights):
      idx = min(max(i0 - 1 + k, 0), in_size - 1)
      m[o, idx] += w
  return m


def interpolate_pos_embed(pos: jax.Array, new_grid: tuple[int, int]) -> jax.Array:
  """Resize a `[1 + g*g, C]` position table (CLS first) to `[1 + gh*gw, C]`.

  Bicubic with torch's kernel (a=-0.75, align_corners=False), as HF CLIP's
  `interpolate_pos_encoding` and LAVIS `interpolate_pos_embed` do.
  """
  n, c = pos.shape
  g = int(round(math.sqrt(n - 1)))
  if g * g != n - 1:
    raise ValueError(f"position table of {n} rows is not 1 + a square grid")
  gh, gw = new_grid
  if (gh, gw) == (g, g):
    return pos
  cls_pos, grid = pos[:1], pos[1:].reshape(g, g, c).astype(jnp.float32)
  mh = jnp.asarray(_bicubic_matrix(g, gh), jnp.float32)
  mw = jnp.asarray(_bicubic_matrix(g, gw), jnp.float32)
  out = jnp.einsum("Hh,hwc,Ww->HWc", mh, grid, mw, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([cls_pos, out.reshape(gh * gw, c).astype(pos.dtype)], axis=0)


def _linear(cfg: VisionConfig, din: int, dout: int, axes: tuple, *, bias: bool,
            rngs: nnx.Rngs) -> nnx.Linear:
  bias_axes = (axes[1] if axes[1] in ("heads", "vit_mlp") else "norm",)
  return nnx.Linear(din, dout, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=nnx.initializers.normal(0.02),
                    kernel_metadata={"out_sharding": axes},
                    bias_metadata={"out_sharding": bias_axes}, rngs=rngs)


def _layer_norm(cfg: VisionConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Statistics in fp32 whatever the compute dtype; output cast back by the caller.
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                       param_dtype=cfg.param_dtype, use_fast_variance=False,
                       scale_metadata={"out_sharding": ("norm",)},
                       bias_metadata={"out_sharding": ("norm",)}, rngs=rngs)


# ----------------------------------------------------------------------------- modules


class VisionEmbeddings(Module):
  """Patch conv + class token + learned absolute positions (HF `CLIPVisionEmbeddings`)."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p = cfg.hidden_size, cfg.patch_size
    self.class_embedding = nnx.Param(
        nnx.initializers.normal(d ** -0.5)(rngs.params(), (d,), cfg.param_dtype),
        out_sharding=("vit_embed",))
    # CLIP: no bias (HF); EVA: bias (LAVIS `patch_embed.proj.bias`).
    self.patch_embedding = nnx.Conv(
        cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
        use_bias=cfg.kind == "eva", dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        kernel_metadata={"out_sharding": ("conv", "conv", "conv", "vit_embed")},
        bias_metadata={"out_sharding": ("norm",)}, rngs=rngs)
    self.position_embedding = nnx.Embed(
        cfg.grid_size ** 2 + 1, d, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nnx.initializers.normal(0.02),
        embedding_metadata={"out_sharding": (None, "vit_embed")}, rngs=rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.cfg
    if pixels.ndim != 4 or pixels.shape[-1] != cfg.num_channels:
      raise ValueError(f"pixels must be NHWC [N, H, W, {cfg.num_channels}], got {pixels.shape}")
    n, h, w, _ = pixels.shape
    p = cfg.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of patch size {p}")
    if (h, w) != (cfg.image_size, cfg.image_size) and not cfg.interpolate_pos_encoding:
      raise ValueError(f"input {h}x{w} differs from image_size {cfg.image_size} and "
                       "interpolate_pos_encoding is off")
    x = self.patch_embedding(pixels.astype(cfg.dtype))  # [N, h/p, w/p, C]
    x = x.reshape(n, -1, cfg.hidden_size)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (n, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, x], axis=1)
    pos = interpolate_pos_embed(self.position_embedding.embedding[...], (h // p, w // p))
    return x + pos.astype(x.dtype)[None]


class VisionAttention(Module):
  """Multi-head self-attention; EVA has no k bias (LAVIS uses cat(q_bias, 0, v_bias))."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.hidden_size
    self.q_proj = _linear(cfg, d, d, ("vit_embed", "heads"), bias=True, rngs=rngs)
    self.k_proj = _linear(cfg, d, d, ("vit_embed", "heads"), bias=cfg.kind == "clip", rngs=rngs)
    self.v_proj = _linear(cfg, d, d, ("vit_embed", "heads"), bias=True, rngs=rngs)
    self.out_proj = _linear(cfg, d, d, ("heads", "vit_embed"), bias=True, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    n, t, _ = x.shape
    heads, hd = cfg.num_attention_heads, cfg.head_dim
    q = self.q_proj(x).reshape(n, t, heads, hd)
    k = self.k_proj(x).reshape(n, t, heads, hd)
    v = self.v_proj(x).reshape(n, t, heads, hd)
    logits = jnp.einsum("nqhd,nkhd->nhqk", q * (hd ** -0.5), k,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, t, heads * hd)
    return self.out_proj(out)


class VisionMLP(Module):

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.act = _ACTIVATIONS[cfg.hidden_act]
    self.fc1 = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, ("vit_embed", "vit_mlp"),
                       bias=True, rngs=rngs)
    self.fc2 = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, ("vit_mlp", "vit_embed"),
                       bias=True, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(Module):
  """Pre-LN block: x + attn(LN1(x)); x + mlp(LN2(x)) (same order in CLIP and EVA)."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.self_attn = VisionAttention(cfg, rngs=rngs)
    self.layer_norm1 = _layer_norm(cfg, rngs=rngs)
    self.mlp = VisionMLP(cfg, rngs=rngs)
    self.layer_norm2 = _layer_norm(cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.cfg.dtype
    x = x + self.self_attn(self.layer_norm1(x).astype(dt))
    return x + self.mlp(self.layer_norm2(x).astype(dt))


class VisionEncoder(Module):
  """`layers.N` (a list) or, with `scan_layers`, one stacked `layers` module ([L, ...] params)."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    n = cfg.num_used_layers
    if cfg.scan_layers and n > 0:
      @nnx.split_rngs(splits=n)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make(r):
        return VisionEncoderLayer(cfg, rngs=r)
      self.layers = make(rngs)
    else:
      self.layers = nnx.List([VisionEncoderLayer(cfg, rngs=rngs) for _ in range(n)])

  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    if cfg.num_used_layers == 0:
      return x

    def apply(layer, h):
      return layer(h)

    if cfg.remat:
      apply = nnx.remat(apply, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      def body(h, layer):
        return apply(layer, h), None

      x, _ = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                      transform_metadata={nnx.PARTITION_NAME: "layers"})(x, self.layers)
      return x
    for layer in self.layers:
      x = apply(layer, x)
    return x


class VisionTransformer(Module):
  """CLIP / EVA ViT: NHWC pixels `[N, H, W, 3]` -> features `[N, 1 + P, C]`.

  The output is the hidden state at `cfg.feature_layer` (CLIP with -1: HF
  `last_hidden_state`, i.e. before `post_layernorm`; EVA: raw block output).
  `pooled(hidden)` gives HF's `pooler_output` (CLIP only).
  """

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = VisionEmbeddings(cfg, rngs=rngs)
    if cfg.kind == "clip":
      self.pre_layrnorm = _layer_norm(cfg, rngs=rngs)  # HF spelling
    self.encoder = VisionEncoder(cfg, rngs=rngs)
    if cfg.kind == "clip":
      self.post_layernorm = _layer_norm(cfg, rngs=rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    x = self.embeddings(pixels)
    if self.cfg.kind == "clip":
      x = self.pre_layrnorm(x).astype(self.cfg.dtype)
    return self.encoder(x)

  def pooled(self, hidden: jax.Array) -> jax.Array:
    """HF `pooler_output`: post_layernorm of the CLS token (meaningful at the last layer)."""
    if self.cfg.kind != "clip":
      raise ValueError("pooled() exists only for kind='clip' (EVA has no final norm)")
    return self.post_layernorm(hidden[:, 0]).astype(self.cfg.dtype)
