"""optax AdamW with warmup + cosine, global-norm clipping and per-group learning rates.

The optimizer only ever sees the *trainable* parameters (the train step splits them off
with the model's trainable filter), so frozen groups hold no optimizer state at all.
Inside the trainable set, parameters are assigned to named groups by regex over their
'/'-joined path (first match wins; unmatched -> 'default'), each with its own peak
learning rate through `optax.multi_transform`.

Paper facts (LLaMA-VID stage 2, docs/MODEL.md "Training"): AdamW, cosine decay with 3% linear
warmup, lr ~2e-4 for LoRA and 2e-5 for fully trained modules. Our choices: weight decay
only on >= 2-D weights (not on norms / biases), clipping at global norm 1.0 by default.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax


def path_str(path: Sequence[Any]) -> str:
  """'/'-joined string of a jax key path (DictKey / GetAttrKey / SequenceKey parts)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  if parts and parts[-1] == "value":   # nnx.Variable's own leaf
    parts.pop()
  return "/".join(parts)


def warmup_cosine(peak_lr: float, total_steps: int, warmup_frac: float = 0.03,
                  end_frac: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_frac` of the steps, then cosine to end_frac*peak."""
  total_steps = max(int(total_steps), 1)
  warmup = max(int(round(warmup_frac * total_steps)), 0)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=end_frac * peak_lr)


def group_labels(params: Any, groups: Sequence[tuple[str, str]]) -> Any:
  """A pytree like `params` holding each leaf's group name (first matching regex).

  `groups`: sequence of (name, regex, ...) — extra entries (e.g. the lr) are ignored.
  """
  compiled = [(g[0], re.compile(g[1])) for g in groups]

  def label(path, _):
    p = path_str(path)
    for name, rx in compiled:
      if rx.search(p):
        return name
    return "default"

  return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(cfg: Mapping[str, Any], total_steps: int, params: Any
                   ) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
  """Builds the optax transformation for the trainable `params` from `config.optimizer`.

  cfg fields: lr (default group's peak lr), warmup_frac, end_lr_frac, weight_decay, b1, b2,
  eps, grad_clip (<= 0 disables), groups: sequence of (name, regex, peak_lr).
  Returns (tx, {group: schedule}) — the schedules are for logging.
  """
  groups = [(g[0], g[1]) for g in cfg.get("groups", ())]
  lrs = {g[0]: float(g[2]) for g in cfg.get("groups", ())}
  lrs.setdefault("default", float(cfg["lr"]))
  schedules = {name: warmup_cosine(lr, total_steps, cfg.get("warmup_frac", 0.03),
                                   cfg.get("end_lr_frac", 0.0)) for name, lr in lrs.items()}
  labels = group_labels(params, groups)
  used = set(jax.tree.leaves(labels))
  transforms = {
      name: optax.adamw(schedules[name], b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                        eps=cfg.get("eps", 1e-8), weight_decay=cfg.get("weight_decay", 0.0),
                        mask=_decay_mask)
      for name in used
  }
  tx = optax.multi_transform(transforms, labels)
  clip = cfg.get("grad_clip", 1.0)
  if clip and clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, {k: v for k, v in schedules.items() if k in used}


def count_params(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


Schedule = Callable[[int], jax.Array]
