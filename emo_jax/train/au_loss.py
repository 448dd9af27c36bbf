"""Weighted asymmetric loss for multi-label AU detection (the MDWA family), with deep supervision.

Per frame n and AU i with label y in {1, 0} (uncoded -1 entries are left out), logit z,
p = sigmoid(z), class weight w_i, margin m, focusing exponents g+ and g-:

    p_m  = max(p - m, 0)                                   (shifted negative probability)
    l+   = (1 - p)^g+ * log(p)
    l-   = p_m^g-     * log(1 - p_m)
    loss = - sum_{n,i coded} w_i [ y l+ + (1 - y) l- ]     (returned with the count)

- the margin drops easy negatives (p <= m gives exactly zero loss and gradient);
- g- > 0 down-weights easy negatives and focuses on hard ones;
- the negative gradient with respect to the logit, p (1 - p) d(-l-)/dp, rises with p,
  peaks and falls back to 0 as p -> 1: a negative the model is very sure is positive is
  likely mislabelled and is "discarded" (ASL's mislabel rejection; the curve AUFormer's
  figure draws, peaking near p = 0.85);
- per-AU weights w_i come from the training fold (`input_pipeline.au.class_weights`).

Facts: ME-GraphAU's verified WeightedAsymmetricLoss is the special case m = 0, g+ = 0 and a
negative focusing weight p with stop-gradient (`detach_focus=True`, g- = 1). AUFormer's
exact MDWA equation (its margin, per-AU focusing, truncation) is unpublished outside the
paper: margin (default 0.05 as the figure's "ignore simple samples" bound), g- and g+ are
config fields here, our defaults. `detach_focus` computes the focusing weights without
gradient, as ME-GraphAU and ASL's `disable_torch_grad_focal_loss` option do.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AULossConfig:
  margin: float = 0.05
  gamma_neg: float = 2.0
  gamma_pos: float = 0.0
  detach_focus: bool = False
  deep_supervision_weight: float = 0.5   # weight of the mean per-layer loss (ours)
  eps: float = 1e-8


def _pow(x: jax.Array, g: float) -> jax.Array:
  return jnp.ones_like(x) if g == 0 else jnp.power(x, g)


def asymmetric_terms(logits: jax.Array, labels: jax.Array, weights: jax.Array | None,
                     cfg: AULossConfig) -> tuple[jax.Array, jax.Array]:
  """(per-entry loss [..., K] with uncoded entries zero, coded mask [..., K]) in fp32."""
  z = logits.astype(jnp.float32)
  y = labels.astype(jnp.float32)
  coded = (labels >= 0).astype(jnp.float32)
  p = jax.nn.sigmoid(z)
  log_p = jnp.maximum(jax.nn.log_sigmoid(z), jnp.log(cfg.eps))
  focus_pos = _pow(1.0 - p, cfg.gamma_pos)
  if cfg.margin > 0:
    p_m = jnp.maximum(p - cfg.margin, 0.0)
    log_not = jnp.log(jnp.maximum(1.0 - p_m, cfg.eps))
  else:
    p_m = p
    log_not = jnp.maximum(jax.nn.log_sigmoid(-z), jnp.log(cfg.eps))
  focus_neg = _pow(p_m, cfg.gamma_neg)
  if cfg.detach_focus:
    focus_pos, focus_neg = jax.lax.stop_gradient(focus_pos), jax.lax.stop_gradient(focus_neg)
  pos = y * focus_pos * log_p
  neg = (1.0 - jnp.maximum(y, 0.0)) * focus_neg * log_not
  per = -(pos + neg) * coded
  if weights is not None:
    per = per * jnp.asarray(weights, jnp.float32)
  return per, coded


def au_loss_sum(logits: jax.Array, labels: jax.Array, weights: jax.Array | None,
                cfg: AULossConfig = AULossConfig()) -> tuple[jax.Array, jax.Array]:
  """(sum of the weighted asymmetric loss over coded entries, number of coded entries)."""
  per, coded = asymmetric_terms(logits, labels, weights, cfg)
  return per.sum(), coded.sum()


def deep_supervised_sum(logits: jax.Array, deep_logits: Sequence[jax.Array] | jax.Array | None,
                        labels: jax.Array, weights: jax.Array | None,
                        cfg: AULossConfig = AULossConfig()) -> tuple[jax.Array, jax.Array]:
  """Head loss + deep_supervision_weight * mean over layers of the per-layer losses (each
  layer's logits [L, N, K] scored like the head's); (sum, coded count)."""
  total, count = au_loss_sum(logits, labels, weights, cfg)
  if deep_logits is not None and len(deep_logits) and cfg.deep_supervision_weight:
    deep = jnp.stack(list(deep_logits)) if not isinstance(deep_logits, jax.Array) else deep_logits
    per, _ = asymmetric_terms(deep, jnp.broadcast_to(labels, deep.shape), weights, cfg)
    total = total + cfg.deep_supervision_weight * per.sum() / deep.shape[0]
  return total, count
