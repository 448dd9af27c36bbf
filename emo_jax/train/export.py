"""Export a trained workdir for people who use `transformers` / `peft` / emo_jax.

    <out>/hf_llama/     the LLM as an HF LlamaForCausalLM directory (config.json +
                        safetensors), LoRA merged into the base weights;
    <out>/peft_adapter/ the LoRA weights as a PEFT adapter (adapter_config.json +
                        adapter_model.safetensors) for the un-merged base LLM
                        (only when the model has LoRA; otherwise skipped and said so);
    <out>/bundle/       the whole EMO-LLaMA (all towers, projectors, face module, LLM) as
                        the emo_jax bundle that `emo_jax.convert.bundle` reloads;
    <out>/tokenizer/    the tokenizer files the run used.
The HF LLM alone is the language half: the visual tokens come from the bundle's modules.
`out` may be a cloud URL (`gs://...`): the files are written to a local folder first and
then uploaded (input_pipeline.paths.staged_dir); the returned paths name `out`.
"""
from __future__ import annotations

import json
import os

import jax
from absl import logging
from flax import nnx

from emo_jax import dtypes
from emo_jax.convert import bundle, llama_hf
from emo_jax.models import lora
from emo_jax.train import loop
from emo_jax.train import task as task_lib
from input_pipeline import paths


def export(config, workdir: str, *, model: nnx.Module | None = None,
           out_dir: str | None = None, formats=None) -> dict:
  """Writes the formats in `formats` (default config.export.formats). Returns paths."""
  step = None
  if model is None:
    _, model, step = loop.restore_trained(config, workdir)
  out_dir = paths.resolve(out_dir or paths.join(workdir, "export"))
  formats = tuple(formats or config.export.formats)
  unknown = set(formats) - {"hf", "peft", "bundle"}
  if unknown:
    raise ValueError(f"unknown export formats {sorted(unknown)} (hf | peft | bundle)")
  dtype = dtypes.to_dtype(config.export.get("dtype", "float32"))
  out: dict[str, str | None] = {}
  if jax.process_index() != 0:
    return out
  with paths.staged_dir(out_dir) as local:
    has_lora = _write(config, workdir, model, local, formats, dtype, out)
    out = {k: v and paths.join(out_dir, os.path.relpath(v, local)) for k, v in out.items()}
    with open(os.path.join(local, "export.json"), "w") as f:
      json.dump({"step": step, "paths": out, "has_lora": has_lora}, f, indent=1)
  logging.info("exported %s to %s", sorted(k for k, v in out.items() if v), out_dir)
  return out


def _write(config, workdir, model, out_dir, formats, dtype, out) -> bool:
  """Writes the formats into the local folder `out_dir`; fills `out` with local paths."""
  llm = model.language_model
  has_lora = bool(lora.lora_modules(llm))
  if "peft" in formats:
    if has_lora:
      d = os.path.join(out_dir, "peft_adapter")
      llama_hf.save_peft_adapter(llm, d, base_model_name_or_path=config.init.get("llm") or None)
      out["peft"] = d
    else:
      logging.warning("export: the model has no LoRA (lora_rank=0): no PEFT adapter written")
      out["peft"] = None
  if "hf" in formats:
    d = os.path.join(out_dir, "hf_llama")
    llama_hf.save_llama(llm, d, dtype=dtype)   # merges LoRA into the written weights
    out["hf"] = d
  if "bundle" in formats:
    d = os.path.join(out_dir, "bundle")
    bundle.save_bundle(model, d)
    out["bundle"] = d
  tok_paths = task_lib.prepare_data(config, workdir, generate=False)
  tdir = os.path.join(out_dir, "tokenizer")
  os.makedirs(tdir, exist_ok=True)
  for p in tok_paths.values():
    paths.copy_file(p, os.path.join(tdir, paths.basename(p)))
  out["tokenizer"] = tdir
  return has_lora
