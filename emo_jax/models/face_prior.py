"""Face priors: the output type of a face-analysis network, and a tiny built-in one.

EMO-LLaMA feeds facial priors from a frozen face-analysis network (the paper uses
FaceXFormer) into Face Info Mining: *global* face features, *local* (landmark) features,
68 landmarks and age / gender / race (AGR) predictions. `FacePriors` is that contract,
shared by `TinyFacePrior` (here: tests and the default config) and the real network in
`facexformer.py`.

Label tables are facts of the FaceXFormer release (docs/CHECKPOINTS.md): age bins
0-9 ... 60-69, 70+; gender 0 male, 1 female; race 0 white, 1 black, 2 indian, 3 asian,
4 others.

`TinyFacePrior` is our own small conv net (no paper counterpart): it has real, trainable
parameters so it can be fitted or randomly initialised in tests, but EmoLlama always uses
it frozen (its outputs go through `stop_gradient` and its parameters are in no trainable
group), exactly as the real face prior.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax.models.module import Module
from input_pipeline.contract import AGE_BINS, GENDERS, RACES

NUM_LANDMARKS = 68


@flax.struct.dataclass
class FacePriors:
  """Per-face outputs of a face-analysis network (N = frames folded into the batch).

  global_feats: [N, G, Cf] global face features (embedding tokens / pooled feature map).
  local_feats: [N, L, Cf] local features (e.g. sampled at the landmarks).
  landmarks: [N, 68, 2] (x, y) in [0, 1] relative to the crop.
  age_logits [N, 8], gender_logits [N, 2], race_logits [N, 5]: order of AGE_BINS, GENDERS, RACES.
  """
  global_feats: jax.Array
  local_feats: jax.Array
  landmarks: jax.Array
  age_logits: jax.Array
  gender_logits: jax.Array
  race_logits: jax.Array

  def reshape_frames(self, batch: int, frames: int) -> "FacePriors":
    """[B*F, ...] -> [B, F, ...] for every field."""
    return jax.tree.map(lambda x: x.reshape((batch, frames) + x.shape[1:]), self)


@dataclasses.dataclass(frozen=True)
class TinyFacePriorConfig:
  """Config of `TinyFacePrior` (our choice of sizes: tiny, for tests and the CPU default).

  image_size: input crop side (square). channels: conv widths, each conv has stride 2.
  feat_dim: Cf, the width of global and local features. global_grid: the final feature map is
  average-pooled to global_grid x global_grid tokens, G = global_grid**2.
  """
  image_size: int = 32
  channels: tuple[int, ...] = (8, 16)
  feat_dim: int = 16
  global_grid: int = 2

  @property
  def num_global(self) -> int:
    return self.global_grid ** 2

  @property
  def num_local(self) -> int:
    return NUM_LANDMARKS

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["channels"] = list(self.channels)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TinyFacePriorConfig":
    d = dict(d)
    d["channels"] = tuple(d.get("channels", cls.channels))
    return cls(**d)


def sample_bilinear(fmap: jax.Array, points: jax.Array) -> jax.Array:
  """Bilinear sampling. fmap [N, H, W, C], points [N, L, 2] (x, y) in [0, 1] -> [N, L, C].

  Point (0, 0) is the top-left corner of the crop, (1, 1) the bottom-right; pixel centres are
  at (i + 0.5) / size (align_corners=False convention), samples clamp at the border.
  """
  n, h, w, c = fmap.shape
  x = points[..., 0] * w - 0.5
  y = points[..., 1] * h - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  wx = x - x0
  wy = y - y0

  def gather(yi, xi):
    yi = jnp.clip(yi, 0, h - 1).astype(jnp.int32)
    xi = jnp.clip(xi, 0, w - 1).astype(jnp.int32)
    return jax.vmap(lambda f, a, b: f[a, b])(fmap, yi, xi)  # [N, L, C]

  top = gather(y0, x0) * (1 - wx)[..., None] + gather(y0, x0 + 1) * wx[..., None]
  bot = gather(y0 + 1, x0) * (1 - wx)[..., None] + gather(y0 + 1, x0 + 1) * wx[..., None]
  return top * (1 - wy)[..., None] + bot * wy[..., None]


class TinyFacePrior(Module):
  """A small conv net with the FacePriors interface (our design; used frozen).

  crops [N, S, S, 3] -> stride-2 convs (GELU) -> feature map [N, h, w, Cf];
  global = avg-pool to global_grid^2 tokens; landmarks = sigmoid(Linear(mean feature)) in
  [0, 1]; local = feature map sampled bilinearly at the 68 landmarks; AGR heads = Linear(mean).
  """

  def __init__(self, config: TinyFacePriorConfig, *, rngs: nnx.Rngs):
    self.config = config
    convs = []
    c_in = 3
    for c in config.channels:
      convs.append(nnx.Conv(c_in, c, (3, 3), strides=2, rngs=rngs,
                            kernel_metadata={"out_sharding": ("conv", "conv", "conv", "face_embed")}))
      c_in = c
    self.convs = nnx.List(convs)
    self.feat_proj = nnx.Linear(c_in, config.feat_dim, rngs=rngs)
    cf = config.feat_dim
    self.landmark_head = nnx.Linear(cf, NUM_LANDMARKS * 2, rngs=rngs)
    self.age_head = nnx.Linear(cf, len(AGE_BINS), rngs=rngs)
    self.gender_head = nnx.Linear(cf, len(GENDERS), rngs=rngs)
    self.race_head = nnx.Linear(cf, len(RACES), rngs=rngs)

  def __call__(self, crops: jax.Array) -> FacePriors:
    cfg = self.config
    if crops.ndim != 4 or crops.shape[-1] != 3:
      raise ValueError(f"face crops must be [N, H, W, 3], got {crops.shape}")
    if crops.shape[1] % 2 ** len(cfg.channels) or crops.shape[2] % 2 ** len(cfg.channels):
      raise ValueError(f"face crop size {crops.shape[1:3]} must be divisible by "
                       f"{2 ** len(cfg.channels)}")
    x = crops.astype(jnp.float32)
    for conv in self.convs:
      x = jax.nn.gelu(conv(x), approximate=False)
    fmap = self.feat_proj(x)  # [N, h, w, Cf]
    n, h, w, c = fmap.shape
    g = cfg.global_grid
    if h % g or w % g:
      raise ValueError(f"feature map {h}x{w} is not divisible by global_grid {g}")
    glob = fmap.reshape(n, g, h // g, g, w // g, c).mean(axis=(2, 4)).reshape(n, g * g, c)
    pooled = fmap.mean(axis=(1, 2))
    landmarks = jax.nn.sigmoid(self.landmark_head(pooled)).reshape(n, NUM_LANDMARKS, 2)
    local = sample_bilinear(fmap, landmarks)
    return FacePriors(global_feats=glob, local_feats=local, landmarks=landmarks,
                      age_logits=self.age_head(pooled), gender_logits=self.gender_head(pooled),
                      race_logits=self.race_head(pooled))
