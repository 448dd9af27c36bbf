"""Hugging Face / PEFT interop for `LlamaForCausalLM`.

- `load_llama(path, dtype=...)`: an HF LLaMA directory (config.json + model.safetensors, or
  sharded safetensors with model.safetensors.index.json; pickled .bin only with
  `allow_pickle=True`) -> emo_jax model. Tensors are read one at a time from memory-mapped files,
  cast to the target dtype and placed on device (sharded when `mesh` and `rules` are given), so
  the host never holds two copies of the model.
- `save_llama(model, path)`: config.json + safetensors (sharded above `max_shard_bytes`) that
  `transformers.AutoModelForCausalLM.from_pretrained` loads; LoRA updates are merged on the fly
  (the model passed in is not modified).
- `save_peft_adapter(model, path)` / `load_peft_adapter(model, path)`: PEFT LoRA adapters
  (adapter_config.json + adapter_model.safetensors, keys
  `base_model.model.<module path>.lora_{A,B}.weight`, A as [r, in], B as [out, r]).

Name mapping (one table): our parameter path equals the HF key with `kernel` -> `weight`
(transposed: nnx kernels are [in, out], torch weights [out, in]) and `embedding` -> `weight`.
With `scan_layers` the `model.layers.<i>.` prefix becomes a leading stacked axis.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.convert.safetensors_io import (CheckpointError, CheckpointReader,
                                            check_float_tensor, read_json_object,
                                            write_safetensors, write_sharded_safetensors)
from emo_jax.models.llama import LlamaConfig, LlamaForCausalLM
from emo_jax.models.lora import LoRALinear, apply_lora, lora_modules
from emo_jax.sharding import state_shardings

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Keys in LLaMA-family checkpoints that are not LLM weights we hold (buffers, vision towers,
# projectors of multimodal checkpoints, the face modules of an emo_jax LLaMA-VID export).
# Anything else unused is an error.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$|^model\.(mm_projector|vision_tower|vlm_att)"
                      r"|^model\.(vlm_|mm_)|^emo_jax\.")


def _path_str(path) -> str:
  return ".".join(str(p) for p in path)


def _hf_key(path: tuple) -> tuple[str, bool]:
  """HF key of one of our (unstacked) parameter paths, and whether it is transposed."""
  name = _path_str(path)
  if name.endswith(".kernel"):
    return name[:-len("kernel")] + "weight", True
  if name.endswith(".embedding"):
    return name[:-len("embedding")] + "weight", False
  return name, False


def _is_stacked(path: tuple, cfg: LlamaConfig) -> bool:
  return cfg.scan_layers and len(path) > 2 and path[0] == "model" and path[1] == "layers"


def _layer_path(path: tuple, i: int) -> tuple:
  return path[:2] + (i,) + path[2:]


def read_config(path: str | os.PathLike, **overrides) -> LlamaConfig:
  """The LlamaConfig of an HF directory; CheckpointError naming the file (and the field)
  for a config.json that is not JSON, not an object, or has a field we cannot honour."""
  cfg_file = Path(path) / "config.json"
  d = read_json_object(cfg_file, "an HF model directory's config.json")
  try:
    return LlamaConfig.from_hf_dict(d, **overrides)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{cfg_file}: {e}") from None


def load_llama(path: str | os.PathLike, dtype: Any = jnp.float32, *, param_dtype: Any = None,
               mesh: jax.sharding.Mesh | None = None, rules=None, allow_pickle: bool = False,
               scan_layers: bool = False, remat_policy: str = "none",
               **config_overrides) -> LlamaForCausalLM:
  """Load an HF LLaMA directory into a `LlamaForCausalLM`.

  `dtype` is the compute dtype and, unless `param_dtype` is given, the storage dtype too.
  With `mesh` and `rules` every weight is created directly with its NamedSharding.
  """
  if (mesh is None) != (rules is None):
    raise ValueError("pass both mesh and rules, or neither")
  cfg = read_config(path, dtype=dtype, param_dtype=param_dtype or dtype,
                    scan_layers=scan_layers, remat_policy=remat_policy, **config_overrides)
  reader = CheckpointReader(path, allow_pickle=allow_pickle)
  abstract = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shardings = state_shardings(state, mesh, rules) if mesh is not None else None
  flat_shardings = dict(shardings.flat_state()) if shardings is not None else {}
  used: set[str] = set()

  def fetch(key: str, shape: tuple[int, ...], transpose: bool) -> np.ndarray:
    if key not in reader:
      raise CheckpointError(f"{path}: missing tensor {key!r}")
    arr = check_float_tensor(reader.get(key), key, path)
    arr = arr.T if transpose else arr
    if tuple(arr.shape) != tuple(shape):
      raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(arr.shape)} "
                            f"(after transpose: {transpose}), expected {tuple(shape)}")
    used.add(key)
    return arr

  for p, var in state.flat_state():
    if not isinstance(var, nnx.Param):
      raise TypeError(f"unexpected non-parameter state at {_path_str(p)}")
    abs_val = var.get_value()
    shape, target = tuple(abs_val.shape), abs_val.dtype
    if _is_stacked(p, cfg):
      host = np.empty(shape, target)
      for i in range(shape[0]):
        key, tr = _hf_key(_layer_path(p, i))
        host[i] = fetch(key, shape[1:], tr).astype(target)
    else:
      key, tr = _hf_key(p)
      host = fetch(key, shape, tr).astype(target)
    sharding = flat_shardings.get(p)
    if sharding is not None:
      sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
      value = jax.make_array_from_callback(shape, sharding, lambda idx, h=host: h[idx])
    else:
      value = jax.device_put(host)
    var.set_value(value)
    del host

  unused = [k for k in reader.keys() if k not in used]
  if cfg.tie_word_embeddings:
    unused = [k for k in unused if k != "lm_head.weight"]
  ignored = [k for k in unused if _IGNORED.match(k)]
  bad = [k for k in unused if k not in ignored]
  if bad:
    raise CheckpointError(f"{path}: {len(bad)} tensors do not fit the LLaMA config "
                          f"(first: {bad[:5]}); wrong num_hidden_layers or not a LLaMA model?")
  if ignored:
    log.info("load_llama: ignored %d non-LLM tensors (e.g. %s)", len(ignored), ignored[:3])
  return nnx.merge(graphdef, state)


def _lora_by_kernel_path(model: nnx.Module) -> dict[str, LoRALinear]:
  return {f"{p}.kernel": m for p, m in lora_modules(model)}


def _base_tensors(model: LlamaForCausalLM, dtype: Any = None,
                  ) -> Iterator[tuple[str, tuple[int, ...], Any, Any]]:
  """(hf key, shape, dtype, fetch) for every base weight, LoRA merged, in HF layout."""
  cfg = model.config
  loras = _lora_by_kernel_path(model)
  state = nnx.state(model, nnx.Not(nnx.LoRAParam))
  for p, var in state.flat_state():
    if not isinstance(var, nnx.Param):
      continue
    name = _path_str(p)
    lora = loras.get(name)
    value = lora.merged_kernel if lora is not None else var.get_value
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(var.get_value().dtype)
    shape = tuple(var.get_value().shape)
    if _is_stacked(p, cfg):
      for i in range(shape[0]):
        key, tr = _hf_key(_layer_path(p, i))
        s = shape[1:][::-1] if tr else shape[1:]
        yield key, s, out_dtype, (lambda v=value, i=i, tr=tr, d=out_dtype:
                                  _host(v()[i], tr, d))
    else:
      key, tr = _hf_key(p)
      s = shape[::-1] if tr else shape
      yield key, s, out_dtype, (lambda v=value, tr=tr, d=out_dtype: _host(v(), tr, d))


def _host(x: Any, transpose: bool, dtype: np.dtype) -> np.ndarray:
  a = np.asarray(jax.device_get(x)).astype(dtype)
  return a.T if transpose else a


def save_llama(model: LlamaForCausalLM, path: str | os.PathLike, *,
               max_shard_bytes: int = 5 * 2**30, dtype: Any = None) -> list[str]:
  """Write an HF `LlamaForCausalLM` directory; returns the weight file names."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  cfg = model.config
  hf = cfg.to_hf_dict()
  if dtype is not None:
    hf["torch_dtype"] = np.dtype(dtype).name
  hf["dtype"] = hf["torch_dtype"]
  with open(path / "config.json", "w") as f:
    json.dump(hf, f, indent=2)
  return write_sharded_safetensors(path, _base_tensors(model, dtype),
                                   max_shard_bytes=max_shard_bytes)


