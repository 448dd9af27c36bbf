"""Dtype names, as configs and config.json files write them, to jnp dtypes.

The one conversion from a name ('float32', 'bfloat16', 'float16') to a dtype: model
configs, the train step's compute dtype, export and the benchmarks all go through it, so an
unknown name is the same clear error everywhere.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NAMES = tuple(DTYPES)


def to_dtype(x: Any) -> jnp.dtype:
  """A name from DTYPES, or anything that already is a dtype (jnp.float32, np.dtype...)."""
  if isinstance(x, str):
    if x not in DTYPES:
      raise ValueError(f"unknown dtype name {x!r}; valid names: {', '.join(NAMES)}")
    return jnp.dtype(DTYPES[x])
  return jnp.dtype(x)


def compute_dtype(name: str | None) -> jnp.dtype | None:
  """`config.train.compute_dtype` -> the dtype the train step casts parameters to, or None
  ('' or 'float32': no cast)."""
  if not name or name == "float32":
    return None
  return to_dtype(name)
