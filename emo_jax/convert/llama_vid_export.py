"""Export an `EmoLlama` as a checkpoint directory in LLaMA-VID's released layout.

    from emo_jax.convert import hf
    hf.save_llama_vid(model, out_dir)          # config.json + safetensors shards
    again = hf.load_llama_vid(out_dir)         # the same numbers

What is written (the layout `emo_jax.convert.llama_vid` reads; docs/LLAMA_VID_EXPORT.md says
what LLaMA-VID's own code needs besides):
- `config.json`: the LLaMA fields (legacy `rope_theta` / `rope_scaling` too),
  `architectures=['LlavaLlamaAttForCausalLM']`, `model_type='llava'`, and the fields
  LLaMA-VID reads: `mm_vision_tower`, `image_processor`, `mm_hidden_size`,
  `mm_projector_type='mlp2x_gelu'`, `mm_vision_select_feature`, `mm_vision_select_layer`,
  `mm_use_im_start_end=False`, `mm_use_im_patch_token=False`, `bert_type='qformer_pretrain'`,
  `num_query`, `compress_type` (null for all patches), `image_aspect_ratio`, `max_token`,
  `use_mm_proj`; plus an `emo_jax` entry with our whole `EmoLlamaConfig` (LLaMA-VID ignores it;
  our loader takes the face-module config from it).
- `model.safetensors` (or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`),
  torch layouts ([out, in] Linear weights) and LLaMA-VID's key names: the LLM
  (`model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head`) with LoRA merged into
  its base weights, `model.vlm_att_encoder.bert.*` (LAVIS/BERT names), `model.vlm_att_query`,
  `model.vlm_att_{ln,projector,key_projector,val_projector}`, `model.vlm_att_bert_proj` when
  the model has one, `model.mm_projector.{0,2}`, and the EVA tower as the trainer saves its
  in-memory copy, `model.vision_tower.vision_tower.*` in the LAVIS `eva_vit_g` names (the
  built blocks only). EMO-LLaMA's face modules (not part of LLaMA-VID) go under `emo_jax.*`
  in our own layout; LLaMA-VID's loader leaves unknown keys aside.

Each tensor keeps its dtype unless `dtype` is given. Refused, with the field named: a CLIP
vision tower (LLaMA-VID's CLIP path feeds the Q-Former without CLS, which ours does not),
`compress_type='grid:1'` (LLaMA-VID asserts a grid larger than 1).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx

from emo_jax.convert import eva as eva_lib
from emo_jax.convert.llama_hf import _base_tensors
from emo_jax.convert.llama_vid import (BERT_PROJ, EMO_PREFIX, PROJECTORS, QFORMER_PREFIX,
                                       QUERY_KEY, VISION_PREFIX)
from emo_jax.convert.safetensors_io import CheckpointError, write_sharded_safetensors
from emo_jax.models.emo_llama import EmoLlama

Tensor = tuple[str, tuple[int, ...], np.dtype, Any]  # (name, shape, dtype, fetch)



def _ours(hf_name: str) -> str:
  """An EVA block parameter's HF-style name -> ours (norm weights are scales, linear kernels)."""
  stem, _, leaf = hf_name.rpartition(".")
  if leaf != "weight":
    return hf_name
  return f"{stem}.{'scale' if stem.startswith('layer_norm') else 'kernel'}"


# Our EVA block names -> LAVIS (q/k/v are fused into attn.qkv.weight separately): the
# importer's table, inverted.
_EVA_BLOCK = {_ours(hf): lavis for lavis, hf in eva_lib.BLOCK_MAP.items()}
DEFAULT_VISION_TOWER = "./model_zoo/LAVIS/eva_vit_g.pth"


def _dotted(path) -> str:
  return ".".join(str(getattr(p, "key", p)) for p in path)


def _host(x: Any, dtype: np.dtype | None) -> np.ndarray:
  a = np.asarray(jax.device_get(x))
  return a if dtype is None else a.astype(dtype)


def _torch_leaf(name: str, value: Any, dtype) -> Tensor:
  """One of our leaves -> torch name/layout: kernel -> weight (transposed; conv kernels
  [kh, kw, in, out] -> [out, in, kh, kw]), scale / embedding -> weight."""
  stem, _, leaf = name.rpartition(".")
  stem = stem + "." if stem else ""
  shape = tuple(value.shape)
  out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(value.dtype)
  if leaf == "kernel":
    if len(shape) == 2:
      return f"{stem}weight", shape[::-1], out_dtype, lambda: _host(value, dtype).T
    if len(shape) == 4:
      return (f"{stem}weight", (shape[3], shape[2], shape[0], shape[1]), out_dtype,
              lambda: _host(value, dtype).transpose(3, 2, 0, 1))
    raise CheckpointError(f"{name}: a {len(shape)}-d kernel has no torch layout here")
  if leaf in ("scale", "embedding"):
    return f"{stem}weight", shape, out_dtype, lambda: _host(value, dtype)
  return name, shape, out_dtype, lambda: _host(value, dtype)