def _lora_entries(model: nnx.Module) -> list[tuple[str, LoRALinear, int | None]]:
  """(HF module path, module, layer index for stacked modules) of every LoRA module."""
  cfg = getattr(model, "config", None)
  out = []
  for p, m in lora_modules(model):
    parts = tuple(int(x) if x.isdigit() else x for x in p.split("."))
    if cfg is not None and _is_stacked(parts + ("kernel",), cfg):
      for i in range(m.lora_a[...].shape[0]):
        out.append((_path_str(_layer_path(parts, i)), m, i))
    else:
      out.append((p, m, None))
  return out


def save_peft_adapter(model: nnx.Module, path: str | os.PathLike, *,
                      base_model_name_or_path: str | None = None) -> None:
  """Export the LoRA weights as a PEFT adapter that `peft.PeftModel.from_pretrained` loads."""
  entries = _lora_entries(model)
  if not entries:
    raise ValueError("the model has no LoRA modules (call apply_lora first)")
  ranks = {m.rank for _, m, _ in entries}
  alphas = {m.alpha for _, m, _ in entries}
  drops = {(m.dropout.rate if m.dropout is not None else 0.0) for _, m, _ in entries}
  if len(ranks) > 1 or len(alphas) > 1:
    raise ValueError(f"PEFT export needs one rank/alpha for all modules, got {ranks}/{alphas}")
  paths = [p for p, _, _ in entries]
  names = sorted({p.rsplit(".", 1)[-1] for p in paths})
  all_linear = [_path_str(pp) for pp, mm in _iter_linear_like(model)]
  covered = {p for p in all_linear if p.rsplit(".", 1)[-1] in names}
  # PEFT matches a list by module-name suffix and a string as a full-match regex.
  targets: Any = names if covered == set(paths) else "|".join(re.escape(p) for p in paths)
  config = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ranks.pop(), "lora_alpha": alphas.pop(),
    "lora_dropout": max(drops), "target_modules": targets, "bias": "none",
    "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    "use_rslora": False, "use_dora": False, "modules_to_save": None,
    "base_model_name_or_path": base_model_name_or_path,
  }
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  with open(path / ADAPTER_CONFIG, "w") as f:
    json.dump(config, f, indent=2)
  tensors = []
  for p, m, i in entries:
    for which, var in (("lora_A", m.lora_a), ("lora_B", m.lora_b)):
      shape = tuple(var[...].shape[-2:])[::-1]
      dt = np.dtype(var[...].dtype)
      tensors.append((f"{PEFT_PREFIX}{p}.{which}.weight", shape, dt,
                      lambda v=var, i=i, d=dt: _host(v[...] if i is None else v[...][i], True, d)))
  write_safetensors(path / ADAPTER_WEIGHTS, tensors, {"format": "pt"})


