"""Public Hugging Face interop API (a facade over the per-model converters).

    from emo_jax.convert import hf
    model = hf.load_llama(path, dtype=jnp.float32)
    hf.save_llama(model, out_dir); hf.save_peft_adapter(model, adapter_dir)
    vit = hf.load_clip_vision(path); qformer = hf.load_instructblip_qformer(path)
    hf.save_llama_vid(emo_model, out_dir); emo_model = hf.load_llama_vid(out_dir)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from emo_jax._lazy import lazy_exports

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

if TYPE_CHECKING:  # the names for type checkers and IDEs; loaded lazily at run time
  from emo_jax.convert.bundle import load_bundle, save_bundle
  from emo_jax.convert.eva import load_eva_vit
  from emo_jax.convert.llama_hf import load_llama, load_peft_adapter, save_llama, save_peft_adapter
  from emo_jax.convert.llama_vid import load_llama_vid
  from emo_jax.convert.vision_hf import load_clip_vision, load_instructblip_qformer


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
