"""Direct Preference Optimization (Rafailov et al. 2023) and IPO (Azar et al. 2023).

With per-pair sequence log-probs of the chosen (c) and rejected (r) answers under the
policy (pi) and the reference (ref), and h = (pi_c - pi_r) - (ref_c - ref_r):
  sigmoid  loss = -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)   (ls: label
           smoothing, the conservative DPO of TRL's `label_smoothing`);
  ipo      loss = (h - 1 / (2 beta))^2 with log-probs averaged over the answer tokens (as
           TRL's IPO does).
Implicit rewards: beta (pi - ref) per answer; logged as TRL names them: rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies (chosen reward > rejected), logps/chosen,
logps/rejected. The loss is the mean over pairs.

The media of a pair are encoded once (logps.sequence_logps): the chosen and the rejected
answer are two sequences of one prompt ([B, 2, T]).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from emo_jax.posttrain import logps as logps_lib
from emo_jax.posttrain import reference as ref_lib

LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, *, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-pair losses [B] and per-pair metrics (dict of [B]) from sequence log-probs [B]."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; known: {LOSS_TYPES}")
  h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
  if loss_type == "sigmoid":
    losses = (-jax.nn.log_sigmoid(beta * h) * (1.0 - label_smoothing)
              - jax.nn.log_sigmoid(-beta * h) * label_smoothing)
  else:
    losses = (h - 1.0 / (2.0 * beta)) ** 2
  chosen_r = beta * jax.lax.stop_gradient(policy_chosen - ref_chosen)
  rejected_r = beta * jax.lax.stop_gradient(policy_rejected - ref_rejected)
  metrics = {"rewards/chosen": chosen_r, "rewards/rejected": rejected_r,
             "rewards/margins": chosen_r - rejected_r,
             "rewards/accuracies": (chosen_r > rejected_r).astype(jnp.float32),
             "logps/chosen": jax.lax.stop_gradient(policy_chosen),
             "logps/rejected": jax.lax.stop_gradient(policy_rejected)}
  return losses, metrics


def make_loss_fn(*, beta: float, label_smoothing: float, loss_type: str, reference: str,
                 rpo_alpha: float | None = None):
  """`loss_fn(model, batch, ref_params) -> (loss_sum, num_pairs, metric sums)` for
  train.step (the step divides by the number of pairs of the global batch).

  `rpo_alpha` (TRL's name): adds alpha x the chosen answer's mean token negative
  log-likelihood to each pair's loss, which keeps the chosen answers' probability from
  falling while the margin grows (None or 0: plain DPO)."""

  def pair_logps(model, batch, visual=None):
    s, n, visual = logps_lib.sequence_logps(model, batch, visual)
    return s, n, visual

  def scored(s, n):
    return s / jnp.maximum(n, 1.0) if loss_type == "ipo" else s

  def loss_fn(model, batch: Mapping[str, Any], ref_params):
    raw, n, visual = pair_logps(model, batch)
    pol = scored(raw, n)
    # The reference shares the policy's visual tokens when no visual-side weight is trained
    # apart from the adapters (they sit in the LLM).
    share = reference == "lora_off" and not jax.tree.leaves(ref_params)
    ref = ref_lib.forward(model, ref_params, reference,
                          lambda m: scored(*pair_logps(
                              m, batch, jax.lax.stop_gradient(visual) if share else None)[:2]))
    losses, metrics = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=beta,
                               label_smoothing=label_smoothing, loss_type=loss_type)
    if rpo_alpha:
      nll = -raw[:, 0] / jnp.maximum(n[:, 0], 1.0)
      losses = losses + rpo_alpha * nll
      metrics["nll/chosen"] = jax.lax.stop_gradient(nll)
    valid = jnp.asarray(batch["pair_valid"]).astype(jnp.float32)
    sums = {k: (v * valid).sum() for k, v in metrics.items()}
    sums["pairs"] = valid.sum()
    return (losses * valid).sum(), valid.sum(), sums

  return loss_fn
