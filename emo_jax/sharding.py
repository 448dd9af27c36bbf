"""Logical-axis sharding: a ('data', 'fsdp', 'tensor') mesh, rules from logical names to mesh axes.

Weights carry logical axis names in their Variable metadata (`out_sharding`, set through
`nnx.with_partitioning` or `nnx.Param(..., out_sharding=...)`); activations are annotated with
`constrain(x, names)`. Rules are data: a tuple of `(logical_name, mesh_axes)` pairs, where
mesh_axes is a mesh axis name, a tuple of names, or None (replicated). The first rule for a name
wins; a mesh axis already used by an earlier dimension of the same array is not reused (so an
activation `('batch', 'length', 'embed')` under FSDP rules shards batch over fsdp and leaves embed
replicated, while the weight `('embed', 'mlp')` shards embed over fsdp).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, Any]]

_BATCH = ("batch", ("data", "fsdp"))

# Pure data parallelism: weights replicated, batch split over every device.
RULES_DP: tuple[tuple[str, Any], ...] = (
  _BATCH,
)

# ZeRO-3 style: weights split along their model-width dim over 'fsdp', batch over data x fsdp.
RULES_FSDP: tuple[tuple[str, Any], ...] = (
  _BATCH,
  ("embed", "fsdp"),
  ("vit_embed", "fsdp"),
  ("qformer_embed", "fsdp"),
  ("face_embed", "fsdp"),
  # A LoRA factor has one model-width side: A [in, r] shards on 'embed' when `in` is the model
  # width, B [r, out] otherwise (r=128 factors on the mlp/heads side would stay replicated).
  ("lora_rank", "fsdp"),
)

# FSDP plus Megatron tensor parallelism over 'tensor' (heads, FFN hidden, vocab).
RULES_FSDP_TP: tuple[tuple[str, Any], ...] = RULES_FSDP + (
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("vit_mlp", "tensor"),
  ("qformer_mlp", "tensor"),
)

PRESETS = {"dp": RULES_DP, "fsdp": RULES_FSDP, "fsdp_tp": RULES_FSDP_TP}


def make_mesh(shape: Sequence[int] = (1, 1, 1), devices: Sequence[jax.Device] | None = None,
              ) -> Mesh:
  """A mesh with axes ('data', 'fsdp', 'tensor'); -1 in `shape` takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
  if shape.count(-1) > 1:
    raise ValueError("at most one mesh dimension may be -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = len(devices) // known
  n = int(np.prod(shape))
  if n > len(devices) or n <= 0:
    raise ValueError(f"mesh shape {tuple(shape)} needs {n} devices, {len(devices)} available")
  return Mesh(np.asarray(devices[:n], dtype=object).reshape(shape), MESH_AXES)


def _lookup(name: str | None, rules: Rules) -> Any:
  if name is None:
    return None
  for logical, mesh_axes in rules:
    if logical == name:
      return mesh_axes
  return None


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules: Rules,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                    ) -> PartitionSpec:
  """PartitionSpec for one array's logical axes under `rules`.

  With `shape` and `mesh`, a dimension that the mapped mesh axes do not divide stays
  replicated (our choice: odd sizes such as a 32001-token vocab must still load).
  """
  if logical_axes is None:
    return PartitionSpec()
  used: set[str] = set()
  out = []
  for dim, name in enumerate(logical_axes):
    mesh_axes = _lookup(name, rules)
    if mesh_axes is None:
      out.append(None)
      continue
    axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if shape is not None and mesh is not None and axes:
      size = int(np.prod([mesh.shape[a] for a in axes]))
      if shape[dim] % size:
        axes = ()
    if not axes:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def variable_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical names a Variable carries (flax 0.12 `out_sharding`, older `sharding_names`)."""
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  for key in ("out_sharding", "sharding_names", "sharding"):
    names = meta.get(key)
    if names is not None and not isinstance(names, jax.sharding.Sharding):
      return tuple(names)
  return None


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedSharding for every leaf of an (abstract) nnx State or pytree of Variables.

  Unannotated leaves (and plain arrays) are replicated. The result has the structure of
  `abstract_state` with Variables replaced by their sharding (use it as `out_shardings`).
  """
  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      names = variable_logical_axes(leaf)
      shape = getattr(leaf.get_value() if hasattr(leaf, "get_value") else leaf.value, "shape", ())
      if names is not None and len(names) != len(shape):
        raise ValueError(f"logical axes {names} do not match the shape {shape}")
      return leaf.replace(NamedSharding(mesh, logical_to_spec(names, rules, shape, mesh)))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


class _Active(threading.local):
  mesh: Mesh | None = None
  rules: Rules | None = None


