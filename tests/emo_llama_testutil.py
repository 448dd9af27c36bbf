"""Fixtures of a tiny EmoLlama whose LoRA adapters matter (the model and post-training
tests import them: `from emo_llama_testutil import cfg, model`)."""

import jax
import pytest
from flax import nnx

from emo_jax.models.emo_llama import EmoLlama, EmoLlamaConfig


@pytest.fixture(scope="module")
def cfg() -> EmoLlamaConfig:
  return EmoLlamaConfig.tiny()


@pytest.fixture(scope="module")
def model(cfg) -> EmoLlama:   # pylint: disable=redefined-outer-name
  """EmoLlama(cfg) with non-zero LoRA B factors, so adapters change the output and
  gradients reach both factors (a fresh LoRA B is zero)."""
  m = nnx.jit(lambda: EmoLlama(cfg, rngs=nnx.Rngs(0)))()
  for path, var in nnx.to_flat_state(nnx.state(m, nnx.LoRAParam)):
    if path[-1] == "lora_b":
      var.set_value(0.05 * jax.random.normal(jax.random.key(len(path)), var.shape))
  return m
