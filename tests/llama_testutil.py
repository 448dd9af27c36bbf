"""Helpers for the LLaMA tests: tiny random HF reference models saved to a directory."""
from __future__ import annotations

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_hf(path=None, seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
  """A random fp32 HF LlamaForCausalLM (norm scales randomised too); saved to `path` if given."""
  cfg = transformers.LlamaConfig(**{**TINY, **overrides})
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.02 * torch.randn_like(p))
  if path is not None:
    model.save_pretrained(path)
  return model


def hf_logits(model, ids, mask=None, position_ids=None) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long),
                attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask)),
                position_ids=None if position_ids is None else torch.as_tensor(
                  np.asarray(position_ids), dtype=torch.long))
  return out.logits.float().numpy()


def left_padded_batch(rng: np.random.RandomState, lengths, total: int, vocab: int, pad: int = 0):
  ids = np.full((len(lengths), total), pad, np.int32)
  mask = np.zeros((len(lengths), total), np.int32)
  for i, n in enumerate(lengths):
    ids[i, total - n:] = rng.randint(3, vocab, n)
    mask[i, total - n:] = 1
  return ids, mask


def masked_lm_loss(logits, input_ids, loss_mask):
  """Mean next-token cross entropy over positions whose target has loss_mask 1."""
  import jax
  import jax.numpy as jnp
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  tgt = input_ids[:, 1:]
  nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
  w = loss_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def make_lora_train_step(graphdef, tx):
  """A pure jitted-able LoRA step: (trainable, frozen, opt_state, batch) -> new state, loss."""
  import jax
  import optax
  from flax import nnx

  def step(trainable, frozen, opt_state, batch):
    def loss_fn(tr):
      model = nnx.merge(graphdef, tr, frozen)
      logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
      return masked_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss
  return step
