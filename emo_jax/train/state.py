"""The train state pytree and the model split behind it (functional NNX pattern).

A model is split once into
  graphdef   static structure (closed over by the jitted step),
  params     the trainable variables (the config's trainable filter) -> TrainState,
  rngs       nnx.RngState (dropout streams; advance every step)     -> TrainState,
  frozen     everything else (frozen towers, LoRA base weights, buffers): passed to the
             step as a separate, non-donated argument and never checkpointed (it is
             rebuilt from the config seed / pretrained files on restart).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct
import optax


@struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar: optimizer steps taken
  params: Any                # nnx.State of trainable variables
  opt_state: optax.OptState  # over `params` only
  rngs: Any                  # nnx.State of RngState variables (may be empty)


def split_model(model: nnx.Module, trainable: Any):
  """(graphdef, params, rngs, frozen) for a model and an nnx filter of trainables."""
  return nnx.split(model, trainable, nnx.RngState, ...)


def merge_model(graphdef, params, rngs, frozen) -> nnx.Module:
  return nnx.merge(graphdef, params, rngs, frozen)


def create_train_state(params, rngs, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rngs=rngs)
