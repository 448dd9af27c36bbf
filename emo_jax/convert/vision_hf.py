"""Import HF `CLIPVisionModel` and InstructBLIP Q-Former weights into emo_jax modules.

Public (re-exported lazily by `emo_jax.convert.hf`):

* `load_clip_vision(path, dtype=jnp.float32, **config_overrides) -> VisionTransformer`
  from an HF directory (config.json + safetensors) of a `CLIPVisionModel` or a whole
  `CLIPModel` (its text tower is skipped, with a log line saying how many tensors).
* `load_instructblip_qformer(path, dtype=jnp.float32) -> InstructBlipQFormer`
  from an HF `InstructBlipForConditionalGeneration` directory (`qformer.*` +
  `query_tokens`), or from a directory holding only an `InstructBlipQFormerModel`
  plus a `query_tokens` tensor.

Reusable by other importers (the LLaMA-VID one maps `model.vlm_att_encoder.bert.*`
through `qformer_from_state_dict`):

* `clip_vision_from_state_dict(sd, cfg, prefix='vision_model.', dtype=...)`
* `qformer_from_state_dict(sd, cfg=None, prefix='qformer.', query_tokens_key='query_tokens', ...)`
* `qformer_config_from_state_dict(sd, prefix, ...)` (shapes -> `QFormerConfig`)
* `populate(module_factory, arrays)`: HF-named tensors -> an NNX module (transposes
  Linear/Conv weights, maps `weight` to `kernel` / `scale` / `embedding`).

`sd` is any mapping-like with `keys()` and `get(key)` / `[key]` returning numpy arrays
(a `CheckpointReader`, a dict, a torch state dict converted with `.numpy()`).
Weights are read from safetensors; pickled torch files need `allow_pickle=True`.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.convert.safetensors_io import CheckpointError, CheckpointReader
from emo_jax.models.qformer import InstructBlipQFormer, QFormerConfig
from emo_jax.models.vit import VisionConfig, VisionTransformer, interpolate_pos_embed

log = logging.getLogger(__name__)

# Buffers that HF / LAVIS checkpoints may carry and that are not parameters.
_BUFFER_RE = re.compile(r"(^|\.)(position_ids|inv_freq)$")


def _get(sd: Any, key: str) -> np.ndarray:
  arr = sd.get(key) if hasattr(sd, "get") else sd[key]
  if hasattr(arr, "detach"):  # a torch tensor
    arr = arr.detach().cpu().numpy()
  return np.asarray(arr)


def _path_str(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def _hf_to_ours(key: str, arr: np.ndarray, targets: Mapping[str, tuple]) -> tuple[str, np.ndarray]:
  """One HF-named tensor -> (our dotted path, array in our layout)."""
  stem, _, leaf = key.rpartition(".")
  if leaf == "weight":
    if f"{stem}.kernel" in targets:
      if arr.ndim == 2:  # torch Linear [out, in] -> [in, out]
        arr = arr.T
      elif arr.ndim == 4:  # torch Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
        arr = arr.transpose(2, 3, 1, 0)
      return f"{stem}.kernel", arr
    for alt in ("scale", "embedding"):
      if f"{stem}.{alt}" in targets:
        return f"{stem}.{alt}", arr
  return key, arr


def _stack_scanned(arrays: dict[str, np.ndarray], prefix: str, n: int) -> dict[str, np.ndarray]:
  """`{prefix}{i}.rest` for i < n -> `{prefix[:-1]}.rest` stacked on a leading axis."""
  pat = re.compile(re.escape(prefix) + r"(\d+)\.(.+)$")
  out, groups = {}, {}
  for k, v in arrays.items():
    m = pat.match(k)
    if m:
      groups.setdefault(m.group(2), {})[int(m.group(1))] = v
    else:
      out[k] = v
  for rest, by_layer in groups.items():
    if sorted(by_layer) != list(range(n)):
      raise CheckpointError(f"layers for {prefix}*.{rest}: have {sorted(by_layer)}, need 0..{n - 1}")
    out[prefix.rstrip(".") + "." + rest] = np.stack([by_layer[i] for i in range(n)])
  return out


def populate(module_factory: Callable[[], nnx.Module], arrays: Mapping[str, np.ndarray], *,
             what: str = "checkpoint", stack: tuple[str, int] | None = None) -> nnx.Module:
  """Build the module abstractly and fill every parameter from HF-named `arrays`.

  Raises if a parameter is missing, a tensor is left over, or a shape differs.
  `stack=(prefix, n)` stacks per-layer tensors for a scanned layer stack.
  """
  abstract = nnx.eval_shape(module_factory)
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  targets = {_path_str(p): v for p, v in flat}
  ours: dict[str, np.ndarray] = {}
  for k, arr in arrays.items():
    path, arr = _hf_to_ours(k, arr, targets if stack is None else _unstacked_names(targets, *stack))
    ours[path] = arr
  if stack is not None:
    ours = _stack_scanned(ours, *stack)
  missing = sorted(set(targets) - set(ours))
  extra = sorted(set(ours) - set(targets))
  if missing or extra:
    raise CheckpointError(f"{what}: parameters missing from the checkpoint: {missing[:20]}"
                          f"{' ...' if len(missing) > 20 else ''}; unexpected tensors: "
                          f"{extra[:20]}{' ...' if len(extra) > 20 else ''}")
  leaves = []
  for p, var in flat:
    name = _path_str(p)
    arr = ours[name]
    want = var.get_value()
    if tuple(arr.shape) != tuple(want.shape):
      raise CheckpointError(f"{what}: {name} has shape {tuple(arr.shape)}, the model expects "
                            f"{tuple(want.shape)}")
    leaves.append((p, var.replace(jnp.asarray(np.asarray(arr).astype(want.dtype)))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _unstacked_names(targets: Mapping[str, Any], prefix: str, n: int) -> dict[str, Any]:
  """Target names as they would be without scanning (for the weight -> kernel lookup)."""
  base = prefix.rstrip(".") + "."
  out = {}
  for name in targets:
    if name.startswith(base):
      rest = name[len(base):]
      for i in range(n):
        out[f"{prefix}{i}.{rest}"] = None
    else:
      out[name] = None
  return out


# ----------------------------------------------------------------------------- CLIP


def clip_vision_from_state_dict(sd: Any, cfg: VisionConfig, *, prefix: str | None = None,
                                what: str = "CLIP vision checkpoint") -> VisionTransformer:
  """HF CLIP vision tensors under `prefix` -> `VisionTransformer(cfg)` (cfg.kind == 'clip').

  `prefix=None` detects it: `vision_model.` (a `CLIPModel`, or a `CLIPVisionModel` saved
  by transformers 4) when present, else none (`CLIPVisionModel` saved by transformers 5).

  Blocks past `cfg.feature_layer` are not built, so their tensors are skipped (logged).
  Tensors outside `prefix` (a CLIPModel's text tower, projections) are skipped (logged).
  If the checkpoint's position table was trained at another `image_size` than
  `cfg.image_size`, it is resized bicubically here.
  """
  if cfg.kind != "clip":
    raise ValueError(f"clip_vision_from_state_dict needs kind='clip', got {cfg.kind!r}")
  if prefix is None:
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in sd.keys()) else ""
  n_used = cfg.num_used_layers
  layer_re = re.compile(r"encoder\.layers\.(\d+)\.")
  arrays, skipped_other, skipped_layers = {}, 0, 0
  for key in sd.keys():
    if not key.startswith(prefix):
      skipped_other += 1
      continue
    k = key[len(prefix):]
    if _BUFFER_RE.search(k):
      continue
    m = layer_re.match(k)
    if m and int(m.group(1)) >= n_used:
      if int(m.group(1)) >= cfg.num_hidden_layers:
        raise CheckpointError(f"{what}: {key} is past num_hidden_layers={cfg.num_hidden_layers}")
      skipped_layers += 1
      continue
    arrays[k] = _get(sd, key)
  if skipped_other or skipped_layers:
    log.info("%s: skipped %d tensors outside %r and %d tensors of blocks >= %d "
             "(feature_layer=%d)", what, skipped_other, prefix, skipped_layers, n_used,
             cfg.feature_layer)
  pos_key = "embeddings.position_embedding.weight"
  if pos_key in arrays:
    arrays[pos_key] = _resize_pos(arrays[pos_key], cfg)
  stack = ("encoder.layers.", n_used) if cfg.scan_layers and n_used else None
  return populate(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)), arrays, what=what,
                  stack=stack)


def _resize_pos(pos: np.ndarray, cfg: VisionConfig) -> np.ndarray:
  """Resize a [1 + g*g, C] table to cfg's grid (no-op when it already matches)."""
  g = cfg.grid_size
  if pos.shape[0] == g * g + 1:
    return pos
  out = interpolate_pos_embed(jnp.asarray(np.asarray(pos, np.float32)), (g, g))
  log.info("resized position table %s -> %s", pos.shape, out.shape)
  return np.asarray(out).astype(pos.dtype)


def _read_config(path: Path) -> dict:
  cfg_path = path / "config.json"
  if not cfg_path.exists():
    raise CheckpointError(f"{path}: no config.json")
  with open(cfg_path) as f:
    return json.load(f)


def load_clip_vision(path: str, dtype: Any = jnp.float32, *, allow_pickle: bool = False,
                     **config_overrides) -> VisionTransformer:
  """HF `CLIPVisionModel` (or `CLIPModel`) directory -> `VisionTransformer`.

  The module maps NHWC float pixels `[B, H, W, 3]` (already CLIP-normalised) to
  `[B, 1+N, C]`, equal to `CLIPVisionModel(...).last_hidden_state` with the default
  `feature_layer=-1`. `config_overrides` go to `VisionConfig` (e.g. `feature_layer=-2`,
  `image_size=336`, `scan_layers=True`); `dtype` sets both param and compute dtype.
  """
  p = Path(path)
  hf_cfg = _read_config(p)
  mt = hf_cfg.get("model_type")
  if mt not in ("clip", "clip_vision_model"):
    raise CheckpointError(f"{p}: model_type {mt!r} is not a CLIP model")
  overrides = dict(dtype=dtype, param_dtype=dtype)
  overrides.update(config_overrides)
  cfg = VisionConfig.from_hf_clip_dict(hf_cfg, **overrides)
  reader = CheckpointReader(p, allow_pickle=allow_pickle)
  return clip_vision_from_state_dict(reader, cfg, what=str(p))


# ----------------------------------------------------------------------------- Q-Former

# HF InstructBLIP spellings -> ours (BERT / LAVIS, what LLaMA-VID checkpoints use).
_QFORMER_RENAMES = (
    (re.compile(r"^embeddings\.layernorm\."), "embeddings.LayerNorm."),
    (re.compile(r"\.(attention|crossattention)\.attention\."), r".\1.self."),
)


def qformer_config_from_state_dict(sd: Any, prefix: str = "", *, num_attention_heads: int = 12,
                                   query_tokens_key: str | None = None,
                                   **overrides) -> QFormerConfig:
  """Infer a `QFormerConfig` from tensor shapes (LLaMA-VID ships no Q-Former config).

  The head count cannot be read from shapes: it is an argument (BERT-base: 12).
  """
  keys = [k[len(prefix):] for k in sd.keys() if k.startswith(prefix)]
  shape = lambda k: tuple(_get(sd, prefix + k).shape)  # noqa: E731
  layers = sorted({int(m.group(1)) for k in keys
                   if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
  if not layers:
    raise CheckpointError(f"no Q-Former layers under {prefix!r}")
  cross = [i for i in layers if f"encoder.layer.{i}.crossattention.self.key.weight" in keys
           or f"encoder.layer.{i}.crossattention.attention.key.weight" in keys]
  if not cross:
    raise CheckpointError(f"no cross-attention layers under {prefix!r}")
  freq = cross[1] - cross[0] if len(cross) > 1 else len(layers)
  if cross != list(range(0, len(layers), freq)):
    raise CheckpointError(f"cross-attention layers {cross} are not every k-th layer from 0")
  ck = next(f"encoder.layer.{cross[0]}.crossattention.{n}.key.weight" for n in ("self", "attention")
            if f"encoder.layer.{cross[0]}.crossattention.{n}.key.weight" in keys)
  vocab, hidden = shape("embeddings.word_embeddings.weight")
  kw = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(layers),
            num_attention_heads=num_attention_heads,
            intermediate_size=shape("encoder.layer.0.intermediate.dense.weight")[0],
            max_position_embeddings=shape("embeddings.position_embeddings.weight")[0],
            cross_attention_frequency=freq, encoder_hidden_size=shape(ck)[1])
  if query_tokens_key is not None and query_tokens_key in sd.keys():
    kw["num_query_tokens"] = _get(sd, query_tokens_key).shape[1]
  kw.update(overrides)
  return QFormerConfig(**kw)


def qformer_from_state_dict(sd: Any, cfg: QFormerConfig | None = None, *,
                            prefix: str = "qformer.",
                            query_tokens_key: str | None = "query_tokens",
                            dtype: Any = None, what: str = "Q-Former checkpoint",
                            ) -> InstructBlipQFormer:
  """Q-Former tensors under `prefix` (+ `query_tokens_key`) -> `InstructBlipQFormer`.

  HF InstructBLIP (`prefix='qformer.'`, `query_tokens`) and LLaMA-VID
  (`prefix='model.vlm_att_encoder.bert.'`, `query_tokens_key='model.vlm_att_query'`)
  both work. Without `query_tokens_key` the learned queries stay at their random init
  — pass `None` only when you will overwrite them (logged).
  """
  if cfg is None:
    cfg = qformer_config_from_state_dict(sd, prefix, query_tokens_key=query_tokens_key)
  if dtype is not None:
    cfg = QFormerConfig(**{**cfg.__dict__, "dtype": dtype, "param_dtype": dtype})
  arrays = {}
  for key in sd.keys():
    if not key.startswith(prefix) or key == query_tokens_key:
      continue
    k = key[len(prefix):]
    if _BUFFER_RE.search(k):
      continue
    for pat, rep in _QFORMER_RENAMES:
      k = pat.sub(rep, k)
    arrays["qformer." + k] = _get(sd, key)
  if not arrays:
    raise CheckpointError(f"{what}: no tensors under {prefix!r}")
  if query_tokens_key is None:
    log.warning("%s: no query_tokens key given; the learned queries keep their random init",
                what)
    factory = lambda: InstructBlipQFormer(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    model = nnx.eval_shape(factory)
    arrays["query_tokens"] = np.asarray(
        nnx.initializers.normal(0.02)(nnx.Rngs(0).params(), model.query_tokens.shape,
                                      cfg.param_dtype))
  else:
    if query_tokens_key not in sd.keys():
      raise CheckpointError(f"{what}: query tokens {query_tokens_key!r} not found")
    arrays["query_tokens"] = _get(sd, query_tokens_key)
  return populate(lambda: InstructBlipQFormer(cfg, rngs=nnx.Rngs(0)), arrays, what=what)


def load_instructblip_qformer(path: str, dtype: Any = jnp.float32, *,
                              allow_pickle: bool = False) -> InstructBlipQFormer:
  """HF InstructBLIP directory -> `InstructBlipQFormer`.

  Called as `(query_embeds_or_None, input_ids, attention_mask, encoder_hidden_states)`
  it returns the query outputs `[B, Q, H]`; with explicit `query_embeds` the numbers
  equal `InstructBlipQFormerModel` on the same inputs, with `None` the learned
  `query_tokens` are used. `attention_mask` may be `[B, Q+T]` (HF) or `[B, T]`.
  """
  p = Path(path)
  hf_cfg = _read_config(p)
  mt = hf_cfg.get("model_type")
  reader = CheckpointReader(p, allow_pickle=allow_pickle)
  if mt == "instructblip":
    prefix = "qformer."
    if not any(k.startswith(prefix) for k in reader.keys()):  # InstructBlipModel layout
      prefix = "model.qformer."
    qt_key = "query_tokens" if "query_tokens" in reader else "model.query_tokens"
    cfg = QFormerConfig.from_hf_dict(hf_cfg)
  elif mt == "instructblip_qformer":
    prefix, qt_key = "", "query_tokens"
    if "query_tokens" not in reader:
      raise CheckpointError(f"{p}: a bare InstructBlipQFormerModel checkpoint needs a "
                            "'query_tokens' tensor next to it")
    cfg = QFormerConfig.from_hf_dict(hf_cfg, num_query_tokens=reader.shape("query_tokens")[1])
  else:
    raise CheckpointError(f"{p}: model_type {mt!r} is not InstructBLIP")
  cfg = QFormerConfig(**{**cfg.__dict__, "dtype": dtype, "param_dtype": dtype})
  return qformer_from_state_dict(reader, cfg, prefix=prefix, query_tokens_key=qt_key,
                                 what=str(p))


# ----------------------------------------------------------------------------- in place


def _check_same_structure(src: nnx.Module, dst: nnx.Module, what: str,
                          allow_bigger: tuple[str, ...] = ()) -> None:
  s = {_path_str(p): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(src, nnx.Param))}
  d = {_path_str(p): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(dst, nnx.Param))}
  bad = sorted(k for k in set(s) | set(d)
               if s.get(k) != d.get(k) and not (k in allow_bigger and k in s and k in d))
  if bad:
    raise CheckpointError(f"{what}: checkpoint and model differ at "
                          f"{[(k, s.get(k), d.get(k)) for k in bad[:10]]}")


def copy_qformer_into(src: InstructBlipQFormer, dst_qformer: nnx.Module,
                      dst_query_tokens: nnx.Variable, *, what: str = "Q-Former") -> None:
  """Copy a loaded `InstructBlipQFormer` into a model's `QFormerModel` + query Param.

  A destination vocabulary larger than the checkpoint's (LLaMA-VID adds one token to
  InstructBLIP's 30522) keeps its initialisation for the extra rows (logged).
  """
  emb = "embeddings.word_embeddings.embedding"
  _check_same_structure(src.qformer, dst_qformer, what, allow_bigger=(emb,))
  if tuple(src.query_tokens.shape) != tuple(dst_query_tokens.shape):
    raise CheckpointError(f"{what}: query_tokens {src.query_tokens.shape} vs model "
                          f"{dst_query_tokens.shape}")
  n_src = src.qformer.embeddings.word_embeddings.embedding.shape[0]
  dst_emb = dst_qformer.embeddings.word_embeddings.embedding
  n_dst = dst_emb.shape[0]
  if n_src > n_dst:
    raise CheckpointError(f"{what}: checkpoint vocabulary {n_src} > model vocabulary {n_dst}")
  old = dst_emb[...]
  state = nnx.state(src.qformer, nnx.Param)
  nnx.update(dst_qformer, _cast_like(state, dst_qformer))
  if n_dst > n_src:
    log.info("%s: word embeddings rows %d..%d keep their initialisation", what, n_src, n_dst - 1)
    dst_emb[...] = old.at[:n_src].set(src.qformer.embeddings.word_embeddings.embedding[...]
                                      .astype(old.dtype))
  dst_query_tokens[...] = src.query_tokens[...].astype(dst_query_tokens[...].dtype)


def _cast_like(state: Any, like: nnx.Module) -> Any:
  """Cast every array in `state` to the dtype of the same parameter in `like`
  (word embeddings of another vocabulary size are left for the caller)."""
  dst = {p: v for p, v in nnx.to_flat_state(nnx.state(like, nnx.Param))}
  leaves = []
  for p, v in nnx.to_flat_state(state):
    want = dst[p].get_value()
    val = v.get_value()
    if val.shape != want.shape:  # the vocabulary case: keep the destination's array for now
      val = want
    leaves.append((p, v.replace(val.astype(want.dtype))))
  return nnx.from_flat_state(leaves)


def load_qformer_into(model: nnx.Module, path: str, *, allow_pickle: bool = False,
                      encoder_attr: str = "vlm_att_encoder",
                      query_attr: str = "vlm_att_query") -> None:
  """Overwrite `model.<encoder_attr>` (a `QFormerModel`) and `model.<query_attr>` (the
  learned queries) with an HF InstructBLIP checkpoint, in place (LLaMA-VID's own init)."""
  dst = getattr(model, encoder_attr)
  src = load_instructblip_qformer(path, dst.cfg.param_dtype, allow_pickle=allow_pickle)
  copy_qformer_into(src, dst, getattr(model, query_attr), what=str(path))


def load_clip_vision_into(module: VisionTransformer, path: str, *,
                          allow_pickle: bool = False) -> None:
  """Overwrite a CLIP `VisionTransformer` in place from an HF directory (its own config)."""
  reader = CheckpointReader(Path(path), allow_pickle=allow_pickle)
  new = clip_vision_from_state_dict(reader, module.cfg, what=str(path))
  nnx.update(module, nnx.state(new, nnx.Param))
