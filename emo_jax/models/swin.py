"""Swin Transformer (Liu et al. 2021) backbone in Flax NNX, laid out like torchvision's `swin_b`.

FaceXFormer's released checkpoint stores torchvision's Swin-B, so this module mirrors
torchvision's structure (shifted-window attention with a relative position bias, patch
merging, padding to a multiple of the window as torchvision does); the only renames are the
ones NNX forces, listed in docs/CHECKPOINTS.md ("FaceXFormer"). Architecture facts and our
choices (LayerNorm statistics and softmax in fp32): docs/MODEL.md, "Face network".
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.models.module import Module


@dataclasses.dataclass(frozen=True)
class SwinConfig:
  """Swin hyper-parameters. Defaults are Swin-B (torchvision `swin_b`, FaceXFormer's backbone)."""
  image_size: int = 224
  patch_size: int = 4
  in_channels: int = 3
  embed_dim: int = 128
  depths: tuple[int, ...] = (2, 2, 18, 2)
  num_heads: tuple[int, ...] = (4, 8, 16, 32)
  window_size: int = 7
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  def __post_init__(self):
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
    for d, h in zip(self.stage_dims, self.num_heads):
      if d % h:
        raise ValueError(f"stage width {d} is not divisible by {h} heads")

  @property
  def stage_dims(self) -> tuple[int, ...]:
    return tuple(self.embed_dim * 2 ** i for i in range(len(self.depths)))

  @property
  def num_features(self) -> int:
    return self.stage_dims[-1]


def swin_b_config(**overrides) -> SwinConfig:
  return dataclasses.replace(SwinConfig(), **overrides)


class LayerNorm(Module):
  """torch.nn.LayerNorm over the last axis with torch parameter names (`weight`, `bias`).

  Two-pass statistics in fp32 (our choice; nnx.LayerNorm's one-pass variance loses accuracy).
  """

  def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32,
               logical_axis: str = "norm"):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(logical_axis,))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=(logical_axis,))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def linear(din: int, dout: int, *, rngs: nnx.Rngs, dtype=jnp.float32, use_bias: bool = True,
           axes: tuple[str | None, str | None] = (None, None)) -> nnx.Linear:
  """nnx.Linear (kernel [in, out] = torch weight.T) with logical axis names on its kernel."""
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, rngs=rngs,
                    kernel_init=nnx.initializers.truncated_normal(0.02),
                    kernel_metadata={"out_sharding": axes},
                    bias_metadata={"out_sharding": (axes[1],)})


def relative_position_index(window: int) -> np.ndarray:
  """[ws*ws, ws*ws] index into the bias table: (dy + ws - 1) * (2ws - 1) + (dx + ws - 1)."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
  return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


def shift_window_mask(height: int, width: int, window: int, shift: tuple[int, int]) -> np.ndarray:
  """Additive mask [num_windows, ws*ws, ws*ws]: -100 between tokens of different roll regions."""
  def regions(n, s):
    idx = np.arange(n)
    if s == 0:
      return np.zeros(n, np.int32)
    return (idx >= n - window).astype(np.int32) + (idx >= n - s).astype(np.int32)

  label = regions(height, shift[0])[:, None] * 3 + regions(width, shift[1])[None, :]
  win = label.reshape(height // window, window, width // window, window)
  win = win.transpose(0, 2, 1, 3).reshape(-1, window * window)
  diff = win[:, None, :] != win[:, :, None]
  return np.where(diff, -100.0, 0.0).astype(np.float32)


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """[B, H, W, C] -> [B, nW, ws*ws, C] (windows in row-major order)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, window * window, c)


