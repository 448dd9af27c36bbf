"""Model config dataclasses <-> JSON-able dicts (the `config.json` of bundles and exports)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from emo_jax.dtypes import to_dtype


def to_jsonable(x: Any) -> Any:
  if dataclasses.is_dataclass(x):
    return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, Mapping):
    return {k: to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, (np.dtype, type)) or (hasattr(x, "dtype") and not hasattr(x, "shape")):
    return jnp.dtype(x).name
  return x


def from_dict(cls: type, d: Mapping[str, Any]) -> Any:
  """A (flat) config dataclass from a mapping: unknown fields are an error, lists become
  tuples, dtype names jnp dtypes."""
  kw = {}
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - names
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
  for k, v in d.items():
    if k in ("dtype", "param_dtype") and isinstance(v, str):
      v = to_dtype(v)
    elif isinstance(v, list):
      v = tuple(v)
    kw[k] = v
  return cls(**kw)
