"""Export / reload a whole `EmoLlama` as a self-describing bundle (our format).

Layout of a bundle directory:
- `emo_llama_config.json`: `{"format": "emo_jax.emo_llama", "version": 1, "config": ...}` with
  `EmoLlamaConfig.to_dict()` (all sub-configs, dtypes as names);
- `model.safetensors` (or HF-style shards `model-0000i-of-0000n.safetensors` +
  `model.safetensors.index.json` above `max_shard_bytes`): every array variable of the model
  (parameters, LoRA factors, buffers such as FaceXFormer's), named by its dotted NNX path
  (e.g. `language_model.model.layers.0.self_attn.q_proj.kernel`), in our layout (kernels are
  [in, out], not transposed to torch's [out, in]).

Reloading builds the model abstractly from the config (no random init), fills every variable,
and refuses missing, unexpected or mis-shaped tensors, so reload gives identical outputs.
For the Hugging Face / PEFT export of the LLM see `emo_jax.convert.llama_hf`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.convert.safetensors_io import (SAFE_SINGLE, CheckpointError, CheckpointReader,
                                            is_float_dtype, read_json_object,
                                            write_sharded_safetensors)
from emo_jax.models.emo_llama import EmoLlama, EmoLlamaConfig

CONFIG_NAME = "emo_llama_config.json"
FORMAT = "emo_jax.emo_llama"
VERSION = 1


def _name(path) -> str:
  return ".".join(str(getattr(p, "key", p)) for p in path)


def _array_variables(model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
  """Every array-valued variable except RNG state (not part of a trained model)."""
  out = []
  for path, var in nnx.to_flat_state(nnx.state(model)):
    if isinstance(var, nnx.RngState):
      continue
    out.append((path, var))
  return out


def save_bundle(model: EmoLlama, path: str | os.PathLike, *,
                max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Write config JSON + safetensors for `model`; returns the weight file names."""
  out = Path(path)
  out.mkdir(parents=True, exist_ok=True)
  tensors = []
  for p, var in _array_variables(model):
    val = var.get_value()
    fetch = lambda v=val: np.asarray(jax.device_get(v))  # noqa: E731
    tensors.append((_name(p), tuple(val.shape), np.dtype(val.dtype), fetch))
  names = write_sharded_safetensors(out, tensors, max_shard_bytes=max_shard_bytes,
                                    weights_name=SAFE_SINGLE,
                                    metadata={"format": FORMAT})
  doc = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict()}
  (out / CONFIG_NAME).write_text(json.dumps(doc, indent=2))
  return names


# Sections every bundle config has (save_bundle writes all of them); without one the
# model would silently take a default shape.
REQUIRED_SECTIONS = ("llm", "vision", "qformer", "face", "tiny_face_prior")


def read_bundle_config(path: str | os.PathLike) -> EmoLlamaConfig:
  f = Path(path) / CONFIG_NAME
  doc = read_json_object(f, "an emo_jax EmoLlama bundle config")
  if doc.get("format") != FORMAT:
    raise CheckpointError(f"{f}: format {doc.get('format')!r}, expected {FORMAT!r}")
  if doc.get("version") != VERSION:
    raise CheckpointError(f"{f}: bundle version {doc.get('version')} (this code reads {VERSION})")
  cfg = doc.get("config")
  if not isinstance(cfg, dict):
    raise CheckpointError(f"{f}: field 'config' must be an object, got {type(cfg).__name__}")
  missing = [k for k in REQUIRED_SECTIONS if not isinstance(cfg.get(k), dict)]
  if missing:
    raise CheckpointError(f"{f}: field 'config' lacks the sections {missing}")
  try:
    return EmoLlamaConfig.from_dict(cfg)
  except (TypeError, ValueError, KeyError) as e:
    raise CheckpointError(f"{f}: field 'config' does not describe a model: {e}") from None


def load_bundle(path: str | os.PathLike, **config_overrides: Any) -> EmoLlama:
  """Rebuild the `EmoLlama` saved by `save_bundle` (config_overrides: e.g. `trainable`)."""
  config = read_bundle_config(path)
  if config_overrides:
    config = config.replace(**config_overrides)
  reader = CheckpointReader(path)
  model = nnx.eval_shape(lambda: EmoLlama(config, rngs=nnx.Rngs(0)))
  expected = set()
  for p, var in nnx.to_flat_state(nnx.state(model)):
    if isinstance(var, nnx.RngState):
      raise CheckpointError(f"{_name(p)}: models with RNG state are not supported by bundles")
    name = _name(p)
    expected.add(name)
    if name not in reader:
      raise CheckpointError(f"{path}: missing tensor {name!r}")
    want = var.get_value()
    arr = reader.get(name)
    if is_float_dtype(want.dtype) != is_float_dtype(arr.dtype):
      raise CheckpointError(f"{path}: {name} is stored as {arr.dtype}, the model holds "
                            f"{want.dtype} (refusing to cast)")
    if tuple(arr.shape) != tuple(want.shape):
      raise CheckpointError(f"{path}: {name} has shape {tuple(arr.shape)}, the config gives "
                            f"{tuple(want.shape)}")
    var.set_value(jnp.asarray(np.asarray(arr), dtype=want.dtype))
  extra = sorted(set(reader.keys()) - expected)
  if extra:
    raise CheckpointError(f"{path}: {len(extra)} tensors the config does not have "
                          f"(first: {extra[:5]})")
  return model