def window_reverse(x: jax.Array, window: int, height: int, width: int) -> jax.Array:
  """[B, nW, ws*ws, C] -> [B, H, W, C]."""
  b, _, _, c = x.shape
  x = x.reshape(b, height // window, width // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


class ShiftedWindowAttention(Module):
  """(Shifted) window multi-head self-attention with relative position bias (torchvision v1)."""

  def __init__(self, dim: int, num_heads: int, window: int, shift: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.window = window
    self.shift = shift
    self.qkv = linear(dim, 3 * dim, rngs=rngs, dtype=dtype, axes=("face_embed", None))
    self.proj = linear(dim, dim, rngs=rngs, dtype=dtype, axes=(None, "face_embed"))
    table = nnx.initializers.truncated_normal(0.02)(rngs.params(), ((2 * window - 1) ** 2, num_heads))
    self.relative_position_bias_table = nnx.Param(table, out_sharding=(None, None))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    ws = self.window
    pad_b, pad_r = (-h) % ws, (-w) % ws
    if pad_b or pad_r:
      x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    hp, wp = h + pad_b, w + pad_r
    # torchvision: no shift along an axis the window already covers.
    shift = (0 if ws >= hp else self.shift, 0 if ws >= wp else self.shift)
    if any(shift):
      x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
    win = window_partition(x, ws)  # [B, nW, T, C]
    nw, t = win.shape[1], win.shape[2]
    hd = c // self.num_heads
    qkv = self.qkv(win).reshape(b, nw, t, 3, self.num_heads, hd)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    q = q * (hd ** -0.5)
    scores = jnp.einsum("bnthd,bnshd->bnhts", q, k, preferred_element_type=jnp.float32)
    bias = self.relative_position_bias_table[...][relative_position_index(ws)]  # [T, T, heads]
    scores = scores + jnp.transpose(bias, (2, 0, 1)).astype(jnp.float32)[None, None]
    if any(shift):
      scores = scores + jnp.asarray(shift_window_mask(hp, wp, ws, shift))[None, :, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bnhts,bnshd->bnthd", probs, v).reshape(b, nw, t, c)
    out = self.proj(out)
    out = window_reverse(out, ws, hp, wp)
    if any(shift):
      out = jnp.roll(out, shift, axis=(1, 2))
    return out[:, :h, :w, :]


class SwinMLP(Module):
  """Linear -> exact GELU -> Linear (torchvision `mlp.0`, `mlp.3`)."""

  def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = linear(dim, hidden, rngs=rngs, dtype=dtype, axes=("face_embed", "mlp"))
    self.fc2 = linear(hidden, dim, rngs=rngs, dtype=dtype, axes=("mlp", "face_embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwinBlock(Module):
  """Pre-LN block: x + attn(norm1(x)); x + mlp(norm2(x)) on a [B, H, W, C] map."""

  def __init__(self, dim: int, num_heads: int, window: int, shift: int, cfg: SwinConfig, *,
               rngs: nnx.Rngs):
    self.norm1 = LayerNorm(dim, eps=cfg.layer_norm_eps)
    self.attn = ShiftedWindowAttention(dim, num_heads, window, shift, dtype=cfg.dtype, rngs=rngs)
    self.norm2 = LayerNorm(dim, eps=cfg.layer_norm_eps)
    self.mlp = SwinMLP(dim, int(dim * cfg.mlp_ratio), dtype=cfg.dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchMerging(Module):
  """2x2 neighbours -> LayerNorm(4C) -> Linear(4C, 2C, no bias); odd sizes are zero-padded."""

  def __init__(self, dim: int, cfg: SwinConfig, *, rngs: nnx.Rngs):
    self.reduction = linear(4 * dim, 2 * dim, rngs=rngs, dtype=cfg.dtype, use_bias=False,
                         axes=(None, "face_embed"))
    self.norm = LayerNorm(4 * dim, eps=cfg.layer_norm_eps)

  def __call__(self, x: jax.Array) -> jax.Array:
    _, h, w, _ = x.shape
    if h % 2 or w % 2:
      x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)
    return self.reduction(self.norm(x))


class PatchEmbed(Module):
  """Non-overlapping patch conv (torchvision `features.0.0`) + LayerNorm (`features.0.2`)."""

  def __init__(self, cfg: SwinConfig, *, rngs: nnx.Rngs):
    p = cfg.patch_size
    self.patch_size = p
    self.proj = nnx.Conv(cfg.in_channels, cfg.embed_dim, (p, p), strides=(p, p), padding="VALID",
                         dtype=cfg.dtype, rngs=rngs,
                         kernel_metadata={"out_sharding": ("conv", "conv", "conv", None)},
                         bias_metadata={"out_sharding": (None,)})
    self.norm = LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    return self.norm(self.proj(pixels))


class SwinStage(Module):
  """`depth` blocks (even ones unshifted, odd ones shifted by ws // 2), then optional merging."""

  def __init__(self, index: int, cfg: SwinConfig, *, rngs: nnx.Rngs):
    dim, heads = cfg.stage_dims[index], cfg.num_heads[index]
    ws = cfg.window_size
    self.blocks = nnx.List([
        SwinBlock(dim, heads, ws, 0 if j % 2 == 0 else ws // 2, cfg, rngs=rngs)
        for j in range(cfg.depths[index])
    ])
    last = index == len(cfg.depths) - 1
    self.downsample = None if last else PatchMerging(dim, cfg, rngs=rngs)


class SwinTransformer(Module):
  """Swin backbone. `__call__(pixels [N, H, W, 3]) -> list of the 4 stage outputs [N, h, w, C_i]`.

  Stage outputs are taken before patch merging (FaceXFormer hooks torchvision's
  `features.{1,3,5,7}`, i.e. the block stacks; HF's `reshaped_hidden_states` with
  `output_hidden_states_before_downsampling=True`). `pooled(last)` applies the final `norm` and
  a spatial mean (torchvision's classifier input; HF `pooler_output`).
  """

  def __init__(self, cfg: SwinConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    self.stages = nnx.List([SwinStage(i, cfg, rngs=rngs) for i in range(len(cfg.depths))])
    self.norm = LayerNorm(cfg.num_features, eps=cfg.layer_norm_eps)

  def __call__(self, pixels: jax.Array) -> list[jax.Array]:
    p = self.config.patch_size
    if pixels.ndim != 4 or pixels.shape[-1] != self.config.in_channels:
      raise ValueError(f"expected pixels [N, H, W, {self.config.in_channels}], got {pixels.shape}")
    if pixels.shape[1] % p or pixels.shape[2] % p:
      raise ValueError(f"image size {pixels.shape[1:3]} is not a multiple of the patch size {p}")
    x = self.patch_embed(pixels.astype(self.config.dtype))
    outs = []
    for stage in self.stages:
      for block in stage.blocks:
        x = block(x)
      outs.append(x)
      if stage.downsample is not None:
        x = stage.downsample(x)
    return outs

  def pooled(self, last: jax.Array) -> jax.Array:
    """[N, h, w, C] last stage -> [N, C]: final LayerNorm then spatial mean."""
    return jnp.mean(self.norm(last).astype(jnp.float32), axis=(1, 2))