def _iter_linear_like(model: nnx.Module):
  it = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
  return [(p, m) for p, m in it if isinstance(m, (nnx.Linear, LoRALinear))]


def load_peft_adapter(model: nnx.Module, path: str | os.PathLike, *,
                      allow_pickle: bool = False, rngs: nnx.Rngs | None = None) -> nnx.Module:
  """Apply a PEFT LoRA adapter directory to `model` (in place; returns it)."""
  path = Path(path)
  cfg_file = path / ADAPTER_CONFIG
  if not cfg_file.exists():
    raise CheckpointError(f"{cfg_file} not found")
  acfg = read_json_object(cfg_file, "a PEFT adapter_config.json")
  if acfg.get("peft_type", "LORA") != "LORA":
    raise CheckpointError(f"only LORA adapters are supported, got {acfg.get('peft_type')}")
  for unsupported in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                      "modules_to_save"):
    if acfg.get(unsupported):
      raise CheckpointError(f"adapter option {unsupported}={acfg[unsupported]!r} is unsupported")
  if acfg.get("bias", "none") != "none":
    raise CheckpointError(f"adapter bias={acfg['bias']!r} is unsupported")
  weights = path / ADAPTER_WEIGHTS
  reader = CheckpointReader(weights if weights.exists() else path, allow_pickle=allow_pickle)
  pat = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
  tensors: dict[str, dict[str, str]] = {}
  for k in reader.keys():
    mt = pat.match(k)
    if mt is None:
      raise CheckpointError(f"{path}: unexpected adapter tensor {k!r}")
    tensors.setdefault(mt.group(1), {})[mt.group(2)] = k
  cfg = getattr(model, "config", None)
  stacked = cfg is not None and cfg.scan_layers
  if stacked:
    module_paths = sorted({re.sub(r"^model\.layers\.\d+\.", "model.layers.", p)
                           for p in tensors})
  else:
    module_paths = sorted(tensors)
  apply_lora(model, rank=int(acfg["r"]), alpha=float(acfg["lora_alpha"]),
             targets=[re.escape(p) for p in module_paths],
             dropout=float(acfg.get("lora_dropout") or 0.0), rngs=rngs)
  for p, m, i in _lora_entries(model):
    if p not in tensors or set(tensors[p]) != {"A", "B"}:
      raise CheckpointError(f"{path}: adapter lacks lora_A/lora_B for {p}")
    for which, var in (("A", m.lora_a), ("B", m.lora_b)):
      arr = check_float_tensor(reader.get(tensors[p][which]), tensors[p][which], path).T
      cur = var[...]
      want = cur.shape[-2:]
      if arr.shape != want:
        raise CheckpointError(f"{path}: {tensors[p][which]} has shape {arr.shape[::-1]}, "
                              f"expected {want[::-1]}")
      arr = jnp.asarray(arr.astype(cur.dtype))
      var.set_value(arr if i is None else cur.at[i].set(arr))
  return model
