"""The DPO and GRPO jobs: `python -m emo_jax.main --mode=dpo|grpo`.

    start   the model of `config` (random / pretrained, as training builds it), its
            trainable weights replaced by the latest checkpoint of `<algo>.init_workdir`
            (an SFT run's workdir) when given; the reference (reference.py) is made here
    state   the SFT TrainState layout (params, optimizer, rng streams) on the same mesh
            and shardings as training, so --mode=eval / export / predict read a
            post-training workdir as they read an SFT one
    resume  the latest committed checkpoint of `<workdir>/checkpoints` with the data
            position; for GRPO the rollout RNG key travels with the data position (it is
            host state, saved at the same step), so a killed run resumes bit-exactly
    step    DPO: a pair batch -> one jitted update (train.step, reference weights as the
            non-donated `extra`); GRPO: a prompt batch -> G rollouts per prompt (jitted
            sampler, one compile per prompt bucket) -> rewards on the host -> group
            advantages -> `num_iterations` jitted updates
    end     evaluation (config.eval) and export (config.export) as after SFT

Logged (clu writers and `<workdir>/posttrain_log.jsonl`, process 0): loss, grad norm, DPO's
rewards/margins/accuracies and chosen/rejected log-probs, GRPO's mean reward per reward
function, KL, clipped fraction, completion length, rollout tokens/s and step times.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers
from flax import nnx

from emo_jax import dtypes
from emo_jax import sharding as sharding_lib
from emo_jax.models import generation
from emo_jax.posttrain import data as data_lib
from emo_jax.posttrain import dpo as dpo_lib
from emo_jax.posttrain import grpo as grpo_lib
from emo_jax.posttrain import reference as ref_lib
from emo_jax.posttrain import rewards as rewards_lib
from emo_jax.train import checkpoint as ckpt_lib
from emo_jax.train import loop as loop_lib
from emo_jax.train import optimizer as opt_lib
from emo_jax.train import state as state_lib
from emo_jax.train import step as step_lib
from emo_jax.train import task as task_lib
from input_pipeline import paths
from input_pipeline import pipeline as pipeline_lib
from input_pipeline.records import SkipCounter

MODES = ("dpo", "grpo")
LOG_FILE = "posttrain_log.jsonl"


class RolloutKeyIterator:
  """Batches paired with the rollout key of their step; the key is part of the iterator's
  checkpointed state (key data as integers), so a restored run samples the same tokens."""

  def __init__(self, inner, seed: int):
    self.inner = inner
    self.key_data = np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.inner)
    key, sub = jax.random.split(jax.random.wrap_key_data(self.key_data))
    self.key_data = np.asarray(jax.random.key_data(key), np.uint32)
    return batch, sub

  def get_state(self) -> dict:
    s = self.inner.get_state()
    return {"inner": s.decode("latin-1") if isinstance(s, bytes) else s,
            "inner_bytes": isinstance(s, bytes), "rollout_key": self.key_data.tolist()}

  def set_state(self, state: dict) -> None:
    inner = state["inner"]
    self.inner.set_state(inner.encode("latin-1") if state.get("inner_bytes") else inner)
    self.key_data = np.asarray(state["rollout_key"], np.uint32)


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array (all rows on one process)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
  n = full.shape[0] // jax.process_count()
  return full[jax.process_index() * n:(jax.process_index() + 1) * n]


def _all_processes(x) -> np.ndarray:
  """Host-local rows of every process, concatenated in process order (for logging)."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def restore_start(config, built, init_workdir: str):
  """Trainable params of the latest committed checkpoint of an SFT workdir."""
  tx, _ = opt_lib.make_optimizer(config.optimizer.to_dict(), 1, built.params)
  template = state_lib.create_train_state(built.params, built.rngs, tx)
  ck = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(paths.resolve(init_workdir)),
                             read_only=True)
  restored = ck.restore(template, None)
  ck.close()
  if restored is None:
    raise FileNotFoundError(f"no committed checkpoint under {init_workdir}/checkpoints "
                            "(init_workdir must be a trained SFT workdir)")
  state, step = restored
  logging.info("post-training starts from %s step %d", init_workdir, step)
  return state.params, step


