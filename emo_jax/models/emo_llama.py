"""EMO-LLaMA: LLaMA-VID (context + content tokens per frame) + Face Info Mining.

Per frame: the ViT (`vision_tower`) gives X [257, Cv]; the text-guided Q-Former
(`vlm_att_*`) turns the instruction into text queries that pool the patch tokens into one
context token; the patch tokens give content tokens (`mean` | `grid:g` | `none`) through
`mm_projector`; `face_mining` turns the frozen face prior's features into face tokens. A
frame's tokens are `[context, content..., face...]` and fill, in order, the
`F * tokens_per_frame` IMAGE_TOKEN_ID slots the pipeline put in place of `<image>`; slots of
padding frames get a zero embedding and attention mask 0. Frames are folded into the batch
([B*F, ...]) for the ViT, Q-Former and face modules. Multi-turn batches carry one Q-Former
text per user turn (`qformer_ids` [B, N, Tq]) and get one visual block per turn.

The formulas, and which parts are LLaMA-VID facts and which our choices: docs/MODEL.md. The
batch: docs/INTERFACES.md "The batch". Pixels arrive as uint8 in their encoder's geometry and
are normalised inside the jitted model (emo_jax.models.pixels).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.dtypes import to_dtype
from emo_jax.models import config_io
from emo_jax.models import face as face_lib
from emo_jax.models import facexformer, generation, lora
from emo_jax.models import pixels as pixels_lib
from emo_jax.models.face import FaceInfoMining, FaceMiningConfig
from emo_jax.models.face_prior import FacePriors, TinyFacePrior, TinyFacePriorConfig
from emo_jax.models.layers import DEFAULT_CHUNK
from emo_jax.models.llama import LlamaConfig, LlamaForCausalLM
from emo_jax.models.qformer import QFormerConfig, QFormerModel
from emo_jax.models.vit import VisionConfig, VisionTransformer
from emo_jax.models.module import Module
from emo_jax.sharding import constrain
from input_pipeline.contract import AGR_TEMPLATE, IMAGE_TOKEN_ID

FACE_PRIORS = ("tiny", "facexformer", "precomputed")
SELECT_FEATURES = ("patch", "cls_patch")

# Parameter groups (regex over '/'-joined parameter paths). 'lora' is the LoRA parameters
# (nnx.LoRAParam) inside the LLM, 'llm' the LLM's base weights.
PARAM_GROUPS: dict[str, str] = {
  "vision": r"^vision_tower/",
  "qformer": r"^(vlm_att_encoder/|vlm_att_query$|vlm_att_ln/)",
  "projectors": (r"^(vlm_att_projector|vlm_att_key_projector|vlm_att_val_projector|"
                 r"vlm_att_bert_proj|mm_projector)/"),
  "face": r"^face_mining/",
  "face_prior": r"^face_prior/",
  "llm": r"^language_model/",
  "lora": r"^language_model/",
}
DEFAULT_TRAINABLE = ("qformer", "projectors", "face", "lora")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class EmoLlamaConfig:
  """The whole model as data.

  LLaMA-VID facts: 32 Q-Former queries (`qformer.num_query_tokens`), compress_type 'mean' for video ('grid:g' in the grid
  variants), vlm_att_ln is a torch LayerNorm (eps 1e-5). EMO-LLaMA facts: face tokens from a
  frozen face prior, AGR sentence in the prompt. Our choices: the face module sizes
  (`face`), the tiny prior, the token order [context, content, face].

  face_prior: 'tiny' (TinyFacePrior inside the model), 'facexformer' (emo_jax.models.facexformer,
  config in `facexformer`), or 'precomputed' (the batch carries `face_global`/`face_local`).
  `face.out_dim` is forced to the LLM width. trainable: parameter groups the optimiser sees
  (keys of PARAM_GROUPS; 'face_prior' is never trainable). lora_rank > 0 applies LoRA to the LLM.
  """
  llm: LlamaConfig
  vision: VisionConfig
  qformer: QFormerConfig
  compress_type: str = "mean"
  vision_select_feature: str = "patch"  # LLaMA-VID mm_vision_select_feature
  use_face: bool = True
  face_prior: str = "tiny"
  tiny_face_prior: TinyFacePriorConfig = TinyFacePriorConfig()
  facexformer: Mapping[str, Any] | None = None
  face: FaceMiningConfig = FaceMiningConfig()
  agr_template: str = AGR_TEMPLATE
  vlm_att_ln_eps: float = 1e-5
  image_token_id: int = IMAGE_TOKEN_ID
  trainable: tuple[str, ...] = DEFAULT_TRAINABLE
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] | None = None
  loss_chunk: int = DEFAULT_CHUNK  # positions per chunk of the LM-head cross entropy (`loss`)

  def __post_init__(self):
    if self.vision_select_feature not in SELECT_FEATURES:
      raise ValueError(f"vision_select_feature must be one of {SELECT_FEATURES}, got "
                       f"{self.vision_select_feature!r}")
    if self.face_prior not in FACE_PRIORS:
      raise ValueError(f"face_prior must be one of {FACE_PRIORS}, got {self.face_prior!r}")
    bad = set(self.trainable) - set(PARAM_GROUPS)
    if bad:
      raise ValueError(f"unknown trainable groups {sorted(bad)}; known: {sorted(PARAM_GROUPS)}")
    if "face_prior" in self.trainable:
      raise ValueError("the face prior is always frozen; remove 'face_prior' from trainable")
    if "lora" in self.trainable and self.lora_rank <= 0:
      raise ValueError("'lora' is trainable but lora_rank is 0 (set lora_rank > 0 or drop 'lora')")
    object.__setattr__(self, "trainable", tuple(self.trainable))
    if self.face.out_dim != self.llm.hidden_size:
      object.__setattr__(self, "face", dataclasses.replace(self.face, out_dim=self.llm.hidden_size))
    if self.use_face and self.face_prior == "tiny" and (
        self.face.face_dim != self.tiny_face_prior.feat_dim):
      raise ValueError(f"face.face_dim {self.face.face_dim} != tiny_face_prior.feat_dim "
                       f"{self.tiny_face_prior.feat_dim}")
    self.num_content_tokens  # validates compress_type

  @property
  def grid_size(self) -> int:
    return self.vision.image_size // self.vision.patch_size

  @property
  def pooled_grid(self) -> tuple[int, int]:
    """(kernel = stride, output side) of 'grid:g' pooling: LLaMA-VID's avg_pool2d with
    kernel = stride = side // g and no padding, so side // kernel outputs per axis."""
    g = int(self.compress_type.split(":")[1])
    side = self.grid_size
    if g < 1 or g > side:
      raise ValueError(f"compress_type grid:{g} needs 1 <= g <= the {side}x{side} patch grid")
    k = side // g
    return k, side // k

  @property
  def num_content_tokens(self) -> int:
    c = self.compress_type
    cls = 1 if self.vision_select_feature == "cls_patch" else 0
    if c == "mean":
      return 1
    if c == "none":
      return self.grid_size ** 2 + cls
    m = re.fullmatch(r"grid:(\d+)", c)
    if not m:
      raise ValueError(f"compress_type must be 'mean', 'none' or 'grid:g', got {c!r}")
    if cls:
      raise ValueError(f"compress_type {c!r} with vision_select_feature='cls_patch': "
                       "LLaMA-VID reshapes the 1 + side^2 tokens to a square grid, which "
                       "fails; use 'mean' or 'none', or select 'patch'")
    return self.pooled_grid[1] ** 2

  @property
  def num_face_tokens(self) -> int:
    return self.face.num_tokens if self.use_face else 0

  @property
  def tokens_per_frame(self) -> int:
    return 1 + self.num_content_tokens + self.num_face_tokens

  def replace(self, **kw) -> "EmoLlamaConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def tiny(cls, **overrides) -> "EmoLlamaConfig":
    """A few-thousand-parameter model for tests and the CPU default config (sizes are ours):
    EVA-style ViT 16 px / patch 4 (4x4 grid), 2-layer Q-Former with 4 queries, 2-layer LLaMA
    of width 32 and vocab 128, tiny face prior and 2 face tokens."""
    kw: dict[str, Any] = dict(
        llm=LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512),
        vision=VisionConfig(kind="eva", hidden_size=24, intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=2, patch_size=4,
                            image_size=16, layer_norm_eps=1e-6, hidden_act="gelu",
                            feature_layer=-1),
        qformer=QFormerConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=32,
                              max_position_embeddings=32, encoder_hidden_size=24,
                              num_query_tokens=4),
        compress_type="grid:2",
        tiny_face_prior=TinyFacePriorConfig(image_size=32, channels=(4, 8), feat_dim=8,
                                            global_grid=2),
        face=FaceMiningConfig(face_dim=8, hidden_dim=16, num_heads=2, num_tokens=2,
                              qformer_dim=16),
        lora_rank=2)
    kw.update(overrides)
    return cls(**kw)

  def to_dict(self) -> dict[str, Any]:
    return config_io.to_jsonable(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "EmoLlamaConfig":
    d = dict(d)
    sub = {"llm": LlamaConfig, "vision": VisionConfig, "qformer": QFormerConfig,
           "tiny_face_prior": TinyFacePriorConfig, "face": FaceMiningConfig}
    for k, c in sub.items():
      if k in d:
        d[k] = config_io.from_dict(c, d[k])
    if d.get("trainable") is not None:
      d["trainable"] = tuple(d["trainable"])
    if d.get("lora_targets") is not None:
      d["lora_targets"] = tuple(d["lora_targets"])
    return cls(**d)


def dummy_batch(config: EmoLlamaConfig, frames_per_sample: Sequence[int], *, num_frames: int,
                prefix_len: int = 3, answer_len: int = 4, qformer_len: int = 5,
                seed: int = 0, face: str = "crops", pixels: str = "uint8"
                ) -> dict[str, np.ndarray]:
  """A random batch in the INTERFACES.md layout (right-padded, for tests and benchmarks).

  Sample i has `frames_per_sample[i]` real frames of `num_frames`; its ids are
  `[prefix, F * tokens_per_frame image slots, answer, padding]` with loss on the answer.
  face: 'crops' (face_crops) | 'precomputed' (face_global/face_local) | 'none'.
  pixels: 'uint8' (random raw pixels, as the pipeline sends them; padding frames black) |
    'float32' (random already-normalised values; padding frames zero).
  """
  rng = np.random.default_rng(seed)
  b, f, tpf = len(frames_per_sample), num_frames, config.tokens_per_frame
  if not all(1 <= n <= f for n in frames_per_sample):
    raise ValueError(f"frames_per_sample {frames_per_sample} must be in [1, {f}]")
  if pixels not in ("uint8", "float32"):
    raise ValueError(f"pixels must be 'uint8' or 'float32', got {pixels!r}")

  def images(shape):
    if pixels == "uint8":
      return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.normal(size=shape).astype(np.float32)

  vocab = config.llm.vocab_size
  s = config.vision.image_size
  frame_mask = np.arange(f)[None] < np.asarray(frames_per_sample)[:, None]
  frames = images((b, f, s, s, 3)) * frame_mask[..., None, None, None]
  lengths = [prefix_len + f * tpf + answer_len - (i % 2) for i in range(b)]
  t = max(lengths)
  input_ids = np.zeros((b, t), np.int32)
  attention_mask = np.zeros((b, t), np.int32)
  loss_mask = np.zeros((b, t), np.int32)
  for i, n in enumerate(lengths):
    ids = rng.integers(3, vocab, size=n)
    ids[prefix_len:prefix_len + f * tpf] = config.image_token_id
    input_ids[i, :n] = ids
    attention_mask[i, :n] = 1
    slots = prefix_len + np.arange(f * tpf)
    attention_mask[i, slots[~np.repeat(frame_mask[i], tpf)]] = 0
    loss_mask[i, prefix_len + f * tpf + 1:n] = 1
  qids = rng.integers(1, config.qformer.vocab_size, size=(b, qformer_len)).astype(np.int32)
  qmask = np.ones((b, qformer_len), np.int32)
  qmask[1::2, -2:] = 0
  qids[qmask == 0] = 0
  batch = dict(frames=frames, frame_mask=frame_mask, qformer_ids=qids, qformer_mask=qmask,
               input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
               label=np.full((b,), -1, np.int32))
  if face == "crops":
    fs = config.tiny_face_prior.image_size
    batch["face_crops"] = images((b, f, fs, fs, 3))
  elif face == "precomputed":
    cf = config.face.face_dim
    batch["face_global"] = rng.normal(size=(b, f, 4, cf)).astype(np.float32)
    batch["face_local"] = rng.normal(size=(b, f, 68, cf)).astype(np.float32)
  elif face != "none":
    raise ValueError(f"face must be 'crops', 'precomputed' or 'none', got {face!r}")
  return batch


# ----------------------------------------------------------------------------- filters


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def _group_filter(group: str):
  pattern = re.compile(PARAM_GROUPS[group])

  def f(path, value) -> bool:
    if not isinstance(value, nnx.Param) or not pattern.search(_path_str(path)):
      return False
    is_lora = isinstance(value, nnx.LoRAParam)
    if group == "lora":
      return is_lora
    return not is_lora if group == "llm" else True
  return f


def group_filter(group: str):
  """nnx filter `(path, variable) -> bool` selecting the parameters of one PARAM_GROUPS group."""
  if group not in PARAM_GROUPS:
    raise ValueError(f"unknown group {group!r}; known: {sorted(PARAM_GROUPS)}")
  return _group_filter(group)


def trainable_filter(config: EmoLlamaConfig):
  """nnx filter selecting exactly the parameters of `config.trainable` (for nnx.split / grads)."""
  filters = [_group_filter(g) for g in config.trainable]

  def f(path, value) -> bool:
    return any(g(path, value) for g in filters)
  return f


def param_groups(model: nnx.Module) -> dict[str, list[str]]:
  """Every parameter path of `model`, by group (a path outside all groups is an error)."""
  out: dict[str, list[str]] = {g: [] for g in PARAM_GROUPS}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    hits = [g for g in PARAM_GROUPS if _group_filter(g)(path, var)]
    if not hits:
      raise ValueError(f"parameter {_path_str(path)} belongs to no group")
    for g in hits:
      out[g].append(_path_str(path))
  return out


# ----------------------------------------------------------------------------- modules


class MMProjector(Module):
  """LLaMA-VID `mlp2x_gelu`: Linear(Cv -> D), exact GELU, Linear(D -> D)."""

  def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
    self.linear_1 = nnx.Linear(d_in, d_out, rngs=rngs,
                               kernel_metadata={"out_sharding": ("vit_embed", "embed")})
    self.linear_2 = nnx.Linear(d_out, d_out, rngs=rngs,
                               kernel_metadata={"out_sharding": ("embed", "embed")})

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


def _build_face_prior(config: EmoLlamaConfig, rngs: nnx.Rngs):
  if not config.use_face or config.face_prior == "precomputed":
    return None
  if config.face_prior == "tiny":
    return TinyFacePrior(config.tiny_face_prior, rngs=rngs)
  cfg = facexformer.FaceXFormerConfig(**dict(config.facexformer or {}))
  if cfg.feature_dim != config.face.face_dim:
    raise ValueError(f"face.face_dim {config.face.face_dim} != FaceXFormer feature width "
                     f"{cfg.feature_dim}")
  return facexformer.FaceXFormer(cfg, rngs=rngs)


class EmoLlama(Module):
  """The whole EMO-LLaMA model. Parameter names follow LLaMA-VID (`vlm_att_*`, `mm_projector`)."""

  def __init__(self, config: EmoLlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    cv = config.vision.hidden_size
    d = config.llm.hidden_size
    qd = config.qformer.hidden_size
    self.vision_tower = VisionTransformer(config.vision, rngs=rngs)
    self.vlm_att_encoder = QFormerModel(config.qformer, rngs=rngs)
    self.vlm_att_query = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, config.qformer.num_query_tokens, qd),
                                 config.qformer.param_dtype),
        out_sharding=(None, None, "qformer_embed"))
    enc = config.qformer.encoder_hidden_size
    # LLaMA-VID: a ViT whose width is not the Q-Former's cross-attention width (EVA-G 1408)
    # is mapped by vlm_att_bert_proj before vlm_att_ln.
    self.vlm_att_bert_proj = nnx.Linear(
        cv, enc, rngs=rngs, kernel_metadata={"out_sharding": ("vit_embed", None)}
    ) if enc != cv else None
    self.vlm_att_ln = nnx.LayerNorm(enc, epsilon=config.vlm_att_ln_eps, rngs=rngs,
                                    scale_metadata={"out_sharding": ("norm",)},
                                    bias_metadata={"out_sharding": ("norm",)})
    self.vlm_att_projector = nnx.Linear(
        qd, cv, rngs=rngs, kernel_metadata={"out_sharding": ("qformer_embed", "vit_embed")})
    self.vlm_att_key_projector = nnx.Linear(
        cv, cv, rngs=rngs, kernel_metadata={"out_sharding": ("vit_embed", "vit_embed")})
    self.vlm_att_val_projector = nnx.Linear(
        cv, d, rngs=rngs, kernel_metadata={"out_sharding": ("vit_embed", "embed")})
    self.mm_projector = MMProjector(cv, d, rngs=rngs)
    self.face_prior = _build_face_prior(config, rngs)
    self.face_mining = FaceInfoMining(config.face, rngs=rngs) if config.use_face else None
    self.language_model = LlamaForCausalLM(config.llm, rngs=rngs)
    if config.lora_rank > 0:
      kw = {} if config.lora_targets is None else {"targets": config.lora_targets}
      lora.apply_lora(self.language_model, rank=config.lora_rank, alpha=config.lora_alpha,
                      rngs=rngs, **kw)

  # -- per-frame visual tokens -------------------------------------------------------------

  def qformer_queries(self, feats: jax.Array, qformer_ids: jax.Array,
                      qformer_mask: jax.Array) -> jax.Array:
    """Q-Former query outputs [N, Q, 768] for ViT features [N, 1+P, Cv] and text [N, Tq]."""
    n = feats.shape[0]
    query = jnp.broadcast_to(self.vlm_att_query[...], (n,) + self.vlm_att_query.shape[1:])
    mask = jnp.concatenate([jnp.ones((n, query.shape[1]), qformer_mask.dtype), qformer_mask], 1)
    if self.vlm_att_bert_proj is not None:
      feats = self.vlm_att_bert_proj(feats)
    return self.vlm_att_encoder(query, qformer_ids, mask, self.vlm_att_ln(feats))

  def context_token(self, text_q: jax.Array, patches: jax.Array) -> jax.Array:
    """LLaMA-VID context token: text_q [N, Q, Cv], patches [N, P, Cv] -> [N, 1, D]."""
    keys = self.vlm_att_key_projector(patches)
    scores = jnp.einsum("nqc,npc->nqp", text_q, keys, preferred_element_type=jnp.float32)
    att = jax.nn.softmax(scores / np.sqrt(patches.shape[-1]), axis=-1)
    ctx = jnp.einsum("nqp,npc->nqc", att.astype(patches.dtype), patches).mean(axis=1)
    return self.vlm_att_val_projector(ctx)[:, None]

  def content_tokens(self, patches: jax.Array) -> jax.Array:
    """compress_type pooling of the patch grid, then mm_projector: [N, P, Cv] -> [N, n, D]."""
    cfg = self.config
    n, p, c = patches.shape
    if cfg.compress_type == "mean":
      pooled = patches.mean(axis=1, keepdims=True)
    elif cfg.compress_type == "none":
      pooled = patches
    else:
      side = int(round(p ** 0.5))
      if side * side != p:
        raise ValueError(f"{p} patches do not form a square grid")
      k, g = cfg.pooled_grid  # avg_pool2d(kernel=stride=k): the last side % k rows/cols drop
      grid = patches.reshape(n, side, side, c)[:, :g * k, :g * k]
      pooled = grid.reshape(n, g, k, g, k, c).mean(axis=(2, 4)).reshape(n, g * g, c)
    return self.mm_projector(pooled)

  def vision_inputs(self, frames) -> jax.Array:
    """`batch['frames']` as ViT input: uint8 pixels are CLIP-normalised here (in the vision
    compute dtype), floating ones are already normalised (emo_jax.models.pixels)."""
    return pixels_lib.normalize_vit(frames, self.config.vision.dtype)

  def face_inputs(self, crops) -> jax.Array:
    """`batch['face_crops']` as face-prior input: uint8 pixels are ImageNet-normalised here
    (float32), floating ones are already normalised (emo_jax.models.pixels)."""
    return pixels_lib.normalize_face(crops)

  def face_priors(self, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    """(global [N, G, Cf], local [N, L, Cf]) from precomputed priors or the frozen prior net."""
    if "face_global" in batch and "face_local" in batch:
      g, loc = batch["face_global"], batch["face_local"]
      g = g.reshape((-1,) + g.shape[2:])
      loc = loc.reshape((-1,) + loc.shape[2:])
    elif "face_crops" in batch and self.face_prior is not None:
      crops = self.face_inputs(batch["face_crops"])
      priors: FacePriors = self.face_prior(crops.reshape((-1,) + crops.shape[2:]))
      g, loc = priors.global_feats, priors.local_feats
    else:
      raise ValueError("face tokens need `face_crops` (with a face prior network) or precomputed "
                       "`face_global` and `face_local` in the batch")
    # The face prior is always frozen (EMO-LLaMA): no gradient flows into it.
    return jax.lax.stop_gradient(g), jax.lax.stop_gradient(loc)

  def encode_frames(self, batch: Mapping[str, Any], feats: jax.Array | None = None
                    ) -> jax.Array:
    """Visual tokens [B, N * F * tokens_per_frame, D] in slot order (padding frames included;
    N = 1 for `qformer_ids` [B, Tq], else its turn axis).

    `feats`: the vision tower's features [B*F, 1+P, Cv] when already computed (e.g. by the
    AU head's shared forward, emo_jax.models.au_former); None runs the tower here.
    """
    cfg = self.config
    frames = self.vision_inputs(batch["frames"])
    b, f = frames.shape[:2]
    if feats is None:
      feats = self.vision_tower(frames.reshape((b * f,) + frames.shape[2:]))
    if "vision" not in cfg.trainable:
      feats = jax.lax.stop_gradient(feats)
    qids = jnp.asarray(batch["qformer_ids"])
    qmask = jnp.asarray(batch["qformer_mask"])
    turns = 1 if qids.ndim == 2 else qids.shape[1]
    qids = qids.reshape(b, turns, -1)
    qmask = qmask.reshape(b, turns, -1)
    # Rows in (sample, turn, frame) order; the ViT features are shared by a sample's turns.

    def per_turn(x):  # [b*f, ...] -> [b*turns*f, ...] (a sample's frames for each turn)
      if turns == 1:
        return x
      x = x.reshape((b, 1, f) + x.shape[1:])
      return jnp.broadcast_to(x, (b, turns, f) + x.shape[3:]).reshape((-1,) + x.shape[3:])

    feats_t = per_turn(feats)
    qids = jnp.repeat(qids, f, axis=1).reshape(b * turns * f, -1)
    qmask = jnp.repeat(qmask, f, axis=1).reshape(b * turns * f, -1)
    q_out = self.qformer_queries(feats_t, qids, qmask)
    text_q = self.vlm_att_projector(q_out)
    keep_cls = cfg.vision_select_feature == "cls_patch"
    patches = feats if keep_cls else feats[:, 1:]
    patches_t = feats_t if keep_cls else feats_t[:, 1:]
    context = self.context_token(text_q, patches_t)  # [b*turns*f, 1, D]
    content = self.content_tokens(patches)  # [b*f, n, D], the same for every turn
    parts = [context, per_turn(content)]
    if cfg.use_face:
      g, loc = self.face_priors(batch)
      if g.shape[0] != b * f:
        raise ValueError(f"face priors for {g.shape[0]} frames, expected {b * f}")
      if cfg.face.query_mode == "qformer":
        parts.append(self.face_mining(per_turn(g), per_turn(loc), q_out))
      else:
        parts.append(per_turn(self.face_mining(g, loc, None)))
    dtype = cfg.llm.dtype
    tokens = jnp.concatenate([p.astype(dtype) for p in parts], axis=1)
    tokens = tokens.reshape(b, turns * f * cfg.tokens_per_frame, -1)
    return constrain(tokens, ("batch", "length", "embed"))

  # -- LLM inputs ----------------------------------------------------------------------------

  def _check_slots(self, input_ids, num_frames: int, turns: int = 1) -> None:
    if isinstance(input_ids, jax.core.Tracer):
      return
    counts = (np.asarray(input_ids) == self.config.image_token_id).sum(axis=1)
    want = num_frames * self.config.tokens_per_frame
    bad = [i for i, c in enumerate(counts) if c % want or c > turns * want]
    if bad:
      raise ValueError(f"samples {bad} have {counts[bad].tolist()} image slots; expected "
                       f"{want} (= {num_frames} frames x {self.config.tokens_per_frame} tokens) "
                       f"per visual block, at most {turns} blocks, or 0")

  def embed_multimodal(self, batch: Mapping[str, Any], visual: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """(inputs_embeds [B, T, D], attention_mask [B, T]) with visual tokens in their slots.

    `visual` [B, F * tokens_per_frame, D]: visual tokens already made by `encode_frames`
    (e.g. one encoding shared by several answers to the same media); then only
    `input_ids`, `attention_mask` and `frame_mask` of `batch` are read."""
    cfg = self.config
    input_ids = batch["input_ids"]
    frame_mask = jnp.asarray(batch["frame_mask"]).astype(bool)
    num_frames = frame_mask.shape[1]
    if visual is not None:
      turns = visual.shape[1] // (num_frames * cfg.tokens_per_frame)
    else:
      qids = batch["qformer_ids"]
      turns = 1 if len(qids.shape) == 2 else qids.shape[1]
    self._check_slots(input_ids, num_frames, turns)
    input_ids = jnp.asarray(input_ids)
    attention_mask = jnp.asarray(batch["attention_mask"])
    if visual is None:
      visual = self.encode_frames(batch)
    is_img = input_ids == cfg.image_token_id
    text = self.language_model.model.embed_tokens(jnp.where(is_img, 0, input_ids))
    slot = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, visual.shape[1] - 1)
    gathered = jnp.take_along_axis(visual, slot[..., None], axis=1).astype(text.dtype)
    frame = (slot // cfg.tokens_per_frame) % num_frames  # visual block n holds frames 0..F-1
    real = jnp.take_along_axis(frame_mask, frame, axis=1) & is_img
    embeds = jnp.where(is_img[..., None], jnp.where(real[..., None], gathered, 0), text)
    mask = attention_mask * jnp.where(is_img & ~real, 0, 1).astype(attention_mask.dtype)
    return constrain(embeds, ("batch", "length", "embed")), mask

  def agr_sentences(self, batch: Mapping[str, Any], media: str | Sequence[str] = "image"
                    ) -> list[str]:
    """AGR sentence per sample (config template) from the face prior run on `face_crops`,
    logits averaged over the real frames: the host-side prior pass for the user prompt."""
    if self.face_prior is None:
      raise ValueError("no face prior network in this model (face_prior='precomputed' or "
                       "use_face=False): take the AGR predictions from the precomputed priors")
    crops = self.face_inputs(batch["face_crops"])
    b, f = crops.shape[:2]
    priors = self.face_prior(crops.reshape((b * f,) + crops.shape[2:])).reshape_frames(b, f)
    return face_lib.agr_sentences(priors, batch.get("frame_mask"), self.config.agr_template,
                                  media)

  # -- outputs -----------------------------------------------------------------------------

  def __call__(self, batch: Mapping[str, Any]) -> jax.Array:
    """fp32 logits [B, T, V] (meaningless at masked positions)."""
    embeds, mask = self.embed_multimodal(batch)
    return self.language_model(inputs_embeds=embeds, attention_mask=mask)

  def loss(self, batch: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean NLL over `loss_mask` tokens (token t is predicted from logits at t-1).

    aux: `num_tokens`, `accuracy` (greedy next-token accuracy on those tokens), `nll_sum`.
    """
    embeds, mask = self.embed_multimodal(batch)
    h, _ = self.language_model.model(inputs_embeds=embeds, attention_mask=mask)
    input_ids = jnp.asarray(batch["input_ids"])
    weights = jnp.asarray(batch["loss_mask"])[:, 1:].astype(jnp.float32)
    targets = jnp.where(weights > 0, input_ids[:, 1:], 0)
    # Chunked LM-head cross entropy: the [B, T, V] logits are never materialised.
    nll_sum, correct = self.language_model.cross_entropy(h[:, :-1], targets, weights,
                                                         chunk=self.config.loss_chunk)
    count = weights.sum()
    denom = jnp.maximum(count, 1.0)
    return nll_sum / denom, {"num_tokens": count, "accuracy": correct / denom, "nll_sum": nll_sum}

  def generate(self, batch: Mapping[str, Any], *, max_new_tokens: int, eos_token_id,
               pad_token_id: int, sampling=None, rng=None) -> jax.Array:
    """Generated ids int32 [B, max_new_tokens] from a left-padded multimodal prompt."""
    embeds, mask = self.embed_multimodal(batch)
    kw = {} if sampling is None else {"sampling": sampling}
    return generation.generate(self.language_model, inputs_embeds=embeds, attention_mask=mask,
                               max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id, rng=rng, **kw)
