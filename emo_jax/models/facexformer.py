"""FaceXFormer (Narayan et al., 2024) in Flax NNX: the frozen facial prior network of EMO-LLaMA.

Swin-B backbone (emo_jax.models.swin), a neck fusing the four stages into one 256-wide map,
a SAM-style two-way decoder over task tokens, and MLP heads (landmarks, pose, attributes,
visibility, age, gender, race; optional face parsing). `forward` returns the head outputs,
`__call__` the `FacePriors` (face_prior.py) that Face Info Mining consumes. Which
tensors those are is our choice, switchable by `FaceXFormerConfig`, since the paper does not
say. Architecture facts and these choices: docs/MODEL.md, "Face network"; checkpoint keys:
docs/CHECKPOINTS.md.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.models import swin as swin_lib
from emo_jax.models.face_prior import NUM_LANDMARKS, FacePriors, sample_bilinear
from emo_jax.models.module import Module
from input_pipeline.contract import AGE_BINS, GENDERS, RACES

# (task token name, head output size), in the decoder's token order (paper/code fact).
TASKS: tuple[tuple[str, int], ...] = (
    ("landmarks", 2 * NUM_LANDMARKS), ("pose", 3), ("attribute", 40), ("visibility", 29),
    ("age", len(AGE_BINS)), ("gender", len(GENDERS)), ("race", len(RACES)),
)
TASK_NAMES = tuple(t for t, _ in TASKS)


class Buffer(nnx.Variable):
  """A loaded, never-trained array (torch `register_buffer`)."""


@dataclasses.dataclass(frozen=True)
class FaceXFormerConfig:
  """FaceXFormer sizes (defaults = the release) and the prior-feature switches (our choice)."""
  swin: swin_lib.SwinConfig = swin_lib.SwinConfig()
  decoder_dim: int = 256
  decoder_depth: int = 2
  decoder_heads: int = 8
  decoder_mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  num_mask_tokens: int = 11
  segmentation: bool = False
  # Prior features for Face Info Mining (our choices).
  global_grid: int = 2
  global_mean: bool = True
  global_source: str = "fused"  # 'fused' (neck output) | 'decoded' (after the two-way decoder)
  local_task_tokens: tuple[str, ...] = ("landmarks",)
  local_landmark_samples: bool = True
  local_source: str = "fused"
  dtype: Any = jnp.float32

  def __post_init__(self):
    if isinstance(self.swin, Mapping):
      object.__setattr__(self, "swin", swin_lib.SwinConfig(**_tuplify(self.swin)))
    object.__setattr__(self, "local_task_tokens", tuple(self.local_task_tokens))
    for t in self.local_task_tokens:
      if t not in TASK_NAMES:
        raise ValueError(f"unknown task token {t!r}; choose from {TASK_NAMES}")
    for name in ("global_source", "local_source"):
      if getattr(self, name) not in ("fused", "decoded"):
        raise ValueError(f"{name} must be 'fused' or 'decoded', got {getattr(self, name)!r}")
    if self.num_global == 0 or self.num_local == 0:
      raise ValueError("the prior needs at least one global and one local feature")
    if (self.decoder_dim // self.attention_downsample_rate) % self.decoder_heads:
      raise ValueError("decoder heads must divide the downsampled attention width")

  @property
  def num_global(self) -> int:
    return self.global_grid ** 2 + int(self.global_mean)

  @property
  def num_local(self) -> int:
    return len(self.local_task_tokens) + NUM_LANDMARKS * int(self.local_landmark_samples)

  @property
  def feature_dim(self) -> int:
    return self.decoder_dim

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.pop("dtype")
    d["swin"].pop("dtype")
    return d


def _tuplify(d: Mapping[str, Any]) -> dict[str, Any]:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def tiny_config(**overrides) -> FaceXFormerConfig:
  """A few-thousand-parameter FaceXFormer for tests (64 px crops, 4 stages, window 2)."""
  base = dict(
      swin=swin_lib.SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=(2, 2, 2, 2),
                               num_heads=(1, 2, 2, 4), window_size=2),
      decoder_dim=16, decoder_heads=2, decoder_mlp_dim=32)
  base.update(overrides)
  return FaceXFormerConfig(**base)


# ---------------------------------------------------------------------------------------
# Resampling helpers (numpy matrices built at trace time, applied with einsum).


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's bilinear interpolate (align_corners=False, no antialias)."""
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = src - i0
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), i0), 1.0 - w1)
  np.add.at(m, (np.arange(n_out), i1), w1)
  return m.astype(np.float32)


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's adaptive average pooling."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[N, h, w, C] -> [N, H, W, C] exactly as torch interpolate(bilinear, align_corners=False)."""
  if x.shape[1:3] == tuple(size):
    return x
  mh = jnp.asarray(bilinear_matrix(x.shape[1], size[0]), x.dtype)
  mw = jnp.asarray(bilinear_matrix(x.shape[2], size[1]), x.dtype)
  return jnp.einsum("Hh,nhwc,Ww->nHWc", mh, x, mw)


