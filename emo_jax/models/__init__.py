"""emo_jax models (Flax NNX, HF-mirroring parameter names).

    from emo_jax.models import EmoLlama, EmoLlamaConfig, LlamaConfig, LlamaForCausalLM

The names below are loaded on first use, so importing one submodule does not build the
whole model zoo.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from emo_jax._lazy import lazy_exports

_EXPORTS = {
    "EmoLlama": "emo_jax.models.emo_llama",
    "EmoLlamaConfig": "emo_jax.models.emo_llama",
    "LlamaConfig": "emo_jax.models.llama",
    "LlamaForCausalLM": "emo_jax.models.llama",
    "VisionConfig": "emo_jax.models.vit",
    "VisionTransformer": "emo_jax.models.vit",
    "QFormerConfig": "emo_jax.models.qformer",
    "QFormerModel": "emo_jax.models.qformer",
    "FaceXFormer": "emo_jax.models.facexformer",
    "FaceXFormerConfig": "emo_jax.models.facexformer",
    "FacePriors": "emo_jax.models.face_prior",
    "GreedyConfig": "emo_jax.models.generation",
    "SamplingConfig": "emo_jax.models.generation",
    "generate": "emo_jax.models.generation",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
  from emo_jax.models.emo_llama import EmoLlama, EmoLlamaConfig
  from emo_jax.models.face_prior import FacePriors
  from emo_jax.models.facexformer import FaceXFormer, FaceXFormerConfig
  from emo_jax.models.generation import GreedyConfig, SamplingConfig, generate
  from emo_jax.models.llama import LlamaConfig, LlamaForCausalLM
  from emo_jax.models.qformer import QFormerConfig, QFormerModel
  from emo_jax.models.vit import VisionConfig, VisionTransformer


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