def _params(module: nnx.Module) -> Iterator[tuple[str, Any]]:
  for p, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    yield _dotted(p), var.get_value()


def _vision_tensors(model: EmoLlama, dtype) -> list[Tensor]:
  vcfg = model.config.vision
  if vcfg.kind != "eva":
    raise CheckpointError(
        f"vision.kind {vcfg.kind!r}: only an EVA-ViT-G (LAVIS) tower can be written in the "
        "LLaMA-VID layout (LLaMA-VID's CLIP towers feed the Q-Former without CLS)")
  flat = dict(_params(model.vision_tower))
  # Scanned stacks [L, ...] -> per-layer names.
  per_layer: dict[str, Any] = {}
  for name, value in flat.items():
    if vcfg.scan_layers and name.startswith("encoder.layers.") and not re.match(
        r"encoder\.layers\.\d+\.", name):
      rest = name[len("encoder.layers."):]
      for i in range(value.shape[0]):
        per_layer[f"encoder.layers.{i}.{rest}"] = value[i]
    else:
      per_layer[name] = value
  out: list[Tensor] = []
  used = set()

  def emit(name, key, shape, fetch, value_dtype):
    out.append((VISION_PREFIX + key, shape,
                np.dtype(dtype) if dtype is not None else np.dtype(value_dtype), fetch))
    used.add(name)

  c = vcfg.hidden_size
  v = per_layer["embeddings.class_embedding"]
  emit("embeddings.class_embedding", "cls_token", (1, 1, c),
       lambda v=v: _host(v, dtype).reshape(1, 1, -1), v.dtype)
  v = per_layer["embeddings.position_embedding.embedding"]
  emit("embeddings.position_embedding.embedding", "pos_embed", (1,) + tuple(v.shape),
       lambda v=v: _host(v, dtype)[None], v.dtype)
  for ours, lavis in (("embeddings.patch_embedding.kernel", "patch_embed.proj.weight"),
                      ("embeddings.patch_embedding.bias", "patch_embed.proj.bias")):
    _, shape, _, fetch = _torch_leaf(ours, per_layer[ours], dtype)
    emit(ours, lavis, shape, fetch, per_layer[ours].dtype)
  for i in range(vcfg.num_used_layers):
    b = f"encoder.layers.{i}."
    q, k, vv = (per_layer[b + f"self_attn.{n}_proj.kernel"] for n in "qkv")
    emit(b + "self_attn.q_proj.kernel", f"blocks.{i}.attn.qkv.weight", (3 * c, c),
         lambda q=q, k=k, vv=vv: np.concatenate([_host(x, dtype).T for x in (q, k, vv)]),
         q.dtype)
    used.update({b + "self_attn.k_proj.kernel", b + "self_attn.v_proj.kernel"})
    for ours, lavis in _EVA_BLOCK.items():
      _, shape, _, fetch = _torch_leaf(b + ours, per_layer[b + ours], dtype)
      emit(b + ours, f"blocks.{i}.{lavis}", shape, fetch, per_layer[b + ours].dtype)
  left = sorted(set(per_layer) - used)
  if left:
    raise CheckpointError(f"vision tower parameters with no LAVIS EVA name: {left[:5]}")
  return out


def _projector_tensors(model: EmoLlama, dtype) -> list[Tensor]:
  names = dict(PROJECTORS)
  if model.vlm_att_bert_proj is not None:
    names[BERT_PROJ] = ("vlm_att_bert_proj",)
  out = []
  for name, attrs in names.items():
    module = model
    for a in attrs:
      module = getattr(module, a)
    for leaf, value in _params(module):
      key, shape, dt, fetch = _torch_leaf(leaf, value, dtype)
      out.append((f"{name}.{key}", shape, dt, fetch))
  return out


def _qformer_tensors(model: EmoLlama, dtype) -> list[Tensor]:
  out = []
  for name, value in _params(model.vlm_att_encoder):
    key, shape, dt, fetch = _torch_leaf(name, value, dtype)
    out.append((QFORMER_PREFIX + key, shape, dt, fetch))
  q = model.vlm_att_query.get_value()
  out.append((QUERY_KEY, tuple(q.shape), np.dtype(dtype or q.dtype),
              lambda q=q: _host(q, dtype)))
  return out


