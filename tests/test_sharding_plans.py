"""Sharding plans of configs/emo_llama_7b.py from abstract state (nothing allocated).

Every parameter gets a NamedSharding, every parameter over 64 Ki elements carries logical
axis names, FSDP (and FSDP + TP) leave no large parameter replicated, DP replicates everything, and the FSDP PartitionSpecs of all parameters
are pinned by a golden file. After an intended change of the model or the rules, regenerate the golden with

    UPDATE_GOLDEN=1 python -m pytest -q tests/test_sharding_plans.py

and commit tests/golden/sharding_7b_fsdp.json with the change (review its diff).
"""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from emo_jax import sharding as sharding_lib

GOLDEN = pathlib.Path(__file__).parent / "golden" / "sharding_7b_fsdp.json"
CONFIG = pathlib.Path(__file__).parents[1] / "configs" / "emo_llama_7b.py"
# FSDP must shard anything bigger than this many elements (1 Mi: 4 MiB in fp32). Norm
# scales and biases, even stacked over 32 layers (131 Ki), may stay replicated.
REPLICATION_LIMIT = 1 << 20


def _is_var(x):
  return isinstance(x, nnx.Variable)


@pytest.fixture(scope="module")
def abstract_7b():
  """(config name, abstract nnx.State of every variable) of configs/emo_llama_7b.py."""
  import importlib.util
  from emo_jax.train import task as task_lib
  spec = importlib.util.spec_from_file_location("emo_llama_7b_cfg", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  model = nnx.eval_shape(lambda: task_lib.build_model(config))
  return "emo_llama_7b", nnx.state(model)


def _flat(state):
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_var):
    out[mp_path(path)] = leaf
  return out


def mp_path(path) -> str:
  from emo_jax.train.optimizer import path_str
  return path_str(path)


def _specs(state, mesh, rules) -> dict:
  shardings = sharding_lib.state_shardings(state, mesh, rules)
  flat_sh = _flat(shardings)
  out = {}
  for name, var in _flat(state).items():
    sh = flat_sh[name]
    sh = sh.get_value() if _is_var(sh) else sh
    assert isinstance(sh, jax.sharding.NamedSharding), name
    out[name] = sh
  return out


def _spec_json(spec) -> list:
  return [list(a) if isinstance(a, tuple) else a for a in spec]


def test_every_parameter_annotated_and_sharded(abstract_7b):
  _, state = abstract_7b
  mesh = sharding_lib.make_mesh((1, 8, 1))
  flat = _flat(state)
  n = sum(int(np.prod(v.get_value().shape)) for v in flat.values())
  assert 8.0e9 < n < 8.8e9, n   # really the 7B model (+ ViT-G, Q-Former, FaceXFormer, LoRA)
  specs = _specs(state, mesh, sharding_lib.RULES_FSDP)
  assert set(specs) == set(flat)
  for name, var in flat.items():
    val = var.get_value()
    axes = sharding_lib.variable_logical_axes(var)
    if axes is not None:
      assert len(axes) == val.ndim, name
    else:  # unannotated (biases, task tokens) means replicated: it must be small
      assert np.prod(val.shape) <= 1 << 16, name


def _replicated(specs, flat, limit):
  return sorted(k for k, v in flat.items() if np.prod(v.get_value().shape) > limit
                and all(a is None for a in specs[k].spec))


@pytest.mark.parametrize("rules_name,mesh_shape", [("fsdp", (1, 8, 1)), ("fsdp_tp", (1, 4, 2))])
def test_no_large_parameter_replicated(abstract_7b, rules_name, mesh_shape):
  _, state = abstract_7b
  mesh = sharding_lib.make_mesh(mesh_shape)
  specs = _specs(state, mesh, sharding_lib.PRESETS[rules_name])
  flat = _flat(state)
  big = [k for k, v in flat.items() if np.prod(v.get_value().shape) > REPLICATION_LIMIT]
  assert len(big) >= 50   # LLM, ViT-G, Q-Former, FaceXFormer weight matrices
  replicated = _replicated(specs, flat, REPLICATION_LIMIT)
  assert not replicated, f"replicated under {rules_name}: {replicated}"
  # Per-device bytes of all weights drop to ~ total / devices.
  total = per_device = 0
  for k, v in flat.items():
    val = v.get_value()
    total += np.prod(val.shape) * val.dtype.itemsize
    per_device += np.prod(specs[k].shard_shape(val.shape)) * val.dtype.itemsize
  assert per_device < 1.15 * total / mesh.size, (per_device / 2**30, total / 2**30)


def test_dp_replicates_everything(abstract_7b):
  _, state = abstract_7b
  specs = _specs(state, sharding_lib.make_mesh((8, 1, 1)), sharding_lib.RULES_DP)
  assert all(all(a is None for a in s.spec) for s in specs.values())


def test_golden_fsdp_partition_specs(abstract_7b):
  model, state = abstract_7b
  specs = _specs(state, sharding_lib.make_mesh((1, 8, 1)), sharding_lib.RULES_FSDP)
  flat = _flat(state)
  current = {
    "model": model,
    "mesh": [1, 8, 1],
    "rules": "RULES_FSDP",
    "params": {k: {"shape": list(flat[k].get_value().shape),
                   "dtype": str(flat[k].get_value().dtype),
                   "logical": list(sharding_lib.variable_logical_axes(flat[k]) or []),
                   "spec": _spec_json(specs[k].spec)}
               for k in sorted(specs)},
  }
  if os.environ.get("UPDATE_GOLDEN"):
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
  golden = json.loads(GOLDEN.read_text())
  assert golden["model"] == current["model"]
  missing = sorted(set(golden["params"]) - set(current["params"]))
  extra = sorted(set(current["params"]) - set(golden["params"]))
  assert not missing and not extra, f"missing {missing[:5]}, new {extra[:5]}"
  changed = {k: (golden["params"][k], current["params"][k]) for k in golden["params"]
             if golden["params"][k] != current["params"][k]}
  assert not changed, f"{len(changed)} parameters changed, e.g. {list(changed.items())[:3]}"
