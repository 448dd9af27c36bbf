"""Settings checked before any data, model or compilation work: one ConfigError line each.

`validate(config, mode)` reads the config tree only (no files). Training settings are
checked in train mode; dtype names, evaluation, predict and export settings in every mode.
"""
from __future__ import annotations

import math
from typing import Any

from emo_jax import dtypes
from emo_jax.train.errors import ConfigError

MODES = ("train", "eval", "predict", "export", "dpo", "grpo", "au")
EVAL_MODES = ("generate", "likelihood")
EXPORT_FORMATS = ("hf", "peft", "bundle")
FACE_MODES = ("detect", "aligned")


def _get(config, dotted: str, default: Any = None) -> Any:
  node = config
  for part in dotted.split("."):
    if node is None or not hasattr(node, "get"):
      return default
    node = node.get(part, None)
  return default if node is None else node


def _number(config, key: str, *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, integer: bool = False) -> None:
  v = _get(config, key)
  if v is None:
    return
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise ConfigError(f"config.{key} must be a number, got {v!r}")
  if integer and (not float(v).is_integer()):
    raise ConfigError(f"config.{key} must be an integer, got {v!r}")
  if not math.isfinite(v):
    raise ConfigError(f"config.{key} must be finite, got {v}")
  if lo is not None and (v <= lo if lo_open else v < lo):
    raise ConfigError(f"config.{key} must be {'>' if lo_open else '>='} {lo:g}, got {v:g}")
  if hi is not None and v > hi:
    raise ConfigError(f"config.{key} must be <= {hi:g}, got {v:g}")


def _dtype(config, key: str) -> None:
  v = _get(config, key)
  if v is None or not isinstance(v, str):
    return
  try:
    dtypes.to_dtype(v)
  except ValueError:
    raise ConfigError(f"config.{key} = {v!r} is not a dtype name; use one of "
                      f"{list(dtypes.NAMES)}") from None


def _choices(config, key: str, allowed, *, many: bool = False) -> None:
  v = _get(config, key)
  if v is None:
    return
  values = list(v) if many and not isinstance(v, str) else [v]
  bad = [x for x in values if x not in allowed]
  if bad:
    raise ConfigError(f"config.{key} has {bad}; allowed: {list(allowed)}")


def validate(config, mode: str) -> None:
  """Raises ConfigError naming the first setting that cannot work for `mode`."""
  if mode not in MODES:
    raise ConfigError(f"unknown mode {mode!r}; use one of {MODES}")
  for sub in ("llm", "vision", "qformer"):
    for k in ("dtype", "param_dtype"):
      _dtype(config, f"model.{sub}.{k}")
  _dtype(config, "train.compute_dtype")
  _dtype(config, "export.dtype")
  _number(config, "data.pipeline.global_batch_size", lo=1, integer=True)
  _number(config, "data.pipeline.num_frames", lo=1, integer=True)
  _number(config, "data.pipeline.max_length", lo=1, integer=True)
  _number(config, "model.lora_rank", lo=0, integer=True)
  if mode == "train":
    _validate_train(config)
  if mode in ("train", "eval"):
    _choices(config, "eval.modes", EVAL_MODES, many=True)
    _number(config, "eval.batch_size", lo=1, integer=True)
    _number(config, "eval.max_new_tokens", lo=1, integer=True)
  if mode == "predict":
    _choices(config, "predict.face_mode", FACE_MODES)
    _number(config, "predict.window_secs", lo=0, lo_open=True)
    _number(config, "predict.max_new_tokens", lo=1, integer=True)
  if mode in ("train", "export"):
    _choices(config, "export.formats", EXPORT_FORMATS, many=True)
  if mode in ("dpo", "grpo") and _get(config, mode) is not None:
    _validate_posttrain(config, mode)


def _validate_posttrain(config, mode: str) -> None:
  from emo_jax.posttrain import dpo as dpo_lib        # imported only for these modes
  from emo_jax.posttrain import grpo as grpo_lib
  from emo_jax.posttrain import reference as ref_lib
  for key in ("batch_size", "num_steps"):
    _number(config, f"{mode}.{key}", lo=1, integer=True)
  _number(config, f"{mode}.lr_scale", lo=0, lo_open=True)
  _choices(config, f"{mode}.reference", ref_lib.MODES)
  if mode == "dpo":
    _number(config, "dpo.beta", lo=0, lo_open=True)
    _number(config, "dpo.label_smoothing", lo=0, hi=0.5)
    _number(config, "dpo.rpo_alpha", lo=0)
    _choices(config, "dpo.loss_type", dpo_lib.LOSS_TYPES)
    _number(config, "dpo.pairs_per_record", lo=1, integer=True)
  else:
    _number(config, "grpo.num_generations", lo=2, integer=True)
    _number(config, "grpo.max_completion_length", lo=1, integer=True)
    _number(config, "grpo.temperature", lo=0, lo_open=True)
    _number(config, "grpo.top_p", lo=0, hi=1, lo_open=True)
    _number(config, "grpo.top_k", lo=0, integer=True)
    _number(config, "grpo.beta", lo=0)
    _number(config, "grpo.epsilon", lo=0, lo_open=True)
    _number(config, "grpo.epsilon_high", lo=0, lo_open=True)
    _number(config, "grpo.num_iterations", lo=1, integer=True)
    _choices(config, "grpo.loss_type", grpo_lib.LOSS_TYPES)


def _validate_train(config) -> None:
  _number(config, "optimizer.lr", lo=0, lo_open=True)
  for i, group in enumerate(_get(config, "optimizer.groups", ()) or ()):
    if len(group) != 3:
      raise ConfigError(f"config.optimizer.groups[{i}] must be (name, regex, lr), got {group!r}")
    lr = group[2]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) \
        or lr <= 0:
      raise ConfigError(f"config.optimizer.groups[{i}] ({group[0]!r}) has lr {lr!r}; it must "
                        "be a finite number > 0")
  _number(config, "optimizer.warmup_frac", lo=0, hi=1)
  _number(config, "optimizer.end_lr_frac", lo=0)
  _number(config, "optimizer.weight_decay", lo=0)
  _number(config, "optimizer.grad_clip", lo=0)
  _number(config, "optimizer.b1", lo=0, hi=1)
  _number(config, "optimizer.b2", lo=0, hi=1)
  _number(config, "optimizer.eps", lo=0)
  _number(config, "train.num_steps", integer=True)
  steps = _get(config, "train.num_steps", 0)
  epochs = _get(config, "train.num_epochs", 0.0)
  _number(config, "train.num_epochs", lo=0)
  if steps < 0 or (steps == 0 and not epochs):
    raise ConfigError(f"config.train.num_steps = {steps}: give a number of steps > 0 (or "
                      "num_steps=0 with config.train.num_epochs > 0)")
  _number(config, "train.accum_steps", lo=1, integer=True)
  accum = _get(config, "train.accum_steps", 1)
  batch = _get(config, "data.pipeline.global_batch_size", 1)
  if batch % accum:
    raise ConfigError(f"config.data.pipeline.global_batch_size = {batch} is not a multiple "
                      f"of config.train.accum_steps = {accum}")
  _number(config, "train.log_every", lo=1, integer=True)
  _number(config, "checkpoint.every_steps", lo=0, integer=True)
  _number(config, "checkpoint.every_secs", lo=0)
  _number(config, "checkpoint.max_to_keep", lo=1, integer=True)
  _number(config, "checkpoint.keep_period", lo=0, integer=True)
  if not list(_get(config, "data.train", ()) or ()):
    raise ConfigError("config.data.train is empty: nothing to train on")