def _emo_tensors(model: EmoLlama) -> list[Tensor]:
  """Face modules (EMO-LLaMA's, not LLaMA-VID's), in our layout under `emo_jax.`."""
  from emo_jax.convert.bundle import _array_variables  # pylint: disable=g-import-not-at-top
  out = []
  for part in ("face_mining", "face_prior"):
    module = getattr(model, part, None)
    if module is None:
      continue
    for p, var in _array_variables(module):
      val = var.get_value()
      out.append((f"{EMO_PREFIX}{part}.{_dotted(p)}", tuple(val.shape), np.dtype(val.dtype),
                  lambda v=val: _host(v, None)))
  return out


def llama_vid_config(model: EmoLlama, *, vision_tower: str = DEFAULT_VISION_TOWER,
                     image_processor: str | None = None, image_aspect_ratio: str = "pad",
                     dtype: Any = None) -> dict[str, Any]:
  """config.json of the export (see the module docstring)."""
  cfg = model.config
  m = re.fullmatch(r"grid:(\d+)", cfg.compress_type)
  if m and int(m.group(1)) <= 1:
    raise CheckpointError(f"compress_type {cfg.compress_type!r}: LLaMA-VID asserts a grid "
                          "larger than 1; 'mean' computes the same pooling")
  hf = cfg.llm.to_hf_dict()
  if dtype is not None:
    hf["torch_dtype"] = np.dtype(dtype).name
  hf["dtype"] = hf.get("torch_dtype")
  size = cfg.vision.image_size
  hf.update(
      architectures=["LlavaLlamaAttForCausalLM"], model_type="llava",
      mm_vision_tower=vision_tower,
      image_processor=image_processor or f"./llamavid/processor/clip-patch14-{size}",
      mm_hidden_size=cfg.vision.hidden_size, mm_projector_type="mlp2x_gelu",
      mm_vision_select_feature=cfg.vision_select_feature, mm_vision_select_layer=-2,
      mm_use_im_start_end=False, mm_use_im_patch_token=False, use_mm_proj=True,
      tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False,
      bert_type="qformer_pretrain", num_query=cfg.qformer.num_query_tokens,
      compress_type=None if cfg.compress_type == "none" else cfg.compress_type,
      image_aspect_ratio=image_aspect_ratio, max_token=cfg.llm.max_position_embeddings,
      emo_jax={"format": "emo_jax.llama_vid_export", "version": 1,
               "config": cfg.replace(lora_rank=0, trainable=tuple(
                   t for t in cfg.trainable if t != "lora")).to_dict()})
  return hf


def save_llama_vid(model: EmoLlama, path: str | os.PathLike, *,
                   vision_tower: str = DEFAULT_VISION_TOWER, image_processor: str | None = None,
                   image_aspect_ratio: str = "pad", dtype: Any = None,
                   max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Write `model` as a LLaMA-VID checkpoint directory; returns the weight file names.

  Args:
    model: the EmoLlama (LoRA adapters, if any, are merged into the written LLM weights; the
      model itself is not changed).
    path: output directory (created).
    vision_tower: config `mm_vision_tower`, the LAVIS `eva_vit_g.pth` path LLaMA-VID's code
      loads the tower from (the tower is frozen, so the original file holds these weights).
    image_processor: config `image_processor` (default LLaMA-VID's
      `./llamavid/processor/clip-patch14-{image_size}`).
    image_aspect_ratio: config `image_aspect_ratio` ('pad' as LLaMA-VID; the pipeline's
      `aspect`).
    dtype: cast every LLaMA-VID tensor to this dtype (default: each keeps its own).
    max_shard_bytes: shard size above which the weights are split.
  """
  out = Path(path)
  hf = llama_vid_config(model, vision_tower=vision_tower, image_processor=image_processor,
                        image_aspect_ratio=image_aspect_ratio, dtype=dtype)
  tensors = list(_base_tensors(model.language_model, dtype))
  tensors += _qformer_tensors(model, dtype)
  tensors += _projector_tensors(model, dtype)
  tensors += _vision_tensors(model, dtype)
  tensors += _emo_tensors(model)
  names = [t[0] for t in tensors]
  if len(set(names)) != len(names):
    raise CheckpointError("duplicate tensor names in the LLaMA-VID export")
  out.mkdir(parents=True, exist_ok=True)
  files = write_sharded_safetensors(out, tensors, max_shard_bytes=max_shard_bytes)
  (out / "config.json").write_text(json.dumps(hf, indent=2))
  return files
