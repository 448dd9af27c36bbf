"""Import a whole LLaMA-VID checkpoint into `EmoLlama`.

Checkpoint facts (docs/CHECKPOINTS.md, "LLaMA-VID"):
- LLM: standard HF LLaMA keys (`model.embed_tokens`, `model.layers.N.*`, `model.norm`,
  `lm_head`), read by `emo_jax.convert.llama_hf.load_llama` from the same directory.
- Q-Former: `model.vlm_att_encoder.bert.*` (LAVIS/BERT names) + `model.vlm_att_query`
  [1, Q, 768], read by `vision_hf.qformer_from_state_dict`.
- `model.vlm_att_ln` (LayerNorm over the ViT width, present for `bert_type` containing
  'pretrain'), `model.vlm_att_projector` (768 -> Cv), `model.vlm_att_key_projector` (Cv -> Cv),
  `model.vlm_att_val_projector` (Cv -> D), `model.mm_projector.{0,2}` (mlp2x_gelu).
- Vision tower: LLaMA-VID loads it separately (`config.mm_vision_tower`, the LAVIS
  `eva_vit_g.pth`; pass it as `vision_path`); when the shards carry the in-memory copy
  `model.vision_tower.vision_tower.*` we use it. That copy holds the 39 blocks LAVIS built, so
  all its blocks are used; from the 40-block LAVIS file the last block is dropped (eva.py).
- config.json: `mm_hidden_size`, `num_query`, `compress_type` (None = all patches, 'mean',
  'grid:g'), `bert_type`, `mm_projector_type`, `mm_vision_select_feature`, plus the LLaMA
  fields (legacy `rope_scaling`).
- Variants, as upstream runs them: `model.vlm_att_bert_proj` (Linear vision width -> the
  Q-Former's 1408, present when `mm_hidden_size` != 1408) maps the ViT features before
  `vlm_att_ln`; `mm_vision_select_feature='cls_patch'` keeps CLS for the context / content
  tokens (with 'mean' or all patches; upstream's grid reshape fails with it, refused);
  `grid:g` that does not divide the patch grid pools as avg_pool2d does (remainder dropped).
  Refused, naming the field: `compress_type='grid:1'` (upstream asserts g > 1), a CLIP
  `mm_vision_tower` (only EVA-ViT-G is read), other `bert_type` / `mm_projector_type`.

A directory written by `save_llama_vid` (emo_jax.convert.llama_vid_export) carries an
`emo_jax` entry in config.json (our whole config) and the face modules under `emo_jax.*`:
they are restored too, so save -> load gives the same numbers.

Weights are read from safetensors (single, or sharded with `model.safetensors.index.json`);
LLaMA-VID's released pickled `pytorch_model-*.bin` shards need `allow_pickle=True`.
The face modules (not in LLaMA-VID) and LoRA adapters start from a fresh initialisation.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.convert.eva import eva_config_from_state_dict, eva_from_state_dict, load_eva_vit
from emo_jax.convert.llama_hf import load_llama
from emo_jax.convert.safetensors_io import CheckpointError, CheckpointReader
from emo_jax.convert.vision_hf import qformer_config_from_state_dict, qformer_from_state_dict
from emo_jax.models import lora
from emo_jax.models.emo_llama import EmoLlama, EmoLlamaConfig, _build_face_prior
from emo_jax.models.face import FaceInfoMining

log = logging.getLogger(__name__)

QFORMER_PREFIX = "model.vlm_att_encoder.bert."
QUERY_KEY = "model.vlm_att_query"
VISION_PREFIX = "model.vision_tower.vision_tower."
# LLaMA-VID name -> our module attribute (Linear / LayerNorm weights).
PROJECTORS = {
  "model.vlm_att_ln": ("vlm_att_ln",),
  "model.vlm_att_projector": ("vlm_att_projector",),
  "model.vlm_att_key_projector": ("vlm_att_key_projector",),
  "model.vlm_att_val_projector": ("vlm_att_val_projector",),
  "model.mm_projector.0": ("mm_projector", "linear_1"),
  "model.mm_projector.2": ("mm_projector", "linear_2"),
}
BERT_PROJ = "model.vlm_att_bert_proj"
EMO_PREFIX = "emo_jax."  # face modules of an emo_jax export (save_llama_vid), our layout
# EmoLlamaConfig fields an emo_jax export's `emo_jax` config entry restores (the rest is read
# from the LLaMA-VID fields and tensor shapes).
_EMO_FIELDS = ("use_face", "face_prior", "tiny_face_prior", "facexformer", "face",
               "agr_template", "vlm_att_ln_eps", "image_token_id", "trainable", "loss_chunk")
_LLM_KEY = re.compile(r"^(lm_head\.|model\.(embed_tokens|layers|norm)\.)|rotary_emb\.inv_freq$")


def compress_type_from_config(hf: dict[str, Any]) -> str:
  """LLaMA-VID `compress_type` (None / 'mean' / 'grid:g') -> ours ('none' / 'mean' / 'grid:g')."""
  c = hf.get("compress_type")
  if c is None:
    return "none"
  m = re.fullmatch(r"grid:(\d+)", str(c))
  if m and int(m.group(1)) <= 1:
    raise CheckpointError(f"config.json compress_type {c!r}: LLaMA-VID asserts a grid larger "
                          "than 1 (token_generation), so no LLaMA-VID model runs with it")
  if c == "mean" or m:
    return str(c)
  raise CheckpointError(f"config.json compress_type {c!r} is not supported ('mean', 'grid:g' "
                        "or null)")


def _check_hf_config(hf: dict[str, Any]) -> None:
  proj = hf.get("mm_projector_type", "mlp2x_gelu")
  if proj != "mlp2x_gelu":
    raise CheckpointError(f"mm_projector_type {proj!r} is not supported (only mlp2x_gelu)")
  bert = hf.get("bert_type", "qformer_pretrain")
  if "qformer" not in bert or "pretrain" not in bert:
    raise CheckpointError(f"bert_type {bert!r} is not supported: only the Q-Former variants with "
                          "vlm_att_ln ('qformer_pretrain*') that the released models use")
  sel = hf.get("mm_vision_select_feature", "patch")
  if sel not in ("patch", "cls_patch"):
    raise CheckpointError(f"config.json mm_vision_select_feature {sel!r} is not supported "
                          "('patch' or 'cls_patch', as LLaMA-VID)")
  tower = str(hf.get("mm_vision_tower") or "")
  if "openai" in tower.lower() or "laion" in tower.lower():
    raise CheckpointError(f"config.json mm_vision_tower {tower!r} is a CLIP tower; this importer "
                          "reads LLaMA-VID's EVA-ViT-G (LAVIS) tower only")


def _linear_params(reader: CheckpointReader, name: str, module: Any, what: str) -> dict:
  """Arrays for one Linear / LayerNorm from `name.weight` / `name.bias`, checked for shape."""
  w, b = reader.get(name + ".weight"), reader.get(name + ".bias")
  if isinstance(module, nnx.LayerNorm):
    vals = {"scale": np.asarray(w), "bias": np.asarray(b)}
  else:
    vals = {"kernel": np.asarray(w).T, "bias": np.asarray(b)}
  for k, arr in vals.items():
    want = getattr(module, k).shape
    if tuple(arr.shape) != tuple(want):
      raise CheckpointError(f"{what}: {name}.{'weight' if k != 'bias' else 'bias'} has shape "
                            f"{arr.shape} (ours {k} {want})")
  return vals


def load_llama_vid(path: str, *, dtype: Any = jnp.float32, allow_pickle: bool = False,
                   vision_path: str | None = None, qformer_num_heads: int | None = None,
                   vision_num_heads: int | None = None, seed: int = 0,
                   **config_overrides) -> EmoLlama:
  """A LLaMA-VID checkpoint directory -> `EmoLlama` with the same numbers.

  config_overrides go to `EmoLlamaConfig` (e.g. `use_face`, `face`, `face_prior`, `lora_rank`,
  `trainable`, or `compress_type`, which defaults to the checkpoint's); parts absent from LLaMA-VID (face modules, LoRA) are initialised from `seed`.
  `qformer_num_heads` / `vision_num_heads` are needed because head counts are not in the
  tensor shapes (default: an emo_jax export's saved counts, else BERT-base 12 and EVA-ViT-G's
  width / 88).
  """
  p = Path(path)
  cfg_file = p / "config.json"
  if not cfg_file.exists():
    raise CheckpointError(f"{cfg_file} not found (expected a LLaMA-VID model directory)")
  hf = json.loads(cfg_file.read_text())
  _check_hf_config(hf)
  reader = CheckpointReader(p, allow_pickle=allow_pickle)
  what = f"LLaMA-VID checkpoint {p}"
  saved = _emo_config(hf, what)
  if qformer_num_heads is None:
    qformer_num_heads = saved.qformer.num_attention_heads if saved is not None else 12
  if vision_num_heads is None and saved is not None:
    vision_num_heads = saved.vision.num_attention_heads

  llm = load_llama(p, dtype=dtype, allow_pickle=allow_pickle)

  qcfg = qformer_config_from_state_dict(reader, QFORMER_PREFIX, query_tokens_key=QUERY_KEY,
                                        num_attention_heads=qformer_num_heads, dtype=dtype,
                                        param_dtype=dtype)
  if "num_query" in hf and hf["num_query"] != qcfg.num_query_tokens:
    raise CheckpointError(f"{what}: config num_query={hf['num_query']} but "
                          f"{QUERY_KEY} holds {qcfg.num_query_tokens} queries")
  qformer = qformer_from_state_dict(reader, qcfg, prefix=QFORMER_PREFIX,
                                    query_tokens_key=QUERY_KEY, what=what)

  if any(k.startswith(VISION_PREFIX) for k in reader.keys()):
    vcfg = eva_config_from_state_dict(reader, VISION_PREFIX, num_attention_heads=vision_num_heads,
                                      feature_layer=-1, dtype=dtype, param_dtype=dtype)
    vision = eva_from_state_dict(reader, vcfg, prefix=VISION_PREFIX, what=what)
  elif vision_path is not None:
    vision = load_eva_vit(vision_path, dtype=dtype, allow_pickle=allow_pickle,
                          num_attention_heads=vision_num_heads)
  else:
    raise CheckpointError(f"{what} carries no vision tower; pass vision_path= the LAVIS "
                          f"eva_vit_g weights (config mm_vision_tower: "
                          f"{hf.get('mm_vision_tower')!r})")
  mm_hidden = hf.get("mm_hidden_size")
  if mm_hidden is not None and mm_hidden != vision.cfg.hidden_size:
    raise CheckpointError(f"{what}: mm_hidden_size {mm_hidden} != vision width "
                          f"{vision.cfg.hidden_size}")

  has_proj = BERT_PROJ + ".weight" in reader
  if has_proj == (qcfg.encoder_hidden_size == vision.cfg.hidden_size):
    raise CheckpointError(
        f"{what}: the Q-Former cross-attends to width {qcfg.encoder_hidden_size}, the vision "
        f"tower is {vision.cfg.hidden_size} wide, and {BERT_PROJ} is "
        f"{'present' if has_proj else 'absent'}: LLaMA-VID has it exactly when they differ")

  kw = {"compress_type": compress_type_from_config(hf), "use_face": False, "lora_rank": 0,
        "trainable": ("qformer", "projectors"),
        "vision_select_feature": hf.get("mm_vision_select_feature", "patch")}
  if saved is not None:
    kw.update({k: getattr(saved, k) for k in _EMO_FIELDS})
  if config_overrides.get("compress_type", kw["compress_type"]) != kw["compress_type"]:
    log.warning("%s was trained with compress_type %r; using %r", what, kw["compress_type"],
                config_overrides["compress_type"])
  kw.update(config_overrides)
  try:
    config = EmoLlamaConfig(llm=llm.config, vision=vision.cfg, qformer=qcfg, **kw)
  except ValueError as e:
    raise CheckpointError(f"{what}: {e}") from e
  model = assemble(config, seed=seed, vision_tower=vision, vlm_att_encoder=qformer.qformer,
                   vlm_att_query=qformer.query_tokens, language_model=llm)
  projectors = dict(PROJECTORS)
  if has_proj:
    projectors[BERT_PROJ] = ("vlm_att_bert_proj",)
  for name, attrs in projectors.items():
    module = model
    for a in attrs:
      module = getattr(module, a)
    for k, arr in _linear_params(reader, name, module, what).items():
      var = getattr(module, k)
      var.set_value(jnp.asarray(arr, dtype=var.dtype))

  emo_keys = {k for k in reader.keys() if k.startswith(EMO_PREFIX)}
  if emo_keys:
    _load_emo_parts(model, reader, emo_keys, what)
  used = {k for k in reader.keys()
          if _LLM_KEY.search(k) or k.startswith((QFORMER_PREFIX, VISION_PREFIX)) or k == QUERY_KEY
          or any(k in (n + ".weight", n + ".bias") for n in projectors)} | emo_keys
  left = sorted(set(reader.keys()) - used)
  if left:
    raise CheckpointError(f"{what}: {len(left)} tensors not understood (first: {left[:5]}); "
                          "a LLaMA-VID variant this importer does not support?")
  check_concrete(model)
  return model


def _emo_config(hf: dict[str, Any], what: str) -> EmoLlamaConfig | None:
  entry = hf.get("emo_jax")
  if entry is None:
    return None
  if not isinstance(entry, dict) or entry.get("format") != "emo_jax.llama_vid_export":
    raise CheckpointError(f"{what}: config.json 'emo_jax' entry is not an emo_jax export")
  if entry.get("version") != 1:
    raise CheckpointError(f"{what}: emo_jax export version {entry.get('version')} (this code "
                          "reads 1)")
  return EmoLlamaConfig.from_dict(entry["config"])


def _load_emo_parts(model: EmoLlama, reader: CheckpointReader, keys: set[str],
                    what: str) -> None:
  """Face modules of an emo_jax export (`emo_jax.{face_mining,face_prior}.<our path>`)."""
  from emo_jax.convert.bundle import _array_variables  # pylint: disable=g-import-not-at-top
  want = set()
  for part in ("face_mining", "face_prior"):
    module = getattr(model, part, None)
    if module is None:
      continue
    for p, var in _array_variables(module):
      name = EMO_PREFIX + part + "." + ".".join(str(getattr(x, "key", x)) for x in p)
      want.add(name)
      if name not in keys:
        raise CheckpointError(f"{what}: missing tensor {name!r} (the face modules of the "
                              "config do not match the exported ones)")
      arr = reader.get(name)
      if tuple(arr.shape) != tuple(var.get_value().shape):
        raise CheckpointError(f"{what}: {name} has shape {tuple(arr.shape)}, the config gives "
                              f"{tuple(var.get_value().shape)}")
      var.set_value(jnp.asarray(np.asarray(arr), dtype=var.get_value().dtype))
  left = sorted(keys - want)
  if left and want:
    raise CheckpointError(f"{what}: {len(left)} emo_jax tensors the config does not have "
                          f"(first: {left[:5]})")
  if left:
    log.warning("%s: %d face-module tensors left aside (use_face=False)", what, len(left))


def assemble(config: EmoLlamaConfig, *, seed: int = 0, **parts: Any) -> EmoLlama:
  """An `EmoLlama(config)` whose submodules / variables named in `parts` are the given ones.

  The rest is built abstractly (no memory) and then: face modules get a real fresh init from
  `seed`, LoRA (config.lora_rank > 0) is applied to the given LLM; the projectors must be set
  by the caller (they are left abstract and `check_concrete` catches any that are not).
  """
  base = config.replace(lora_rank=0, trainable=tuple(t for t in config.trainable if t != "lora"))
  model = nnx.eval_shape(lambda: EmoLlama(base, rngs=nnx.Rngs(seed)))
  for name, value in parts.items():
    if not hasattr(model, name):
      raise ValueError(f"EmoLlama has no part {name!r}")
    setattr(model, name, value)
  rngs = nnx.Rngs(seed)
  if config.use_face and "face_mining" not in parts:
    model.face_mining = FaceInfoMining(config.face, rngs=rngs)
  if "face_prior" not in parts:
    model.face_prior = _build_face_prior(config, rngs)
  if config.lora_rank > 0:
    kw = {} if config.lora_targets is None else {"targets": config.lora_targets}
    lora.apply_lora(model.language_model, rank=config.lora_rank, alpha=config.lora_alpha,
                    rngs=rngs, **kw)
  model.config = config
  return model


def check_concrete(model: nnx.Module) -> None:
  """Raise if any variable of `model` is still abstract (a ShapeDtypeStruct)."""
  bad = [".".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(model))
         if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  if bad:
    raise CheckpointError(f"parameters never loaded: {bad[:10]}")
