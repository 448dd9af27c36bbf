"""The reference model of DPO / GRPO, without a second copy of the frozen weights.

Modes (config `reference`):
  'lora_off'  the policy network itself with every LoRA adapter switched off
              (`models.lora.disabled`): the base model the adapters were put on. Trainable
              parameters outside the adapters (Q-Former, projectors, ...) are read from a
              frozen copy of their starting values, so the reference never moves.
  'copy'      a frozen copy of all trainable parameters at the start (the SFT model when the
              run starts from an SFT checkpoint); frozen weights are shared with the policy.
              For a LoRA policy this copies the adapters only.
  'auto'      'lora_off' when the model has LoRA, else 'copy'.
The copy is passed to the jitted step as a separate, non-donated argument (`extra`) and is
never checkpointed: it is rebuilt from the same starting point on resume.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from emo_jax.models import lora as lora_lib

MODES = ("auto", "lora_off", "copy")


def resolve_mode(mode: str, model: nnx.Module) -> str:
  if mode not in MODES:
    raise ValueError(f"unknown reference mode {mode!r}; known: {MODES}")
  has_lora = bool(lora_lib.lora_modules(model))
  if mode == "auto":
    return "lora_off" if has_lora else "copy"
  if mode == "lora_off" and not has_lora:
    raise ValueError("reference='lora_off' needs a model with LoRA (model.lora_rank > 0); "
                     "use 'copy'")
  return mode


def reference_params(params: nnx.State, mode: str) -> nnx.State:
  """What the reference keeps of the starting trainable `params` (a fresh copy)."""
  if mode == "lora_off":
    params = nnx.split_state(params, nnx.LoRAParam, ...)[1]  # adapters are switched off
  return jax.tree.map(lambda x: x.copy(), params)


def forward(model: nnx.Module, ref_params: nnx.State, mode: str,
            fn: Callable[[nnx.Module], Any]) -> Any:
  """`fn(reference model)` with gradients stopped. `model` is the (traced) policy."""
  ref = nnx.clone(model)
  if jax.tree.leaves(ref_params):
    nnx.update(ref, ref_params)
  if mode == "lora_off":
    with lora_lib.disabled(ref):
      out = fn(ref)
  else:
    out = fn(ref)
  return jax.lax.stop_gradient(out)
