"""AUFormer-style AU detection head on a frozen ViT (the EMO-LLaMA vision tower).

Structure, as AUFormer's released pipeline figure draws it (no code is public; see
docs/ACTION_UNITS.md):

- The ViT (patch projection, positions, LayerNorms, attention, MLP) is frozen. In every
  block two *expert groups* run beside it, one parallel to the attention and one parallel
  to the MLP; each group has one Mixture-of-Knowledge Expert (MoKE) per AU.
- Per-AU chaining through depth: the attention-side expert i of block l reads
  `LN1(x) + K^MLP_{l-1,i}` (the same AU's MLP-side expert output of the previous block),
  the MLP-side expert i reads `LN2(x') + K^MHSA_{l,i}`.
- Each group's output is the *average* over its AU experts, added into the residual stream:
  `x' = x + MHSA(LN1 x) + mean_i K^MHSA_{l,i}`, `x'' = x' + MLP(LN2 x') + mean_i K^MLP_{l,i}`.
- Deep supervision: every MLP-side expert output gives its own AU logit (a loss per layer);
  the final head gives the main logits.
- Inside a MoKE (on the patch grid): 1x1 conv + GELU -> 3x3 conv = M''; multi-receptive-field
  branch (three 3x3 convs with dilations 1, 3, 5 -> concat -> 1x1 conv = K_MRF);
  context-aware branch (1x1 convs make Q, K, V; "Hadamard & Softmax" of Q and K gives a
  correlation, "Hadamard & Sum" with V gives K_CA); output = 1x1 conv(GELU(M'' + K_MRF +
  K_CA)), back to tokens.

Unknown in the paper and config fields here (our defaults): the expert width
(`bottleneck`), the CLS token's handling (`cls='skip'`: experts see and write only the patch
grid, the CLS slot gets 0), the CA softmax axis (`ca_softmax='positions'`: per channel a
softmax over the grid positions of Q*K/sqrt(b), then the V-weighted sum over positions, a
global context broadcast back to the grid; 'channels': a softmax over channels per
position times V), how an expert output becomes a logit (`deep_pool`: mean over patches,
then a per-AU linear), the final head (LayerNorm, `pool` of the tokens, MLP of width
`head_hidden`), which blocks carry experts (`layers`), and the output convolution's zero
initialisation (the adapted stream starts equal to the frozen one, as adapters usually do).

All AU experts of a group are computed at once: per-AU kernels [A, din, dout] applied as
batched matmuls, 3x3 (dilated) convolutions as matmuls over the 3x3 neighbourhoods
(im2col), so each AU keeps its own weights. Shared backbone: `__call__(vit, pixels)` also returns the
frozen ViT's own features (`features`, equal to `vit(pixels)`) from the same pass, so one
forward gives the AU logits and the LLM's visual tokens (`visual_tokens='frozen'`); with
`visual_tokens='adapted'` the features are the expert-adapted stream instead (no second
stream is computed).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax.models import config_io
from emo_jax.models.vit import VisionTransformer

CA_SOFTMAX = ("positions", "channels")
POOLS = ("mean", "cls")
VISUAL_TOKENS = ("frozen", "adapted", "none")


@dataclasses.dataclass(frozen=True)
class AUFormerConfig:
  """AU head hyper-parameters (unknown paper details are fields; see the module docstring)."""
  num_aus: int = 12
  bottleneck: int = 8
  dilations: tuple[int, ...] = (1, 3, 5)
  ca_softmax: str = "positions"
  cls: str = "skip"
  layers: tuple[int, ...] | None = None     # 0-based ViT blocks with experts; None / () = all
  pool: str = "mean"
  head_hidden: int = 64
  deep_supervision: bool = True
  visual_tokens: str = "frozen"
  zero_init_out: bool = True

  def __post_init__(self):
    if self.ca_softmax not in CA_SOFTMAX:
      raise ValueError(f"ca_softmax must be one of {CA_SOFTMAX}, got {self.ca_softmax!r}")
    if self.pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
    if self.visual_tokens not in VISUAL_TOKENS:
      raise ValueError(f"visual_tokens must be one of {VISUAL_TOKENS}, got "
                       f"{self.visual_tokens!r}")
    if self.cls != "skip":
      raise ValueError("cls: only 'skip' is implemented (experts act on the patch grid)")
    if self.num_aus < 1 or self.bottleneck < 1:
      raise ValueError("num_aus and bottleneck must be >= 1")
    if self.layers is not None:
      object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
    object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "AUFormerConfig":
    return config_io.from_dict(cls, d)


class AUOutput(NamedTuple):
  logits: jax.Array                 # [N, A] head logits
  deep_logits: jax.Array | None     # [L, N, A] per expert layer (deep supervision)
  features: jax.Array | None        # [N, 1 + P, C] visual features for the LLM side


class GroupLinear(nnx.Module):
  """Per-AU linear map: [..., A, din] -> [..., A, dout] with AU i's own kernel [din, dout]
  (a grouped 1x1 convolution written as one batched matmul)."""

  def __init__(self, groups: int, din: int, dout: int, *, rngs: nnx.Rngs, zero: bool = False):
    init = nnx.initializers.zeros_init() if zero else nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.kernel = nnx.Param(init(rngs.params(), (groups, din, dout)))
    self.bias = nnx.Param(jnp.zeros((groups, dout)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...ai,aio->...ao", x, self.kernel[...]) + self.bias[...]


def _taps(x: jax.Array, dilation: int) -> jax.Array:
  """3x3 neighbourhoods (zero padded, dilated) of a grid [N, g, g, A, b] -> [N, g, g, A, 9b]:
  a grouped 3x3 convolution with SAME padding is GroupLinear over these (im2col: batched
  matmuls instead of grouped convolutions)."""
  d = dilation
  g = x.shape[1]
  xp = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0), (0, 0)))
  return jnp.concatenate([xp[:, i * d:i * d + g, j * d:j * d + g]
                          for i in range(3) for j in range(3)], axis=-1)


class MoKEGroup(nnx.Module):
  """One expert per AU, each with its own weights: [A, N, 1+P, C] -> [A, N, 1+P, C]."""

  def __init__(self, width: int, cfg: AUFormerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    a, b, c = cfg.num_aus, cfg.bottleneck, width
    self.conv_in = GroupLinear(a, c, b, rngs=rngs)                    # 1x1
    self.conv_mid = GroupLinear(a, 9 * b, b, rngs=rngs)               # 3x3
    self.mrf = nnx.List([GroupLinear(a, 9 * b, b, rngs=rngs) for _ in cfg.dilations])
    self.mrf_fuse = GroupLinear(a, b * len(cfg.dilations), b, rngs=rngs)   # 1x1
    self.ca_q = GroupLinear(a, b, b, rngs=rngs)
    self.ca_k = GroupLinear(a, b, b, rngs=rngs)
    self.ca_v = GroupLinear(a, b, b, rngs=rngs)
    self.conv_out = GroupLinear(a, b, c, rngs=rngs, zero=cfg.zero_init_out)

  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    a, n, t, c = x.shape
    b = cfg.bottleneck
    p = t - 1
    g = int(round(p ** 0.5))
    if g * g != p:
      raise ValueError(f"{p} patch tokens do not form a square grid")
    grid = jnp.transpose(x[:, :, 1:], (1, 2, 0, 3)).reshape(n, g, g, a, c)
    m = self.conv_mid(_taps(jax.nn.gelu(self.conv_in(grid), approximate=False), 1))
    k_mrf = self.mrf_fuse(jnp.concatenate([conv(_taps(m, r)) for conv, r in
                                           zip(self.mrf, cfg.dilations)], axis=-1))
    q, k, v = (f(m).reshape(n, p, a, b) for f in (self.ca_q, self.ca_k, self.ca_v))
    s = (q * k).astype(jnp.float32) * (b ** -0.5)
    if cfg.ca_softmax == "positions":
      corr = jax.nn.softmax(s, axis=1).astype(v.dtype)
      k_ca = jnp.broadcast_to(jnp.sum(corr * v, axis=1, keepdims=True), (n, p, a, b))
    else:
      k_ca = jax.nn.softmax(s, axis=-1).astype(v.dtype) * v
    h = m + k_mrf + k_ca.reshape(n, g, g, a, b)
    out = self.conv_out(jax.nn.gelu(h, approximate=False)).reshape(n, p, a, c)
    out = jnp.transpose(out, (2, 0, 1, 3))
    return jnp.concatenate([jnp.zeros((a, n, 1, c), out.dtype), out], axis=2)


class AUFormer(nnx.Module):
  """Expert groups beside a given ViT's blocks, deep-supervision heads and the AU head.

  Holds no ViT weights: `__call__(vit, pixels)` runs the ViT passed in (frozen by the
  caller's filter), so the same vision tower serves the LLM and the AU head.
  """

  def __init__(self, cfg: AUFormerConfig, width: int, num_vit_layers: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.width = width
    layers = tuple(range(num_vit_layers)) if not cfg.layers else cfg.layers
    bad = [i for i in layers if not 0 <= i < num_vit_layers]
    if bad:
      raise ValueError(f"AU expert layers {bad} outside the ViT's {num_vit_layers} used blocks")
    self.expert_layers = tuple(sorted(set(layers)))
    self.attn_experts = nnx.List([MoKEGroup(width, cfg, rngs=rngs) for _ in self.expert_layers])
    self.mlp_experts = nnx.List([MoKEGroup(width, cfg, rngs=rngs) for _ in self.expert_layers])
    a = cfg.num_aus
    if cfg.deep_supervision:
      self.deep_kernel = nnx.Param(nnx.initializers.normal(width ** -0.5)(
          rngs.params(), (len(self.expert_layers), a, width)))
      self.deep_bias = nnx.Param(jnp.zeros((len(self.expert_layers), a)))
    self.head_norm = nnx.LayerNorm(width, rngs=rngs)
    self.head_fc1 = nnx.Linear(width, cfg.head_hidden, rngs=rngs)
    self.head_fc2 = nnx.Linear(cfg.head_hidden, a, rngs=rngs)

  def _pool(self, x: jax.Array) -> jax.Array:
    return x[:, 0] if self.cfg.pool == "cls" else x[:, 1:].mean(axis=1)

  def __call__(self, vit: VisionTransformer, pixels: jax.Array) -> AUOutput:
    """pixels: normalised NHWC [N, H, W, 3] (as for `vit`)."""
    cfg, vcfg = self.cfg, vit.cfg
    if vcfg.hidden_size != self.width:
      raise ValueError(f"AU head built for width {self.width}, ViT has {vcfg.hidden_size}")
    if vcfg.scan_layers:
      raise ValueError("the AU head runs the ViT block by block: use vision.scan_layers=False")
    dt = vcfg.dtype
    x = vit.embeddings(pixels)
    if vcfg.kind == "clip":
      x = vit.pre_layrnorm(x).astype(dt)
    plain = x if cfg.visual_tokens == "frozen" else None
    a = cfg.num_aus
    k_prev = jnp.zeros((a,) + x.shape, x.dtype)
    deep = []
    slot = {l: j for j, l in enumerate(self.expert_layers)}
    for l, layer in enumerate(vit.encoder.layers):
      if plain is not None:
        plain = layer(plain)
      if l not in slot:
        x = layer(x)
        continue
      j = slot[l]
      h1 = layer.layer_norm1(x).astype(dt)
      k_attn = self.attn_experts[j](h1[None] + k_prev)
      x = x + layer.self_attn(h1) + k_attn.mean(axis=0)
      h2 = layer.layer_norm2(x).astype(dt)
      k_mlp = self.mlp_experts[j](h2[None] + k_attn)
      x = x + layer.mlp(h2) + k_mlp.mean(axis=0)
      k_prev = k_mlp
      if cfg.deep_supervision:
        pooled = k_mlp[:, :, 1:].mean(axis=2).astype(jnp.float32)          # [A, N, C]
        deep.append(jnp.einsum("anc,ac->na", pooled, self.deep_kernel[j])
                    + self.deep_bias[j])
    h = self.head_norm(self._pool(x).astype(jnp.float32))
    logits = self.head_fc2(jax.nn.gelu(self.head_fc1(h), approximate=False))
    features = plain if cfg.visual_tokens == "frozen" else (
        x if cfg.visual_tokens == "adapted" else None)
    return AUOutput(logits.astype(jnp.float32), jnp.stack(deep) if deep else None, features)


class AUDetector(nnx.Module):
  """A vision tower plus an AU head: the unit the AU stage trains (`au_head/` only)."""

  def __init__(self, vision_tower: VisionTransformer, au_head: AUFormer):
    self.vision_tower = vision_tower
    self.au_head = au_head

  def __call__(self, pixels: jax.Array) -> AUOutput:
    return self.au_head(self.vision_tower, pixels)


def build_head(cfg: AUFormerConfig, vit: VisionTransformer, *, rngs: nnx.Rngs) -> AUFormer:
  return AUFormer(cfg, vit.cfg.hidden_size, vit.cfg.num_used_layers, rngs=rngs)


TRAINABLE = r"^au_head/"


def trainable_filter(path, value) -> bool:
  """nnx filter of the AU head's parameters inside an AUDetector (the ViT stays frozen)."""
  return isinstance(value, nnx.Param) and str(getattr(path[0], "key", path[0])) == "au_head"


def visual_tokens_and_aus(model, head: AUFormer, batch) -> tuple[jax.Array, jax.Array]:
  """One vision forward for both outputs of an EmoLlama with an AU head:
  (visual tokens [B, F * tokens_per_frame, D] as `model.encode_frames(batch)` gives them,
  AU logits [B, F, A]). Needs `head.cfg.visual_tokens` 'frozen' (the LLM's own features)
  or 'adapted' (the expert-adapted features)."""
  if head.cfg.visual_tokens == "none":
    raise ValueError("visual_tokens='none' computes no features for the LLM")
  frames = model.vision_inputs(batch["frames"])
  b, f = frames.shape[:2]
  out = head(model.vision_tower, frames.reshape((b * f,) + frames.shape[2:]))
  return model.encode_frames(batch, feats=out.features), out.logits.reshape(b, f, -1)
