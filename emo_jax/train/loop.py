"""The training loop: build, shard, restore, step, log, checkpoint, stop on SIGTERM.

    model  = task.build_model (random init, then config.init checkpoints)
    split  -> graphdef / trainable params / rng streams / frozen rest   (train.state)
    shard  -> every Variable by its logical axes under config.sharding.rules on a
              ('data', 'fsdp', 'tensor') mesh; the batch over ('data', 'fsdp')
    restore the latest committed checkpoint (state + grain iterator) if any
    loop:  next batch -> jitted train_step (state donated) -> metrics -> maybe save
    SIGTERM (preemptible TPU VMs): finish the current step, save, wait, exit

Metrics go through clu writers (TensorBoard + log, process 0 only): loss, learning rate
(per group), grad norm, tokens/s (answer tokens with loss), steps/s and ETA
(ReportProgress), matmul TFLOP/s per device and, given a peak, utilisation `hfu` = matmul
FLOPs per step / step time / peak FLOP/s of the devices (`config.train.peak_flops_per_device`;
0 -> none). The FLOPs are counted on the step's jaxpr (`step_matmul_flops_per_device`), remat
recompute included, hence hardware (not model) FLOPs utilisation.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import periodic_actions
from flax import nnx

from emo_jax import dtypes
from emo_jax import sharding as sharding_lib
from emo_jax.perf.flops import jaxpr_matmul_flops
from emo_jax.train import checkpoint as ckpt_lib
from emo_jax.train import optimizer as opt_lib
from emo_jax.train import state as state_lib
from emo_jax.train import step as step_lib
from emo_jax.train import task as task_lib
from emo_jax.train import writers as writers_lib
from emo_jax.train.errors import MissingCheckpointError, NonFiniteError
from input_pipeline import paths
from input_pipeline import pipeline as pipeline_lib
from input_pipeline.records import SkipCounter

# Peak dense FLOP/s per device by device kind (bf16; public spec sheets). Our table, used
# only when config.train.peak_flops_per_device is unset (-1). The first key that the device
# kind starts with wins, so more specific kinds come first.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100": 989e12,
              "NVIDIA H200": 989e12,
              "NVIDIA A100": 312e12}


class Preemption:
  """SIGTERM (preemption) and SIGINT (Ctrl-C) -> a flag the loop reads between steps
  (agreed across hosts); the loop then saves a checkpoint and exits. A second Ctrl-C
  stops at once, without saving."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._prev: dict = {}

  def install(self):
    def handler(signum, frame):
      del frame
      if self.requested and signum == signal.SIGINT:
        self.uninstall()
        raise KeyboardInterrupt
      logging.warning("%s received: will save a checkpoint and exit (Ctrl-C again to stop "
                      "without saving)", signal.Signals(signum).name)
      self.requested = True
    for sig in self.SIGNALS:
      self._prev[sig] = signal.signal(sig, handler)
    return self

  def uninstall(self):
    for sig, prev in self._prev.items():
      signal.signal(sig, prev)
    self._prev = {}

  def should_stop(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return bool(np.any(flags))


def peak_flops_of_kind(device_kind: str) -> float:
  """PEAK_FLOPS for a device kind (first key it starts with); 0.0 if unknown."""
  for k, f in PEAK_FLOPS.items():
    if device_kind.startswith(k):
      return f
  return 0.0


def peak_flops(config) -> float:
  v = float(config.train.get("peak_flops_per_device", -1))
  if v >= 0:
    return v
  return peak_flops_of_kind(jax.devices()[0].device_kind)


def step_matmul_flops_per_device(traced) -> float:
  """Matmul FLOPs per device of one call of a traced jitted step (`jitted.trace(*args)`).

  Counted on the traced program with loop trip counts (`perf.flops.jaxpr_matmul_flops`).
  XLA's `cost_analysis()` counts a scanned layer stack's body once (8 scanned layers of a
  tiny LLaMA forward: 6.5 MFLOP against 47.9 MFLOP unrolled), so a scanned LLaMA-2-7B step
  would read about 20 times too few FLOPs (one layer plus the LM head). The global count is
  split evenly over the devices (the SPMD convention). Remat recompute is traced, so it
  counts.
  """
  flops, _ = jaxpr_matmul_flops(traced.jaxpr.jaxpr)
  return flops / jax.device_count()


def make_mesh(config):
  shape = tuple(config.mesh.shape)
  return sharding_lib.make_mesh(shape)


def rules_of(config):
  r = config.sharding.rules
  if isinstance(r, str):
    return sharding_lib.PRESETS[r]
  return tuple((a, tuple(b) if isinstance(b, list) else b) for a, b in r)


def total_steps(config, num_records: int) -> int:
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  bs = config.data.pipeline.global_batch_size
  return max(1, int(np.ceil(config.train.num_epochs * num_records / bs)))


@dataclasses.dataclass
class Built:
  """What train / eval / export share: the split model on its mesh."""
  model_cfg: Any
  graphdef: Any
  params: Any
  rngs: Any
  frozen: Any
  mesh: Any
  rules: Any
  paths: dict


def build(config, workdir: str, *, read_only: bool = False) -> Built:
  """Model (random init + pretrained parts), split and placed on the mesh. `read_only`:
  the data must already exist (nothing is generated)."""
  paths = task_lib.prepare_data(config, workdir, generate=not read_only)
  model_cfg = task_lib.model_config(config)
  mesh = make_mesh(config)
  rules = rules_of(config)
  trainable = task_lib.trainable_filter(model_cfg)

  # Random init as one jitted program with the target shardings (no host copy, no
  # per-op dispatch); pretrained parts are then loaded over it.
  abstract = nnx.eval_shape(lambda: task_lib.build_model(config))
  graphdef, *abstract_parts = state_lib.split_model(abstract, trainable)
  shardings = [sharding_lib.tree_shardings(a, mesh, rules) for a in abstract_parts]

  @functools.partial(jax.jit, out_shardings=tuple(shardings))
  def init():
    return tuple(state_lib.split_model(task_lib.build_model(config), trainable)[1:])

  params, rngs, frozen = init()
  if _has_pretrained(config):
    model = state_lib.merge_model(graphdef, params, rngs, frozen)
    task_lib.load_pretrained(model, config)
    graphdef, params, rngs, frozen = state_lib.split_model(model, trainable)
    params = sharding_lib.shard_state(params, mesh, rules)
    frozen = sharding_lib.shard_state(frozen, mesh, rules)
  return Built(model_cfg, graphdef, params, rngs, frozen, mesh, rules, paths)


def _has_pretrained(config) -> bool:
  init = config.get("init") or {}
  return any(v for k, v in init.items() if k != "allow_pickle")


def close_run(checkpointer, writer, preempt) -> None:
  """Ends a training run's resources: waits for the last save, flushes (and, for a cloud
  workdir, uploads) the metrics, restores the signal handlers."""
  checkpointer.close()
  writer.close()
  preempt.uninstall()


def train(config, workdir: str) -> dict:
  """Trains (resuming if a checkpoint exists). Returns a summary dict."""
  paths.makedirs(workdir)
  built = build(config, workdir)
  toks = task_lib.tokenizers(built.paths)
  if toks[0].vocab_size > built.model_cfg.llm.vocab_size:
    raise ValueError(f"tokenizer has {toks[0].vocab_size} ids but the LLM only "
                     f"{built.model_cfg.llm.vocab_size}")
  skips = SkipCounter(strict=bool(config.data.get("strict", False)))
  raw_iter, num_records = task_lib.train_iterator(config, workdir, built.model_cfg, toks, skips)
  train_iter = ckpt_lib.CheckpointableIterator(raw_iter)
  num_steps = total_steps(config, num_records)
  pads = pipeline_lib.sequence_pad_values(toks[0].pad_id)

  tx, schedules = opt_lib.make_optimizer(config.optimizer.to_dict(), num_steps, built.params)
  state = state_lib.create_train_state(built.params, built.rngs, tx)
  state_sh, frozen_sh = sharding_lib.state_and_frozen_shardings(state, built.frozen, built.mesh,
                                                            built.rules)
  state = jax.device_put(state, state_sh)
  logging.info("trainable parameters: %s, frozen: %s", f"{opt_lib.count_params(state.params):,}",
               f"{opt_lib.count_params(built.frozen):,}")

  checkpointer = ckpt_lib.Checkpointer.for_training(workdir, config.checkpoint)
  state, start = checkpointer.restore_or_start(state, train_iter)
  if start >= num_steps:
    print(f"nothing to train: the checkpoint is at step {start} and train.num_steps is "
          f"{num_steps}; using the step-{start} model", flush=True)

  compute_dtype = dtypes.compute_dtype(config.train.compute_dtype)
  step_fn = step_lib.jit_train_step(
      built.graphdef, tx, task_lib.loss_fn, state_shardings=state_sh,
      frozen_shardings=frozen_sh, batch_sharding=sharding_lib.batch_sharding(built.mesh),
      accum_steps=config.train.accum_steps, compute_dtype=compute_dtype)

  is_main = jax.process_index() == 0
  writer = writers_lib.metric_writer(workdir, is_main=is_main)
  writer.write_hparams({k: v for k, v in _flat_hparams(config).items()})
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_secs=None,
                                           every_steps=max(config.train.log_every, 1))
  preempt = Preemption().install()
  peak = peak_flops(config)   # the compiled cost is the per-device SPMD program
  compiled: dict = {}
  t_last = t_first = time.time()
  pending: list[dict] = []   # device metrics since the last log (fetched when logging)
  step = start
  stopped = False
  hash_log = hash_stage = None
  if config.train.get("log_batch_hashes", False):   # appended locally, uploaded at saves
    hash_stage = paths.StagedDir(workdir)
    name = f"batch_hashes.{jax.process_index()}.jsonl"
    if hash_stage.remote and paths.exists(paths.join(workdir, name)):   # a resumed run
      paths.copy_file(paths.join(workdir, name), os.path.join(hash_stage.local, name))
    hash_log = open(os.path.join(hash_stage.local, name), "a")
  try:
    with sharding_lib.use_mesh_rules(built.mesh, built.rules):
      while step < num_steps:
        host_batch = next(train_iter)
        if hash_log is not None:   # data provenance: which examples each step saw
          hash_log.write(json.dumps({"step": step + 1, "sha1": _batch_sha1(host_batch)}) + "\n")
          hash_log.flush()
        batch = sharding_lib.common_sequence_length(task_lib.model_batch(host_batch), pads)
        batch = sharding_lib.to_global_batch(batch, built.mesh)
        key = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if key not in compiled:   # one compile per bucket length
          traced = step_fn.trace(state, built.frozen, batch)
          compiled[key] = (traced.lower().compile(), step_matmul_flops_per_device(traced))
        fn, flops = compiled[key]
        state, m = fn(state, built.frozen, batch)
        pending.append(dict(m, flops=flops, step=step + 1))
        step += 1
        if step == start + 1:
          t_first = time.time()   # the ETA leaves the first step's compile out
        report(step)
        stop = preempt.should_stop()
        will_save = stop or step == num_steps or checkpointer.should_save(step)
        if step % config.train.log_every == 0 or step == num_steps or will_save:
          ms = jax.device_get(pending)
          _check_finite(ms)   # before any save: no checkpoint holds non-finite weights
        if step % config.train.log_every == 0 or step == num_steps:
          dt = max(time.time() - t_last, 1e-9)
          scalars = {"loss": float(np.mean([x["loss"] for x in ms])),
                     "grad_norm": float(np.mean([x["grad_norm"] for x in ms])),
                     "tokens_per_sec": float(sum(x["tokens"] for x in ms)) / dt,
                     "steps_per_sec": len(ms) / dt}
          for name, sched in schedules.items():
            scalars[f"lr/{name}"] = float(sched(step - 1))
          flops_per_s = float(sum(x["flops"] for x in ms)) / dt
          scalars["matmul_tflops_per_device"] = flops_per_s / 1e12
          if peak > 0:
            scalars["hfu"] = flops_per_s / peak
          writer.write_scalars(step, scalars)
          print(_progress_line(step, num_steps, scalars, time.time() - t_first,
                               step - start - 1), flush=True)
          t_last, pending = time.time(), []
        if will_save:
          checkpointer.save(step, state, train_iter)
          if hash_stage is not None:
            hash_log.flush()
            hash_stage.sync()
        if stop:
          stopped = True
          logging.warning("stopping at step %d after a stop signal (checkpoint saved)", step)
          break
  finally:
    if hash_log is not None:
      hash_log.close()
      hash_stage.close()
    close_run(checkpointer, writer, preempt)
  if skips.total or skips.truncations:
    logging.warning(skips.report())
  return {"step": step, "num_steps": num_steps, "preempted": stopped,
          "trained_steps": step - start, "skipped": skips.counts,
          "truncated": skips.truncations, "state": state, "built": built}