# ---------------------------------------------------------------------------------------
# Modules.


def _linear(din: int, dout: int, rngs: nnx.Rngs, dtype, use_bias: bool = True) -> nnx.Linear:
  return swin_lib.linear(din, dout, rngs=rngs, dtype=dtype, use_bias=use_bias)


class NeckMLP(Module):
  """`linear_c.{i}`: a per-pixel Linear C_i -> decoder width (`proj`)."""

  def __init__(self, din: int, dout: int, *, dtype, rngs: nnx.Rngs):
    self.proj = _linear(din, dout, rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x)


class PositionEmbeddingRandom(Module):
  """SAM's random-Fourier position encoding; the Gaussian matrix is a loaded buffer."""

  def __init__(self, num_pos_feats: int, *, rngs: nnx.Rngs):
    self.positional_encoding_gaussian_matrix = Buffer(
        jax.random.normal(rngs.params(), (2, num_pos_feats), jnp.float32))

  def __call__(self, h: int, w: int) -> jax.Array:
    """[h*w, 2 * num_pos_feats] encoding of the grid's pixel centres (row-major)."""
    ys = (np.arange(h) + 0.5) / h
    xs = (np.arange(w) + 0.5) / w
    grid = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1).reshape(-1, 2)  # (x, y)
    coords = 2.0 * jnp.asarray(grid, jnp.float32) - 1.0
    coords = 2.0 * math.pi * (coords @ self.positional_encoding_gaussian_matrix[...])
    return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)


class DecoderAttention(Module):
  """SAM `Attention`: q/k/v projected to dim // downsample_rate, split into heads, out_proj."""

  def __init__(self, dim: int, heads: int, downsample_rate: int = 1, *, dtype, rngs: nnx.Rngs):
    inner = dim // downsample_rate
    self.num_heads = heads
    self.q_proj = _linear(dim, inner, rngs, dtype)
    self.k_proj = _linear(dim, inner, rngs, dtype)
    self.v_proj = _linear(dim, inner, rngs, dtype)
    self.out_proj = _linear(inner, dim, rngs, dtype)

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    def heads(x):
      return x.reshape(x.shape[:-1] + (self.num_heads, -1))
    q, k, v = heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores / math.sqrt(q.shape[-1]), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return self.out_proj(out.reshape(out.shape[:-2] + (-1,)))


class MLPBlock(Module):
  """`mlp.lin1` -> ReLU -> `mlp.lin2` (TwoWayTransformer's default activation is ReLU)."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.lin1 = _linear(dim, hidden, rngs, dtype)
    self.lin2 = _linear(hidden, dim, rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.lin2(jax.nn.relu(self.lin1(x)))


class TwoWayAttentionBlock(Module):
  """Token self-attn, token->image cross-attn, token MLP, image->token cross-attn (post-norm)."""

  def __init__(self, cfg: FaceXFormerConfig, skip_first_layer_pe: bool, *, rngs: nnx.Rngs):
    d, h, r, dt = cfg.decoder_dim, cfg.decoder_heads, cfg.attention_downsample_rate, cfg.dtype
    self.skip_first_layer_pe = skip_first_layer_pe
    self.self_attn = DecoderAttention(d, h, 1, dtype=dt, rngs=rngs)
    self.norm1 = swin_lib.LayerNorm(d)
    self.cross_attn_token_to_image = DecoderAttention(d, h, r, dtype=dt, rngs=rngs)
    self.norm2 = swin_lib.LayerNorm(d)
    self.mlp = MLPBlock(d, cfg.decoder_mlp_dim, dtype=dt, rngs=rngs)
    self.norm3 = swin_lib.LayerNorm(d)
    self.norm4 = swin_lib.LayerNorm(d)
    self.cross_attn_image_to_token = DecoderAttention(d, h, r, dtype=dt, rngs=rngs)

  def __call__(self, queries, keys, query_pe, key_pe):
    if self.skip_first_layer_pe:
      queries = self.self_attn(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + self.self_attn(q, q, queries)
    queries = self.norm1(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
    queries = self.norm3(queries + self.mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
    return queries, keys


class TwoWayTransformer(Module):
  """SAM's two-way decoder: `layers`, `final_attn_token_to_image`, `norm_final_attn`."""

  def __init__(self, cfg: FaceXFormerConfig, *, rngs: nnx.Rngs):
    self.layers = nnx.List([TwoWayAttentionBlock(cfg, i == 0, rngs=rngs)
                            for i in range(cfg.decoder_depth)])
    self.final_attn_token_to_image = DecoderAttention(
        cfg.decoder_dim, cfg.decoder_heads, cfg.attention_downsample_rate, dtype=cfg.dtype,
        rngs=rngs)
    self.norm_final_attn = swin_lib.LayerNorm(cfg.decoder_dim)

  def __call__(self, image: jax.Array, image_pe: jax.Array, tokens: jax.Array):
    """image [N, HW, C], image_pe [HW, C], tokens [N, T, C] -> (tokens, image) updated."""
    queries, keys = tokens, image
    key_pe = image_pe[None].astype(image.dtype)
    for layer in self.layers:
      queries, keys = layer(queries, keys, tokens, key_pe)
    attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
    return self.norm_final_attn(queries + attn), keys


