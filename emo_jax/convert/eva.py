"""Import EVA-ViT-G weights in the LAVIS `eva_vit_g.pth` key layout into `VisionTransformer`.

Key layout (docs/CHECKPOINTS.md, "EVA-ViT-G"): `cls_token` [1,1,C],
`pos_embed` [1,1+g*g,C], `patch_embed.proj.{weight,bias}`, and per block
`blocks.i.{norm1,norm2}`, `blocks.i.attn.qkv.weight` [3C, C] (no bias tensor),
`blocks.i.attn.{q_bias,v_bias}` (the qkv bias is cat(q_bias, 0, v_bias)),
`blocks.i.attn.proj`, `blocks.i.mlp.{fc1,fc2}`.

LLaMA-VID / LAVIS build the tower with 39 of the file's 40 blocks and take the raw
output of the last one: our default `feature_layer=-2` (all blocks but the last)
reproduces that for any depth. Blocks that are not built are skipped (logged).

Weights load from safetensors; the original `.pth` is pickled and needs
`allow_pickle=True`.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.convert.safetensors_io import CheckpointError, CheckpointReader
from emo_jax.convert.vision_hf import _get, _resize_pos, load_clip_vision_into, populate
from emo_jax.models.vit import VisionConfig, VisionTransformer

log = logging.getLogger(__name__)

EVA_G_HEAD_DIM = 88  # EVA-ViT-G: 1408 / 16 heads (checkpoint fact)

BLOCK_MAP = {
    "norm1.weight": "layer_norm1.weight", "norm1.bias": "layer_norm1.bias",
    "norm2.weight": "layer_norm2.weight", "norm2.bias": "layer_norm2.bias",
    "attn.q_bias": "self_attn.q_proj.bias", "attn.v_bias": "self_attn.v_proj.bias",
    "attn.proj.weight": "self_attn.out_proj.weight", "attn.proj.bias": "self_attn.out_proj.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_TOP_MAP = {
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
}


def eva_config_from_state_dict(sd: Any, prefix: str = "", *,
                               num_attention_heads: int | None = None,
                               **overrides) -> VisionConfig:
  """Infer an EVA `VisionConfig` from LAVIS tensor shapes.

  The head count is not in the shapes: it defaults to width / 88 (EVA-ViT-G's head
  size) and must be given for other widths. `image_size` defaults to the checkpoint's
  native one; a different value resizes the position table at load.
  """
  keys = [k[len(prefix):] for k in sd.keys() if k.startswith(prefix)]
  if "pos_embed" not in keys or "patch_embed.proj.weight" not in keys:
    raise CheckpointError(f"not an EVA/LAVIS ViT state dict under {prefix!r}: "
                          "no pos_embed / patch_embed.proj.weight")
  width, _, patch, _ = _get(sd, prefix + "patch_embed.proj.weight").shape
  n_pos = _get(sd, prefix + "pos_embed").shape[1]
  grid = int(round(math.sqrt(n_pos - 1)))
  if grid * grid != n_pos - 1:
    raise CheckpointError(f"pos_embed has {n_pos} rows, not 1 + a square grid")
  depth = len({int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))})
  if num_attention_heads is None:
    if width % EVA_G_HEAD_DIM:
      raise ValueError(f"width {width} is not a multiple of {EVA_G_HEAD_DIM}: "
                       "pass num_attention_heads")
    num_attention_heads = width // EVA_G_HEAD_DIM
  kw = dict(kind="eva", hidden_size=width, num_hidden_layers=depth,
            intermediate_size=_get(sd, prefix + "blocks.0.mlp.fc1.weight").shape[0],
            num_attention_heads=num_attention_heads, patch_size=patch,
            image_size=grid * patch, layer_norm_eps=1e-6, hidden_act="gelu", feature_layer=-2)
  kw.update(overrides)
  return VisionConfig(**kw)


def eva_from_state_dict(sd: Any, cfg: VisionConfig, *, prefix: str = "",
                        what: str = "EVA checkpoint") -> VisionTransformer:
  """LAVIS-named EVA tensors under `prefix` -> `VisionTransformer(cfg)` (kind 'eva')."""
  if cfg.kind != "eva":
    raise ValueError(f"eva_from_state_dict needs kind='eva', got {cfg.kind!r}")
  n_used = cfg.num_used_layers
  c = cfg.hidden_size
  arrays: dict[str, np.ndarray] = {}
  skipped = 0
  for key in sd.keys():
    if not key.startswith(prefix):
      continue
    k = key[len(prefix):]
    if k == "cls_token":
      arrays["embeddings.class_embedding"] = _get(sd, key).reshape(-1)
    elif k == "pos_embed":
      pos = _get(sd, key)
      arrays["embeddings.position_embedding.weight"] = _resize_pos(pos.reshape(pos.shape[-2:]),
                                                                   cfg)
    elif k in _TOP_MAP:
      arrays[_TOP_MAP[k]] = _get(sd, key)
    elif m := re.match(r"blocks\.(\d+)\.(.+)$", k):
      i, rest = int(m.group(1)), m.group(2)
      if i >= cfg.num_hidden_layers:
        raise CheckpointError(f"{what}: {key} is past num_hidden_layers={cfg.num_hidden_layers}")
      if i >= n_used:
        skipped += 1
        continue
      dst = f"encoder.layers.{i}."
      if rest == "attn.qkv.weight":
        qkv = _get(sd, key)
        if qkv.shape != (3 * c, c):
          raise CheckpointError(f"{what}: {key} has shape {qkv.shape}, expected {(3 * c, c)}")
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
          arrays[dst + f"self_attn.{name}.weight"] = qkv[j * c:(j + 1) * c]
      elif rest in BLOCK_MAP:
        arrays[dst + BLOCK_MAP[rest]] = _get(sd, key)
      else:
        raise CheckpointError(f"{what}: unexpected EVA tensor {key!r} (layer scale, relative "
                              "position bias and qkv.bias are not part of EVA-ViT-G)")
    else:
      raise CheckpointError(f"{what}: unexpected EVA tensor {key!r}")
  if skipped:
    log.info("%s: skipped %d tensors of blocks >= %d (feature_layer=%d)", what, skipped, n_used,
             cfg.feature_layer)
  stack = ("encoder.layers.", n_used) if cfg.scan_layers and n_used else None
  return populate(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)), arrays, what=what,
                  stack=stack)


def load_eva_vit(path: str, dtype: Any = jnp.float32, *, allow_pickle: bool = False,
                 prefix: str = "", num_attention_heads: int | None = None,
                 **config_overrides) -> VisionTransformer:
  """LAVIS `eva_vit_g` weights (a .safetensors file / directory, or the pickled .pth with
  `allow_pickle=True`) -> `VisionTransformer` giving the features LLaMA-VID uses.

  `config_overrides` go to `VisionConfig` (e.g. `feature_layer`, `image_size`,
  `scan_layers`); `dtype` sets both param and compute dtype.
  """
  reader = CheckpointReader(Path(path), allow_pickle=allow_pickle)
  overrides = dict(dtype=dtype, param_dtype=dtype)
  overrides.update(config_overrides)
  cfg = eva_config_from_state_dict(reader, prefix, num_attention_heads=num_attention_heads,
                                   **overrides)
  return eva_from_state_dict(reader, cfg, prefix=prefix, what=str(path))


def load_into(module: VisionTransformer, path: str, *, allow_pickle: bool = False,
              prefix: str = "") -> None:
  """Overwrite a `VisionTransformer` in place, keeping its config (feature layer, image
  size — the position table is resized if needed — scan, dtype): LAVIS EVA weights for
  `kind='eva'`, an HF CLIP directory for `kind='clip'`."""
  cfg = module.cfg
  if cfg.kind == "clip":
    load_clip_vision_into(module, path, allow_pickle=allow_pickle)
    return
  reader = CheckpointReader(Path(path), allow_pickle=allow_pickle)
  new = eva_from_state_dict(reader, cfg, prefix=prefix, what=str(path))
  nnx.update(module, nnx.state(new, nnx.Param))