def _check_finite(metrics: list[dict]) -> None:
  """Raises NonFiniteError at the first step whose loss or gradient norm is not finite."""
  for m in metrics:
    for k in ("loss", "grad_norm"):
      if not np.isfinite(m[k]):
        raise NonFiniteError(
            f"training stopped: {k} is {float(m[k])} at step {m['step']}; no checkpoint was "
            "written after it (lower optimizer.lr, check the data, or resume from the last "
            "checkpoint)")


def _progress_line(step: int, num_steps: int, scalars: dict, elapsed: float,
                   done: int) -> str:
  """`step=25 loss=1.2345 | 25/2400 (1%) | 3.10 steps/s | ETA 12m47s`: steps/s and ETA
  over the `done` steps of this run after its first (which includes the compile)."""
  rate = done / elapsed if done > 0 and elapsed > 0 else 0.0
  eta = (num_steps - step) / rate if rate > 0 else float("inf")
  speed = f"{rate:.2f} steps/s" if rate > 0 else "compiling"
  return (f"step={step} loss={scalars['loss']:.4f} | {step}/{num_steps} "
          f"({100 * step // max(num_steps, 1)}%) | {speed} | ETA {_duration(eta)}")


def _duration(secs: float) -> str:
  if not np.isfinite(secs):
    return "?"
  secs = int(round(secs))
  h, rem = divmod(secs, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _batch_sha1(batch) -> str:
  h = hashlib.sha1()
  for k in sorted(batch):
    a = np.ascontiguousarray(np.asarray(batch[k]))
    h.update(k.encode())
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _flat_hparams(config) -> dict:
  out = {}

  def walk(prefix, d):
    for k, v in d.items():
      key = f"{prefix}{k}"
      if hasattr(v, "items"):
        walk(key + ".", v)
      elif isinstance(v, (int, float, str, bool)):
        out[key] = v
  walk("", config)
  return out


def restore_trained(config, workdir: str, step: int | None = None) -> tuple[Built, Any, int]:
  """The model of a workdir: built from the config, trainable params from the latest (or
  given) committed checkpoint. Returns (built, merged nnx model, step). Read-only: the
  checkpoint is looked up first (MissingCheckpointError before any other work) and
  nothing is written."""
  ck_dir = ckpt_lib.checkpoint_dir(workdir)
  checkpointer = ckpt_lib.Checkpointer(ck_dir, read_only=True)
  try:
    if step is None:
      step = checkpointer.latest_step()
    if step is None:
      raise MissingCheckpointError(f"no committed checkpoint in {ck_dir}: train first "
                                   "(--mode=train) or check --workdir")
    logging.info("using checkpoint step %d of %s", step, ck_dir)
    built = build(config, workdir, read_only=True)
    tx, _ = opt_lib.make_optimizer(config.optimizer.to_dict(), 1, built.params)
    template = state_lib.create_train_state(built.params, built.rngs, tx)
    state, step = checkpointer.restore(template, None, step=step)
  finally:
    checkpointer.close()
  model = state_lib.merge_model(built.graphdef, state.params, state.rngs, built.frozen)
  return built, model, step
