"""The run's own config, `<workdir>/config.json`: written by training only, read back by
eval, predict and export.

The sections that decide what the trained model is and what it was trained on (`seed`,
`model`, `init`, `data`) come from the saved config by default; the rest (eval, predict,
export, mesh settings) from the command line. When the command line differs in a saved
section, the command says which keys and which values it uses.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import ml_collections

from emo_jax.train.errors import ConfigError
from input_pipeline import paths

CONFIG_FILE = "config.json"
SAVED_SECTIONS = ("seed", "model", "init", "data")


def path(workdir: str) -> str:
  return paths.join(workdir, CONFIG_FILE)


def write(config, workdir: str) -> str:
  """Training's record of its config (process 0 only is the caller's business)."""
  p = path(workdir)
  paths.write_text(p, config.to_json_best_effort(indent=1))
  return p


def read(workdir: str) -> dict | None:
  p = path(workdir)
  if not paths.isfile(p):
    return None
  try:
    d = json.loads(paths.read_text(p))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"{p}: not a readable config ({e}); pass --nouse_saved_config to use "
                      "the command line's config") from None
  if not isinstance(d, dict):
    raise ConfigError(f"{p}: top level is {type(d).__name__}, expected an object")
  return d


def _norm(x: Any) -> Any:
  if isinstance(x, (list, tuple)):
    return [_norm(v) for v in x]
  if isinstance(x, dict):
    return {k: _norm(v) for k, v in x.items()}
  return x


def differences(cmd: Any, saved: Any, prefix: str = "") -> list[str]:
  """Dotted keys whose values differ (tuples and lists compare equal)."""
  if isinstance(cmd, dict) and isinstance(saved, dict):
    out = []
    for k in sorted(set(cmd) | set(saved), key=str):
      key = f"{prefix}.{k}" if prefix else str(k)
      if k not in cmd or k not in saved:
        out.append(key)
      else:
        out += differences(cmd[k], saved[k], key)
    return out
  return [] if _norm(cmd) == _norm(saved) else [prefix]


def _like(saved: Any, cmd: Any) -> Any:
  """`saved` in the container types of `cmd` (JSON turned its tuples into lists)."""
  if isinstance(saved, dict) and isinstance(cmd, dict):
    return {k: _like(v, cmd.get(k)) for k, v in saved.items()}
  if isinstance(saved, list):
    items = [_like(v, c) for v, c in zip(saved, cmd)] if isinstance(cmd, (list, tuple)) \
        and len(cmd) == len(saved) else [_like(v, None) for v in saved]
    return tuple(items) if isinstance(cmd, tuple) else items
  return saved


def resolve(config, workdir: str, *, use_saved: bool = True) -> ml_collections.ConfigDict:
  """The config a read-only mode runs with (see the module docstring). Prints one line to
  stderr when the command line differs from the saved config in a saved section."""
  saved = read(workdir)
  if saved is None:
    return config
  cmd = config.to_dict()
  diff = []
  for section in SAVED_SECTIONS:
    if section in saved or section in cmd:
      diff += differences(cmd.get(section), saved.get(section), section)
  if not diff:
    return config
  shown = ", ".join(diff[:6]) + (f" (+{len(diff) - 6} more)" if len(diff) > 6 else "")
  if not use_saved:
    print(f"warning: the command line's config differs from {path(workdir)} in {shown}: "
          "using the command line's (--nouse_saved_config)", file=sys.stderr)
    return config
  print(f"warning: the command line's config differs from {path(workdir)} (the config "
        f"this workdir was trained with) in {shown}: using the saved values "
        "(--nouse_saved_config uses the command line's)", file=sys.stderr)
  merged = dict(cmd)
  for section in SAVED_SECTIONS:
    if section in saved:
      merged[section] = _like(saved[section], cmd.get(section))
  return ml_collections.ConfigDict(merged)
