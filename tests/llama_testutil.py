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