class PredictionHead(Module):
  """FaceXFormer `MLP`: `layers.{0..n-1}` Linears with ReLU between."""

  def __init__(self, din: int, hidden: int, dout: int, num_layers: int = 3, *, dtype,
               rngs: nnx.Rngs):
    dims = [din] + [hidden] * (num_layers - 1) + [dout]
    self.layers = nnx.List([_linear(a, b, rngs, dtype) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


class ConvTranspose2x2(Module):
  """torch ConvTranspose2d(kernel 2, stride 2); `weight` kept in torch layout [in, out, 2, 2]."""

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
    self.weight = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (din, dout, 2, 2)))
    self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, _ = x.shape
    y = jnp.einsum("nhwc,coij->nhiwjo", x, self.weight[...].astype(x.dtype))
    return y.reshape(n, 2 * h, 2 * w, -1) + self.bias[...].astype(x.dtype)


class OutputUpscaling(Module):
  """`output_upscaling`: deconv (0) -> LayerNorm2d (1) -> GELU -> deconv (3) -> GELU."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.deconv1 = ConvTranspose2x2(dim, dim // 4, rngs=rngs)
    self.norm = swin_lib.LayerNorm(dim // 4, eps=1e-6)
    self.deconv2 = ConvTranspose2x2(dim // 4, dim // 8, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.gelu(self.norm(self.deconv1(x)), approximate=False)
    return jax.nn.gelu(self.deconv2(x), approximate=False)


class FaceDecoder(Module):
  """`face_decoder`: task + mask tokens through the two-way transformer, then the heads."""

  def __init__(self, cfg: FaceXFormerConfig, *, rngs: nnx.Rngs):
    d = cfg.decoder_dim
    init = nnx.initializers.normal(1.0)
    for name, _ in TASKS:
      setattr(self, f"{name}_token", nnx.Param(init(rngs.params(), (1, d))))
    self.mask_tokens = nnx.Param(init(rngs.params(), (cfg.num_mask_tokens, d)))
    self.transformer = TwoWayTransformer(cfg, rngs=rngs)
    for name, out in TASKS:
      setattr(self, f"{name}_prediction_head",
              PredictionHead(d, d, out, dtype=cfg.dtype, rngs=rngs))
    if cfg.segmentation:
      self.output_upscaling = OutputUpscaling(d, rngs=rngs)
      self.output_hypernetwork_mlps = PredictionHead(d, d, d // 8, dtype=cfg.dtype, rngs=rngs)
    else:
      self.output_upscaling = None
      self.output_hypernetwork_mlps = None

  def tokens(self) -> jax.Array:
    return jnp.concatenate([getattr(self, f"{n}_token")[...] for n in TASK_NAMES]
                           + [self.mask_tokens[...]], axis=0)


class FaceXFormer(Module):
  """`__call__(crops [N, S, S, 3] ImageNet-normalised) -> FacePriors`; `forward` gives all."""

  def __init__(self, config: FaceXFormerConfig, *, rngs: nnx.Rngs):
    self.config = config
    cfg = config
    self.backbone = swin_lib.SwinTransformer(cfg.swin, rngs=rngs)
    dims = cfg.swin.stage_dims
    self.linear_c = nnx.List([NeckMLP(c, cfg.decoder_dim, dtype=cfg.dtype, rngs=rngs)
                              for c in dims])
    self.linear_fuse = _linear(cfg.decoder_dim * len(dims), cfg.decoder_dim, rngs, cfg.dtype,
                               use_bias=False)
    self.pe_layer = PositionEmbeddingRandom(cfg.decoder_dim // 2, rngs=rngs)
    self.face_decoder = FaceDecoder(cfg, rngs=rngs)

  def forward(self, crops: jax.Array) -> dict[str, jax.Array]:
    """All outputs: fused / decoded maps [N, h, w, C], decoder tokens [N, 7 + 11, C], the raw
    head outputs per task name (landmarks [N, 136] in [-1, 1], ...), `segmentation` if enabled."""
    feats = self.backbone(crops)
    n, h, w, _ = feats[0].shape
    projected = [resize_bilinear(mlp(f), (h, w)) for mlp, f in zip(self.linear_c, feats)]
    fused = self.linear_fuse(jnp.concatenate(projected[::-1], axis=-1))  # [N, h, w, C]
    pe = self.pe_layer(h, w)
    dec = self.face_decoder
    tokens = jnp.broadcast_to(dec.tokens()[None].astype(fused.dtype),
                              (n,) + dec.tokens().shape)
    hs, keys = dec.transformer(fused.reshape(n, h * w, -1), pe, tokens)
    out = {"fused": fused, "decoded": keys.reshape(n, h, w, -1), "tokens": hs,
           "backbone_pooled": self.backbone.pooled(feats[-1])}
    for i, name in enumerate(TASK_NAMES):
      out[name] = getattr(dec, f"{name}_prediction_head")(hs[:, i]).astype(jnp.float32)
    if dec.output_upscaling is not None:
      up = dec.output_upscaling(out["decoded"])  # [N, 4h, 4w, C/8]
      hyper = dec.output_hypernetwork_mlps(hs[:, len(TASKS):])  # [N, 11, C/8]
      out["segmentation"] = jnp.einsum("nkc,nhwc->nkhw", hyper, up).astype(jnp.float32)
    return out

  def priors(self, out: Mapping[str, jax.Array]) -> FacePriors:
    """FacePriors from `forward`'s outputs according to the config switches."""
    cfg = self.config
    n = out["fused"].shape[0]
    landmarks = jnp.clip((out["landmarks"].reshape(n, NUM_LANDMARKS, 2) + 1.0) / 2.0, 0.0, 1.0)
    gmap = out[cfg.global_source].astype(jnp.float32)
    glob = []
    if cfg.global_grid:
      g = cfg.global_grid
      ph = jnp.asarray(adaptive_pool_matrix(gmap.shape[1], g))
      pw = jnp.asarray(adaptive_pool_matrix(gmap.shape[2], g))
      glob.append(jnp.einsum("Hh,nhwc,Ww->nHWc", ph, gmap, pw).reshape(n, g * g, -1))
    if cfg.global_mean:
      glob.append(jnp.mean(gmap, axis=(1, 2))[:, None])
    local = []
    if cfg.local_task_tokens:
      idx = np.array([TASK_NAMES.index(t) for t in cfg.local_task_tokens])
      local.append(out["tokens"][:, idx].astype(jnp.float32))
    if cfg.local_landmark_samples:
      local.append(sample_bilinear(out[cfg.local_source].astype(jnp.float32), landmarks))
    return FacePriors(
        global_feats=jnp.concatenate(glob, axis=1), local_feats=jnp.concatenate(local, axis=1),
        landmarks=landmarks, age_logits=out["age"], gender_logits=out["gender"],
        race_logits=out["race"])

  def __call__(self, crops: jax.Array) -> FacePriors:
    return self.priors(self.forward(crops))


def init_random(config: FaceXFormerConfig, seed: int = 0) -> FaceXFormer:
  """A randomly initialised FaceXFormer, initialised under one jit (fast on CPU)."""
  def make():
    return nnx.split(FaceXFormer(config, rngs=nnx.Rngs(seed)))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: FaceXFormer(config, rngs=nnx.Rngs(seed))))
  state = jax.jit(lambda: make()[1])()
  return nnx.merge(graphdef, state)


def abstract_model(config: FaceXFormerConfig) -> FaceXFormer:
  """A FaceXFormer with shape-only variables, to be filled by a converter."""
  return nnx.eval_shape(lambda: FaceXFormer(config, rngs=nnx.Rngs(0)))

