"""Memory planning without hardware: compile the train step from abstract shapes.

  python -m emo_jax.perf --config=configs/emo_llama_7b.py --devices=8 --mesh=1,8,1 \
      --micro_batch=1 --search --out=benchmarks/results/memory_plan_7b

The model, the train state and the batch exist only as `jax.ShapeDtypeStruct`s
(`nnx.eval_shape` / `jax.eval_shape`) carrying `NamedSharding`s from the logical-axis
rules, so a 7B model "fits" on any machine: nothing is allocated. The step is lowered
and compiled for `--devices` fake CPU devices (`--xla_force_host_platform_device_count`)
and XLA's own accounting is read back: `compiled.memory_analysis()` (per-device
argument / output / alias / temporary bytes of the SPMD-partitioned program) and
`compiled.cost_analysis()['flops']` (per device; times the device count = per step).

Our choices and caveats (not facts about TPUs):
- Peak per device = argument + output - alias + temp (the donated train state aliases its
  update; frozen weights and the batch are arguments). This is what XLA's buffer
  assignment reserves; it excludes the runtime's own overhead and fragmentation.
- The numbers come from the *CPU* compiler. The TPU compiler fuses and schedules
  differently and computes bf16 matmuls natively, where XLA:CPU upcasts bf16 dots to fp32
  (extra temporaries); so read them as a conservative plan, to be confirmed on hardware.
- "Micro-batch" is the per-device batch of one forward/backward pass (global batch =
  micro_batch x data x fsdp devices x accumulation steps). The largest micro-batch for a
  budget is found by compiling (safeguarded secant search on the compiled peaks), never
  by extrapolation alone: the answer b fits and b + 1 was compiled and does not.
- FLOPs: XLA's cost_analysis() counts a loop body once, so with scanned layers it
  undercounts; the report's FLOPs per step count matmuls/convolutions in the step's jaxpr
  with scan trip counts (remat recomputation included, elementwise work excluded).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax import dtypes
from emo_jax import sharding as sharding_lib
from emo_jax.models import lora as lora_lib
from emo_jax.models.llama import LlamaConfig, LlamaForCausalLM
from emo_jax.perf.flops import jaxpr_matmul_flops
from emo_jax.train import optimizer as opt_lib
from emo_jax.train import state as state_lib
from emo_jax.train import step as step_lib
from emo_jax.train import task as task_lib

GiB = 1024 ** 3
# Per-chip HBM (Cloud TPU docs): v5e 16 GiB, v5p 95 GiB.
BUDGETS_GIB = {"v5e": 16.0, "v5p": 95.0}


@dataclasses.dataclass
class Program:
  """Everything (abstract) needed to lower one train step.

  batch_spec(global_batch) returns the abstract batch dict (ShapeDtypeStructs).
  """
  name: str
  graphdef: Any
  params: Any
  rngs: Any
  frozen: Any
  tx: Any
  loss_fn: Callable
  batch_spec: Callable[[int], dict]
  rules: Sequence[tuple[str, Any]]
  accum_steps: int = 1
  compute_dtype: Any = None
  info: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- programs


def _split_abstract(build: Callable[[], Any], trainable) -> tuple:
  model = nnx.eval_shape(build)
  return state_lib.split_model(model, trainable)


def _count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _bytes(tree) -> int:
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def llama_lora_program(llama_cfg, *, seq_len: int, lora_rank: int = 8, lora_alpha: float = 16.0,
                       lora_targets: Sequence[str] | None = None,
                       optimizer: Mapping[str, Any] | None = None,
                       rules=None, name: str = "llama_lora") -> Program:
  """LlamaForCausalLM with LoRA adapters: base frozen, A/B trained with AdamW.

  The batch is text only: input_ids, attention_mask, loss_mask int32 [B, seq_len].
  """

  targets = tuple(lora_targets or lora_lib.DEFAULT_TARGETS)

  def build():
    model = LlamaForCausalLM(llama_cfg, rngs=nnx.Rngs(0))
    lora_lib.apply_lora(model, rank=lora_rank, alpha=lora_alpha, targets=targets,
                        rngs=nnx.Rngs(1))
    return model

  graphdef, params, rngs, frozen = _split_abstract(build, lora_lib.trainable_filter())
  tx, _ = opt_lib.make_optimizer(dict(optimizer or {"lr": 2e-4}), 1000, params)

  def loss_fn(model, batch):
    return step_lib.causal_lm_ce_sum(model, batch["input_ids"], batch["attention_mask"],
                                     batch["loss_mask"])

  def batch_spec(b: int) -> dict:
    return {k: jax.ShapeDtypeStruct((b, seq_len), jnp.int32)
            for k in ("input_ids", "attention_mask", "loss_mask")}

  return Program(name=name, graphdef=graphdef, params=params, rngs=rngs, frozen=frozen, tx=tx,
                 loss_fn=loss_fn, batch_spec=batch_spec,
                 rules=tuple(rules or sharding_lib.RULES_FSDP),
                 info={"seq_len": seq_len, "lora_rank": lora_rank,
                       "trainable_params": _count(params), "frozen_params": _count(frozen),
                       "frozen_bytes": _bytes(frozen)})


def llama2_7b_config(**overrides):
  """LLaMA-2-7B / Vicuna-7B v1.5 shapes (facts: 32 layers, 4096, 32 heads, FFN 11008,
  vocab 32000); our planning defaults: bf16 storage and compute, scanned layers, full remat."""
  kw = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
            dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=True,
            remat_policy="full")
  kw.update(overrides)
  return LlamaConfig(**kw)


def program_from_config(config, *, total_steps: int = 1000) -> Program:
  """The train step `emo_jax.main` runs for a `configs/*.py` config, from abstract shapes.

  Model, trainable filter, loss, optimizer, compute dtype and accumulation come from the
  same functions the training loop uses (emo_jax.train.task / optimizer); the batch
  follows docs/INTERFACES.md "The batch" at the config's pipeline sizes, padded to the
  largest bucket (the worst case the step is compiled for).
  """

  rules = _config_rules(config)
  model_cfg = task_lib.model_config(config)
  graphdef, params, rngs, frozen = _split_abstract(
    lambda: task_lib.build_model(config), task_lib.trainable_filter(model_cfg))
  tx, _ = opt_lib.make_optimizer(config.optimizer.to_dict(), total_steps, params)
  pcfg = task_lib.pipeline_config(config, model_cfg)
  use_crops = (model_cfg.use_face and model_cfg.face_prior != "precomputed"
               and pcfg.face_mode != "none")
  if model_cfg.use_face and model_cfg.face_prior == "precomputed":
    raise ValueError("memory_plan: precomputed face priors have config-dependent shapes; "
                     "plan with face_prior='tiny' or 'facexformer'")
  f, t = pcfg.num_frames, max(pcfg.bucket_lengths)
  # Multi-turn batches carry one Q-Former text per turn (docs/INTERFACES.md "The batch").
  q_shape = ((pcfg.qformer_max_length,) if pcfg.image_turns == 1
             else (pcfg.image_turns, pcfg.qformer_max_length))

  def batch_spec(b: int) -> dict:
    sds = jax.ShapeDtypeStruct
    out = {
      # uint8 pixels, normalised inside the model (docs/INTERFACES.md "The batch").
      "frames": sds((b, f, pcfg.image_size, pcfg.image_size, 3), jnp.uint8),
      "frame_mask": sds((b, f), jnp.bool_),
      "qformer_ids": sds((b,) + q_shape, jnp.int32),
      "qformer_mask": sds((b,) + q_shape, jnp.int32),
      "input_ids": sds((b, t), jnp.int32),
      "attention_mask": sds((b, t), jnp.int32),
      "loss_mask": sds((b, t), jnp.int32),
    }
    if use_crops:
      out["face_crops"] = sds((b, f, pcfg.face_size, pcfg.face_size, 3), jnp.uint8)
    return out

  ctype = config.train.get("compute_dtype", "float32")
  groups = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      nnx_state_merge(params, frozen)):
    top = opt_lib.path_str(path).split("/", 1)[0]
    groups[top] = groups.get(top, 0) + math.prod(leaf.shape)
  return Program(
    name=str(config.get("name", "emo_llama")), graphdef=graphdef, params=params, rngs=rngs,
    frozen=frozen, tx=tx, loss_fn=task_lib.loss_fn, batch_spec=batch_spec, rules=rules,
    accum_steps=int(config.train.get("accum_steps", 1)),
    compute_dtype=dtypes.compute_dtype(ctype),
    info={"seq_len": t, "num_frames": f, "image_size": pcfg.image_size,
          "tokens_per_frame": model_cfg.tokens_per_frame, "lora_rank": model_cfg.lora_rank,
          "trainable_params": _count(params), "frozen_params": _count(frozen),
          "frozen_bytes": _bytes(frozen), "trainable_bytes": _bytes(params),
          **{f"params[{k}]": v for k, v in sorted(groups.items())}})


def nnx_state_merge(*states):
  return nnx.merge_state(*states)


def _config_rules(config):
  sh = config.get("sharding") if hasattr(config, "get") else None
  if sh is not None and sh.get("rules") is not None:
    rules = sh.rules
    if isinstance(rules, str):
      return sharding_lib.PRESETS[rules]
    return tuple((str(k), v if v is None or isinstance(v, str) else tuple(v)) for k, v in rules)
  return sharding_lib.RULES_FSDP


# ----------------------------------------------------------------------------- compile + read


def abstract_train_state(program: Program):
  return jax.eval_shape(lambda p, r: state_lib.create_train_state(p, r, program.tx),
                        program.params, program.rngs)


def compile_step(program: Program, mesh, global_batch: int):
  """Lower + compile the sharded, donated train step for abstract inputs."""
  state = abstract_train_state(program)
  # The same sharding function the training loop uses (optimizer moments mirror params).
  state_sh, frozen_sh = sharding_lib.state_and_frozen_shardings(state, program.frozen, mesh,
                                                            program.rules)
  batch = program.batch_spec(global_batch)
  batch_sh = sharding_lib.batch_sharding(mesh)
  fn = step_lib.jit_train_step(program.graphdef, program.tx, program.loss_fn,
                               state_shardings=state_sh, frozen_shardings=frozen_sh,
                               batch_sharding=batch_sh, accum_steps=program.accum_steps,
                               compute_dtype=program.compute_dtype,
                               compiler_options=None)  # XLA defaults, not CPU library fusions
  with sharding_lib.use_mesh_rules(mesh, program.rules), jax.set_mesh(mesh):
    lowered = fn.lower(state, program.frozen, batch)
  return lowered.compile()


def read_stats(compiled) -> dict:
  """Per-device bytes from memory_analysis() and flops from cost_analysis()."""
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError("this backend returns no memory_analysis()")
  stats = {
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "alias_bytes": int(m.alias_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
    "generated_code_bytes": int(m.generated_code_size_in_bytes),
  }
  stats["peak_bytes"] = (stats["argument_bytes"] + stats["output_bytes"]
                         - stats["alias_bytes"] + stats["temp_bytes"])
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  stats["flops_per_device"] = float((cost or {}).get("flops", float("nan")))
  return stats


def step_matmul_flops(program: Program, global_batch: int) -> tuple[float, int]:
  """Matmul FLOPs of one whole train step (all devices) from its jaxpr."""
  state = abstract_train_state(program)
  fn = functools.partial(step_lib.train_step, program.graphdef, program.tx, program.loss_fn,
                         accum_steps=program.accum_steps, compute_dtype=program.compute_dtype)
  closed = jax.make_jaxpr(fn)(state, program.frozen, program.batch_spec(global_batch))
  return jaxpr_matmul_flops(closed.jaxpr)


class Planner:
  """Compiles a program at several micro-batches, caching the stats per micro-batch."""

  def __init__(self, program: Program, mesh, log: Callable[[str], None] | None = None):
    self.program = program
    self.mesh = mesh
    self.batch_devices = int(mesh.shape["data"] * mesh.shape["fsdp"])
    self.results: dict[int, dict] = {}
    self.log = log or (lambda s: None)

  def stats(self, micro_batch: int) -> dict:
    if micro_batch < 1:
      raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    if micro_batch not in self.results:
      t0 = time.perf_counter()
      compiled = compile_step(self.program, self.mesh, self.global_batch(micro_batch))
      s = read_stats(compiled)
      s["micro_batch"] = micro_batch
      s["global_batch"] = self.global_batch(micro_batch)
      s["xla_flops_per_step"] = s["flops_per_device"] * self.mesh.size
      s["matmul_flops_per_step"], s["while_loops_counted_once"] = step_matmul_flops(
        self.program, self.global_batch(micro_batch))
      s["compile_seconds"] = round(time.perf_counter() - t0, 2)
      self.results[micro_batch] = s
      self.log(f"micro_batch={micro_batch}: peak {s['peak_bytes'] / GiB:.2f} GiB/device "
               f"(temp {s['temp_bytes'] / GiB:.2f}), compiled in {s['compile_seconds']} s")
    return self.results[micro_batch]

  def global_batch(self, micro_batch: int) -> int:
    """micro_batch per device x batch-sharded devices x accumulation steps."""
    return micro_batch * self.batch_devices * self.program.accum_steps

  def fits(self, micro_batch: int, budget_bytes: float) -> bool:
    return self.stats(micro_batch)["peak_bytes"] <= budget_bytes

  def max_micro_batch(self, budget_bytes: float, limit: int = 4096) -> int:
    """Largest micro-batch whose compiled peak fits `budget_bytes` (0 if none does).

    Safeguarded secant search on compiled points: the bracket [largest fitting, smallest
    not fitting] starts from micro-batches 1 and 2 extrapolated linearly (then doubled
    until over budget); each step compiles the secant guess between the bracket ends
    (lo + 1 when the line puts the answer at lo), or the midpoint when the guess would
    shrink the bracket by less than a quarter.
    """
    if not self.fits(1, budget_bytes):
      return 0
    self.stats(2)

    def bracket():
      fit = [b for b, r in self.results.items() if r["peak_bytes"] <= budget_bytes]
      over = [b for b, r in self.results.items() if r["peak_bytes"] > budget_bytes]
      return max(fit), (min(over) if over else None)

    lo, hi = bracket()
    while hi is None:   # no upper end yet: extrapolate from the two largest points
      if lo >= limit:
        return limit
      b0, b1 = sorted(self.results)[-2:]
      p0, p1 = self.results[b0]["peak_bytes"], self.results[b1]["peak_bytes"]
      slope = max((p1 - p0) / (b1 - b0), 1.0)
      guess = int(b1 + (budget_bytes - p1) // slope) + 1
      self.stats(min(max(guess, 2 * lo), limit))
      lo, hi = bracket()
    while hi - lo > 1:
      plo, phi = self.results[lo]["peak_bytes"], self.results[hi]["peak_bytes"]
      guess = int(lo + (budget_bytes - plo) * (hi - lo) // max(phi - plo, 1.0))
      quarter = max((hi - lo) // 4, 1)
      if guess <= lo:   # the line says lo is the answer: compiling lo + 1 can confirm it
        guess = lo + 1
      elif not lo + quarter <= guess <= hi - quarter:
        guess = (lo + hi) // 2
      self.stats(min(max(guess, lo + 1), hi - 1))
      lo, hi = bracket()
    return lo


# ----------------------------------------------------------------------------- report


def plan_report(planner: Planner, micro_batch: int, budgets_gib: Mapping[str, float],
                search: bool = True) -> dict:
  program = planner.program
  mesh = planner.mesh
  report = {
    "program": program.name,
    "devices": int(mesh.size),
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "rules": [[k, v] for k, v in program.rules],
    "backend": "cpu (fake devices); XLA:CPU buffer assignment",
    "info": program.info,
    "at_micro_batch": planner.stats(micro_batch),
    "budgets_gib": dict(budgets_gib),
    "max_micro_batch": {},
  }
  if search:
    for name, gib in budgets_gib.items():
      report["max_micro_batch"][name] = planner.max_micro_batch(gib * GiB)
  report["evaluated"] = [planner.results[b] for b in sorted(planner.results)]
  return report


def to_markdown(report: dict, command: str) -> str:
  s = report["at_micro_batch"]
  mesh = report["mesh"]
  lines = [
    f"# Memory plan: {report['program']}",
    "",
    f"Command: `{command}`",
    "",
    f"Mesh {mesh} on {report['devices']} fake CPU devices; rules: "
    + ", ".join(f"{k}->{v}" for k, v in report["rules"]) + ".",
    "Everything abstract (ShapeDtypeStruct + NamedSharding); numbers are XLA:CPU's "
    "per-device buffer assignment of the compiled SPMD step (see emo_jax/perf/memory_plan.py for "
    "caveats: TPU compilers differ, so confirm on hardware).",
    "",
  ]
  info = report.get("info", {})
  if info:
    lines += ["| model | value |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" if isinstance(v, int) else f"| {k} | {v} |"
              for k, v in info.items()]
    lines.append("")
  lines += [
    f"## Per device at micro-batch {s['micro_batch']} (global batch {s['global_batch']})",
    "",
    "| quantity | GiB |",
    "|---|---|",
    f"| arguments (train state + frozen weights + batch) | {s['argument_bytes'] / GiB:.3f} |",
    f"| outputs | {s['output_bytes'] / GiB:.3f} |",
    f"| aliased (donated state) | {s['alias_bytes'] / GiB:.3f} |",
    f"| temporaries | {s['temp_bytes'] / GiB:.3f} |",
    f"| **peak = args + outputs - aliased + temps** | **{s['peak_bytes'] / GiB:.3f}** |",
    "",
    f"FLOPs per step (global batch {s['global_batch']}): {s['matmul_flops_per_step']:.4g} "
    "matmul/conv FLOPs counted from the step's jaxpr (scan trip counts included, remat "
    f"recompute included); XLA cost_analysis says {s['xla_flops_per_step']:.4g} "
    f"({s['flops_per_device']:.4g} per device), which counts each loop body once "
    "(scanned layers!), so it undercounts.",
    "",
  ]
  if report["max_micro_batch"]:
    lines += ["## Largest per-device micro-batch that fits", "",
              "| chip | HBM GiB | max micro-batch | peak GiB at it |", "|---|---|---|---|"]
    by_b = {r["micro_batch"]: r for r in report["evaluated"]}
    for name, b in report["max_micro_batch"].items():
      peak = f"{by_b[b]['peak_bytes'] / GiB:.2f}" if b in by_b else "-"
      lines.append(f"| {name} | {report['budgets_gib'][name]:g} | {b} | {peak} |")
    lines.append("")
  lines += ["## All compiled points", "",
            "| micro-batch | global batch | peak GiB | temp GiB | matmul TFLOPs/step | compile s |",
            "|---|---|---|---|---|---|"]
  for r in report["evaluated"]:
    lines.append(f"| {r['micro_batch']} | {r['global_batch']} | {r['peak_bytes'] / GiB:.2f} | "
                 f"{r['temp_bytes'] / GiB:.2f} | {r['matmul_flops_per_step'] / 1e12:.1f} | "
                 f"{r['compile_seconds']} |")
  return "\n".join(lines) + "\n"


def write_report(report: dict, out: str | os.PathLike, command: str) -> tuple[pathlib.Path, ...]:
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  j, m = out.with_suffix(".json"), out.with_suffix(".md")
  j.write_text(json.dumps({**report, "command": command}, indent=1) + "\n")
  m.write_text(to_markdown(report, command))
  return j, m


def expected_argument_bytes(program: Program, mesh, global_batch: int) -> int:
  """Per-device bytes of the step's inputs, from their shardings' shard shapes (a check on
  memory_analysis(): every argument is one shard per device). An upper bound when the step
  leaves some inputs unread: jit drops unused arguments."""
  state = abstract_train_state(program)
  total = 0
  trees = (state, program.frozen)
  shards = sharding_lib.state_and_frozen_shardings(state, program.frozen, mesh, program.rules)
  for tree, shardings in zip(trees, shards):
    # Leaves of the abstract tree (ShapeDtypeStructs) pair up with NamedShardings.
    for val, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
      total += math.prod(sh.shard_shape(val.shape)) * np.dtype(val.dtype).itemsize
  bsh = sharding_lib.batch_sharding(mesh)
  for x in jax.tree.leaves(program.batch_spec(global_batch)):
    total += math.prod(bsh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return int(total)


def run_plan(program: Program, mesh_shape: Sequence[int], micro_batch: int = 1,
             search: bool = True, budgets_gib: Mapping[str, float] | None = None,
             out: str | None = None, command: str = "", log=print) -> dict:
  """Plan `program` on a mesh of the current (fake) devices; optionally write the report."""
  mesh = sharding_lib.make_mesh(tuple(mesh_shape))
  planner = Planner(program, mesh, log=log)
  report = plan_report(planner, micro_batch, budgets_gib or BUDGETS_GIB, search=search)
  if out:
    for p in write_report(report, out, command):
      log(f"wrote {p}")
  return report


def parse_mesh(text: str) -> tuple[int, int, int]:
  parts = tuple(int(p) for p in text.split(","))
  if len(parts) != 3:
    raise ValueError(f"--mesh must be data,fsdp,tensor, got {text!r}")
  return parts
