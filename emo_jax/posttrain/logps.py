"""Per-token log-probs of answers under the multimodal model, media encoded once per prompt.

A post-training batch holds the media of B prompts (`frames`, `frame_mask`, Q-Former text,
face inputs: [B, ...]) and K token sequences per prompt (`seq_input_ids`,
`seq_attention_mask`: [B, K, T]; K = 2 for a DPO pair, K = G for a GRPO group). The visual
tokens of each prompt are made once (`EmoLlama.encode_frames`) and spliced into all K of its
sequences (`EmoLlama.embed_multimodal(..., visual=...)`); the LLM then runs on the B*K rows.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

MEDIA_KEYS = ("frames", "frame_mask", "face_crops", "face_global", "face_local", "qformer_ids",
              "qformer_mask")


def media_batch(batch: Mapping[str, Any]) -> dict:
  """The media keys of a post-training batch."""
  return {k: batch[k] for k in MEDIA_KEYS if k in batch}


def hidden_states(model, batch: Mapping[str, Any], input_ids: jax.Array,
                  attention_mask: jax.Array, visual: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """(final hidden states [B*K, T, D], visual tokens [B, S, D]) for sequences [B, K, T].

  `visual`: the prompts' visual tokens if already made (else encoded here, once per
  prompt)."""
  b, k, t = input_ids.shape
  if visual is None:
    visual = model.encode_frames(media_batch(batch))
  rows = {"input_ids": input_ids.reshape(b * k, t),
          "attention_mask": attention_mask.reshape(b * k, t),
          "frame_mask": jnp.repeat(jnp.asarray(batch["frame_mask"]), k, axis=0)}
  embeds, mask = model.embed_multimodal(rows, visual=jnp.repeat(visual, k, axis=0))
  h, _ = model.language_model.model(inputs_embeds=embeds, attention_mask=mask)
  return h, visual


def token_logps(llm, h: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(targets) [N, T] (fp32) from hidden states h [N, T, D] aligned with the targets
  (for next-token prediction: h[:, :-1] and ids[:, 1:]). Negative target ids read id 0."""
  logits = llm.logits(h)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None].astype(jnp.int32),
                             axis=-1)[..., 0]


def sequence_logps(model, batch: Mapping[str, Any], visual: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum of answer-token log-probs [B, K], answer token counts [B, K], visual tokens) for the
  sequences `seq_input_ids` / `seq_attention_mask` / `seq_loss_mask` [B, K, T] (loss at t
  uses the hidden state at t - 1, as the SFT batch contract)."""
  ids = jnp.asarray(batch["seq_input_ids"])
  b, k, t = ids.shape
  h, visual = hidden_states(model, batch, ids, jnp.asarray(batch["seq_attention_mask"]), visual)
  flat = ids.reshape(b * k, t)
  w = jnp.asarray(batch["seq_loss_mask"]).reshape(b * k, t)[:, 1:].astype(jnp.float32)
  lp = token_logps(model.language_model, h[:, :-1], jnp.where(w > 0, flat[:, 1:], 0))
  return (lp * w).sum(-1).reshape(b, k), w.sum(-1).reshape(b, k), visual


def completion_logps(model, batch: Mapping[str, Any], prompt_len: int,
                     visual: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(per-token log-probs [B, K, N] of the completion tokens, visual tokens) for sequences
  = left-padded prompt (length `prompt_len`) + completion (N tokens). Only the N positions
  that predict completion tokens go through the LM head."""
  ids = jnp.asarray(batch["seq_input_ids"])
  b, k, t = ids.shape
  h, visual = hidden_states(model, batch, ids, jnp.asarray(batch["seq_attention_mask"]), visual)
  n = t - prompt_len
  lp = token_logps(model.language_model, h[:, prompt_len - 1:t - 1],
                   ids.reshape(b * k, t)[:, prompt_len:])
  return lp.reshape(b, k, n), visual