def scaled_optimizer(opt: dict, scale: float) -> dict:
  """config.optimizer with every peak learning rate times `scale` (same groups)."""
  opt = dict(opt)
  opt["lr"] = float(opt["lr"]) * scale
  opt["groups"] = tuple((g[0], g[1], float(g[2]) * scale) for g in opt.get("groups", ()))
  return opt


def _decode(tok, rows: np.ndarray) -> list[str]:
  out = []
  for row in rows:
    row = [int(t) for t in row]
    if tok.eos_id in row:
      row = row[:row.index(tok.eos_id)]
    out.append(tok.decode([t for t in row if t >= 0]))
  return out


def _class_counts(config, workdir: str) -> dict[str, int]:
  recs = task_lib.train_records(config, workdir, SkipCounter())
  counts: dict[str, int] = {}
  for r in recs:
    if r.label is not None:
      counts[r.label] = counts.get(r.label, 0) + 1
  return counts


def run(config, workdir: str, mode: str) -> dict:
  """Runs DPO or GRPO in `workdir` (resuming if it has checkpoints). Returns a summary."""
  if mode not in MODES:
    raise ValueError(f"unknown post-training mode {mode!r}; known: {MODES}")
  if not config.get(mode):
    raise ValueError(f"the config has no `{mode}` section (see configs/posttrain.py)")
  pc = config[mode]
  workdir = paths.resolve(workdir)
  paths.makedirs(workdir)
  built = loop_lib.build(config, workdir)
  tok, qtok = task_lib.tokenizers(built.paths)
  skips = SkipCounter(strict=bool(config.data.get("strict", False)))
  start_params = built.params
  if pc.init_workdir:
    start_params, _ = restore_start(config, built, pc.init_workdir)
  model0 = state_lib.merge_model(built.graphdef, start_params, built.rngs, built.frozen)
  reference = ref_lib.resolve_mode(pc.reference, model0)
  ref_params = ref_lib.reference_params(start_params, reference)
  num_steps = int(pc.num_steps)

  # ---- data
  pcfg = task_lib.pipeline_config(config, built.model_cfg, shuffle=True, num_epochs=None,
                                  drop_remainder=True, seed=config.seed,
                                  global_batch_size=int(pc.batch_size))
  root = task_lib.data_root(config, workdir)
  if mode == "dpo":
    if pc.pairs:
      pairs = data_lib.read_pairs(pc.pairs, pc.get("pairs_root") or root, skips)
    else:
      pairs = data_lib.ambiguity_pairs(task_lib.train_records(config, workdir, skips),
                                       kinds=tuple(pc.rejected_kinds),
                                       pairs_per_record=int(pc.pairs_per_record),
                                       seed=config.seed)
      if jax.process_index() == 0:
        n = data_lib.write_pairs(pairs, os.path.join(workdir, "dpo_pairs.jsonl"), root)
        logging.info("wrote %d ambiguity-aware pairs to %s/dpo_pairs.jsonl", n, workdir)
    if not pairs:
      raise ValueError(f"no usable preference pairs\n{skips.report()}")
    data_iter = ckpt_lib.CheckpointableIterator(
        data_lib.pair_iterator(pairs, pcfg, tok, qtok, skips))
    loss_fn = dpo_lib.make_loss_fn(beta=float(pc.beta), label_smoothing=float(pc.label_smoothing),
                                   loss_type=pc.loss_type, reference=reference,
                                   rpo_alpha=pc.get("rpo_alpha"))
  else:
    recs = task_lib.train_records(config, workdir, skips)
    inner = pipeline_lib.make_iterator(recs, pcfg, tok, qtok, skips=skips)
    data_iter = ckpt_lib.CheckpointableIterator(RolloutKeyIterator(inner, config.seed + 7))
    reward_fns = rewards_lib.build(tuple(pc.rewards), class_counts=_class_counts(config, workdir))
    g = int(pc.num_generations)
    sampling = generation.SamplingConfig(temperature=float(pc.temperature), top_k=int(pc.top_k),
                                         top_p=float(pc.top_p))
    rollout = grpo_lib.make_rollout(built.graphdef, num_generations=g,
                                    max_new_tokens=int(pc.max_completion_length),
                                    sampling=sampling, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                    process_count=jax.process_count())

  # ---- state, step, checkpoints
  tx, schedules = opt_lib.make_optimizer(scaled_optimizer(config.optimizer.to_dict(),
                                                          float(pc.get("lr_scale", 1.0))),
                                         num_steps * int(pc.get("num_iterations", 1)),
                                         start_params)
  state = state_lib.create_train_state(start_params, built.rngs, tx)
  state_sh, frozen_sh = sharding_lib.state_and_frozen_shardings(state, built.frozen, built.mesh,
                                                            built.rules)
  ref_sh = sharding_lib.tree_shardings(ref_params, built.mesh, built.rules)
  state = jax.device_put(state, state_sh)
  ref_params = jax.device_put(ref_params, ref_sh)
  compute_dtype = dtypes.compute_dtype(config.train.compute_dtype)
  checkpointer = ckpt_lib.Checkpointer.for_training(workdir, config.checkpoint)
  state, start = checkpointer.restore_or_start(state, data_iter)
  steps_cache: dict = {}
  pads = pipeline_lib.sequence_pad_values(tok.pad_id)

  def step_fn(prompt_len: int | None):
    if prompt_len not in steps_cache:
      fn = loss_fn if mode == "dpo" else grpo_lib.make_loss_fn(
          prompt_len=prompt_len, beta=float(pc.beta), epsilon=float(pc.epsilon),
          epsilon_high=pc.get("epsilon_high"), loss_type=pc.loss_type, reference=reference)
      steps_cache[prompt_len] = step_lib.jit_train_step(
          built.graphdef, tx, fn, state_shardings=state_sh, frozen_shardings=frozen_sh,
          batch_sharding=sharding_lib.batch_sharding(built.mesh), extra_shardings=ref_sh,
          with_extra=True, accum_steps=config.train.accum_steps, compute_dtype=compute_dtype)
    return steps_cache[prompt_len]

  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main,
                                                asynchronous=False)
  log_f = open(os.path.join(workdir, LOG_FILE), "a") if is_main else None
  preempt = loop_lib.Preemption().install()
  step, stopped, last = start, False, {}
  t_last = time.time()
  try:
    with sharding_lib.use_mesh_rules(built.mesh, built.rules):
      while step < num_steps:
        t0 = time.time()
        if mode == "dpo":
          batch = sharding_lib.common_sequence_length(next(data_iter), pads)
          state, m = step_fn(None)(state, built.frozen,
                                   sharding_lib.to_global_batch(batch, built.mesh), ref_params)
          m = jax.device_get(m)
          aux = m.pop("aux")
          n = max(float(aux.pop("pairs")), 1.0)
          scalars = {k: float(v) / n for k, v in aux.items()}
        else:
          (host_batch, key) = next(data_iter)
          host_batch = sharding_lib.common_sequence_length(host_batch, pads)
          state, scalars = _grpo_step(state, host_batch, key, built, tok, rollout, step_fn,
                                      reward_fns, pc, ref_params)
          m = scalars.pop("_m")
        step += 1
        scalars.update(loss=float(m["loss"]), grad_norm=float(m["grad_norm"]),
                       step_time_s=time.time() - t0)
        for name, sched in schedules.items():
          scalars[f"lr/{name}"] = float(sched(int(state.step) - 1))
        last = scalars
        if step % max(int(config.train.log_every), 1) == 0 or step == num_steps:
          writer.write_scalars(step, scalars)
          if log_f is not None:
            log_f.write(json.dumps({"step": step, "time": time.time() - t_last, **scalars}) + "\n")
            log_f.flush()
          print(f"step={step} loss={scalars['loss']:.4f}", flush=True)
        stop = preempt.should_stop()
        if stop or step == num_steps or checkpointer.should_save(step):
          checkpointer.save(step, state, data_iter)
        if stop:
          stopped = True
          logging.warning("stopping at step %d after SIGTERM (checkpoint saved)", step)
          break
  finally:
    if log_f is not None:
      log_f.close()
    loop_lib.close_run(checkpointer, writer, preempt)
  if skips.total:
    logging.warning(skips.report())
  summary = {"mode": mode, "step": step, "num_steps": num_steps, "preempted": stopped,
             "skipped": skips.counts, "reference": reference,
             "last": {k: v for k, v in last.items() if not k.startswith("lr/")}}
  if stopped:
    return summary
  model = None
  if config.eval.at_end or config.export.at_end:
    model = state_lib.merge_model(built.graphdef, state.params, state.rngs, built.frozen)
  if config.eval.at_end:
    from emo_jax.train import evaluate
    summary["eval"] = evaluate.evaluate(config, workdir, model=model, step=step)
  if config.export.at_end:
    from emo_jax.train import export
    summary["export"] = export.export(config, workdir, model=model,
                                      out_dir=paths.join(workdir, "export"))
  return summary


