"""Activation functions by their Hugging Face `hidden_act` names (transformers' ACT2FN).

Each entry computes what the transformers class of the same name computes (torch CPU,
fp32, checked in tests/test_loader_strictness.py). Names transformers knows but that carry
learned parameters (`prelu`, `xielu`) are refused by name, never replaced by another
function.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def _gelu_clipped(x, lo=-10.0, hi=10.0):
  return jnp.clip(jax.nn.gelu(x, approximate=False), lo, hi)


def _gelu_accurate(x):
  return 0.5 * x * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu_fast(x):
  return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _mish(x):
  return x * jnp.tanh(jax.nn.softplus(x))


def _laplace(x, mu=0.707107, sigma=0.282095):
  return 0.5 * (1.0 + jax.lax.erf((x - mu) / (sigma * math.sqrt(2.0))))


ACT2FN: dict[str, Callable] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_python": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_python_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": _gelu_fast,
    "gelu_accurate": _gelu_accurate,
    "gelu_10": _gelu_clipped,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=0.01),
    "hardswish": jax.nn.hard_swish,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "mish": _mish,
    "laplace": _laplace,
    "linear": lambda x: x,
}


def get(name: str) -> Callable:
  """The activation called `name`; ValueError naming the supported ones otherwise."""
  if name not in ACT2FN:
    raise ValueError(f"hidden_act {name!r} is not supported (it has learned parameters or "
                     f"is unknown); supported: {sorted(ACT2FN)}")
  return ACT2FN[name]