_ACTIVE = _Active()


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Activate `constrain` (and anything else reading the active mesh/rules) in this block.

  The block must enclose tracing: wrap the `jax.jit(...)(...)` call that compiles the step.
  """
  prev = (_ACTIVE.mesh, _ACTIVE.rules)
  _ACTIVE.mesh, _ACTIVE.rules = mesh, tuple(rules)
  try:
    yield
  finally:
    _ACTIVE.mesh, _ACTIVE.rules = prev


def active_mesh_rules() -> tuple[Mesh | None, Rules | None]:
  return _ACTIVE.mesh, _ACTIVE.rules


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation; a no-op unless `use_mesh_rules` is active."""
  mesh, rules = _ACTIVE.mesh, _ACTIVE.rules
  if mesh is None or rules is None:
    return x
  spec = logical_to_spec(logical_axes, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_state(state: Any, mesh: Mesh, rules: Rules) -> Any:
  """device_put a concrete nnx State according to its logical axes."""
  shardings = state_shardings(state, mesh, rules)
  return jax.tree.map(lambda v, s: jax.device_put(v, s), state, shardings)


def init_sharded(make: Callable[[], nnx.Module], mesh: Mesh, rules: Rules) -> nnx.Module:
  """Build `make()` with every Variable created directly in its sharding (no host copy).

  The abstract state (`nnx.eval_shape`) gives the shardings; `make` then runs under
  `jax.jit(out_shardings=...)`, so each device only materialises its own shards.
  """
  abstract = nnx.eval_shape(make)
  graphdef, abs_state = nnx.split(abstract)
  shardings = state_shardings(abs_state, mesh, rules)
  state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------
# Train state and batches.


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim over ('data', 'fsdp'); everything else replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedSharding per array of an (abstract) pytree of nnx Variables / arrays.

  Variables follow their logical axes (optimizer moments keep their param's metadata, so
  they mirror it), plain arrays are replicated. Variables holding no array (optax
  MaskedNode of multi_transform's other groups) are kept as they are: they have no leaves.
  """
  def one(x):
    if isinstance(x, nnx.Variable):
      if not jax.tree.leaves(x):
        return x
      return state_shardings({"v": x}, mesh, rules)["v"]
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_and_frozen_shardings(state: Any, frozen: Any, mesh: Mesh, rules: Rules):
  """NamedShardings for a (possibly abstract) train state and the frozen state."""
  return tree_shardings(state, mesh, rules), tree_shardings(frozen, mesh, rules)


def common_sequence_length(batch: dict, pad_values: dict[str, int]) -> dict:
  """Pads this process's sequence keys (last axis) to the longest any process has this step.

  Every process buckets its own examples, so with several bucket lengths the hosts of one
  step can pick different lengths; the global array then has no single shape (JAX would
  build mismatched programs). One process, or hosts that agree: `batch` unchanged. The
  agreement is an all-gather of one integer, a synchronisation point of the step."""
  keys = [k for k in pad_values if k in batch]
  if jax.process_count() == 1 or not keys:
    return batch
  from jax.experimental import multihost_utils
  local = max(int(np.shape(batch[k])[-1]) for k in keys)
  lengths = np.asarray(multihost_utils.process_allgather(np.asarray([local], np.int32)))
  longest = int(lengths.max())
  if longest == local and all(np.shape(batch[k])[-1] == local for k in keys):
    return batch
  out = dict(batch)
  for k in keys:
    v = np.asarray(batch[k])
    widths = [(0, 0)] * (v.ndim - 1) + [(0, longest - v.shape[-1])]
    out[k] = np.pad(v, widths, constant_values=pad_values[k])
  return out


def to_global_batch(batch: Any, mesh: Mesh, spec: Any = None) -> dict:
  """Process-local numpy batch -> global jax.Arrays sharded over the mesh's batch axes.

  `spec` is a PartitionSpec for every leaf (default: `batch_sharding`'s, batch over the
  data and fsdp axes, the rest replicated) or a mapping key -> PartitionSpec. An array
  that appears under two keys (`face_crops` aliasing `frames`) is transferred once.
  """
  if spec is None:
    spec = PartitionSpec(("data", "fsdp"))
  out = {}
  placed: dict[tuple[int, Any], str] = {}  # (id of a numpy array, spec) -> its key
  for key, value in batch.items():
    s = spec[key] if isinstance(spec, dict) else spec
    seen = placed.get((id(value), s))
    if seen is not None and batch[seen] is value:
      out[key] = out[seen]
      continue
    out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, s), np.asarray(value))
    placed[(id(value), s)] = key
  return out
