"""Public Hugging Face interop API (a facade over the per-model converters).

    from emo_jax.convert import hf
    model = hf.load_llama(path, dtype=jnp.float32)
    hf.save_llama(model, out_dir); hf.save_peft_adapter(model, adapter_dir)
    vit = hf.load_clip_vision(path); qformer = hf.load_instructblip_qformer(path)
    hf.save_llama_vid(emo_model, out_dir); emo_model = hf.load_llama_vid(out_dir)
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_llama": "emo_jax.convert.llama_hf",
    "save_llama": "emo_jax.convert.llama_hf",
    "save_peft_adapter": "emo_jax.convert.llama_hf",
    "load_peft_adapter": "emo_jax.convert.llama_hf",
    "load_clip_vision": "emo_jax.convert.vision_hf",
    "load_instructblip_qformer": "emo_jax.convert.vision_hf",
    "load_eva_vit": "emo_jax.convert.eva",
    "load_llama_vid": "emo_jax.convert.llama_vid",
    "save_llama_vid": "emo_jax.convert.llama_vid_export",
    "save_bundle": "emo_jax.convert.bundle",
    "load_bundle": "emo_jax.convert.bundle",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