@functools.lru_cache(maxsize=None)
def _old_logps_fn(graphdef, prompt_len: int):
  return grpo_lib.make_old_logps(graphdef, prompt_len=prompt_len)


def _grpo_step(state, host_batch, key, built, tok, rollout, step_fn, reward_fns, pc,
               ref_params):
  """One GRPO step: rollout, rewards, advantages, `num_iterations` updates."""
  g = int(pc.num_generations)
  prompt = data_lib.prompt_batch(host_batch, tok.pad_id)
  fields = data_lib.prompt_fields(prompt, tok)
  model_prompt = {k: v for k, v in prompt.items() if k in task_lib.MODEL_KEYS and k != "loss_mask"}
  t0 = time.time()
  comps = rollout(state.params, state.rngs, built.frozen, sharding_lib.to_global_batch(model_prompt, built.mesh), key)
  comps = _local_rows(comps)
  t_roll = time.time() - t0
  texts = _decode(tok, comps)
  rep = lambda xs: [x for x in xs for _ in range(g)]   # noqa: E731
  total, per = rewards_lib.total_rewards(
      reward_fns, list(pc.reward_weights) or None, rep(fields["prompts"]), texts,
      options=rep(fields["options"]), label_index=rep(fields["label_index"]),
      answer=rep(fields["answer"]))
  adv = grpo_lib.group_advantages(total, g, scale_rewards=bool(pc.scale_rewards))
  ub = grpo_lib.update_batch(prompt, comps, adv, g, tok.eos_id, tok.pad_id)
  prompt_len = prompt["input_ids"].shape[1]
  gb = sharding_lib.to_global_batch(ub, built.mesh)
  iters = int(pc.get("num_iterations", 1))
  if iters > 1:
    old = _old_logps_fn(built.graphdef, prompt_len)
    gb["old_logps"] = old(state.params, state.rngs, built.frozen, gb)
  t1 = time.time()
  for _ in range(iters):
    state, m = step_fn(prompt_len)(state, built.frozen, gb, ref_params)
  m = jax.device_get(m)
  t_upd = time.time() - t1
  aux = m.pop("aux")
  ntok = max(float(aux["completion_tokens"]), 1.0)
  total, per = _all_processes(total), {k: _all_processes(v) for k, v in per.items()}
  scalars = {"reward": float(np.mean(total)), "reward_std": float(np.std(total)),
             "completion_length": float(aux["completion_tokens"]) / max(float(aux["completions"]), 1.0),
             "clip_ratio": float(aux["clipped_sum"]) / ntok,
             "rollout_s": t_roll, "update_s": t_upd / iters,
             "rollout_tokens_per_s": float(ub["completion_mask"].sum()) / max(t_roll, 1e-9),
             "_m": m}
  if "kl_sum" in aux:
    scalars["kl"] = float(aux["kl_sum"]) / ntok
  for name, r in per.items():
    scalars[f"rewards/{name}"] = float(np.mean(r))
  return state, scalars
