"""Expand a config's ``get_hyper`` sweep into one training run per point.

A config file may define ``get_hyper(h)`` next to ``get_config``; ``h`` offers
``sweep(key, values)``, ``product([...])``, ``zipit([...])`` and ``fixed(key, value)``,
each returning a list of points (dicts from config key to value)::

  def get_hyper(h):
    return h.product([h.sweep('config.optimizer.learning_rate', [1e-4, 2e-4]),
                      h.sweep('config.lora.rank', [8, 16])])

A plain list of dicts is accepted as the return value too. Every point becomes
``python -m emo_jax.main --config=<file> --workdir=<base>/<NN>_<k>=<v>... --config.k=v``.

Placement (our choice): ``sequential`` runs all points one after another on one
TPU VM (one nohup chain on ``--worker=all``, one log per point); ``vm_per_point``
creates one TPU VM per point (``<name>-<NN>``) and runs them in parallel.

  python -m launch.sweep --config=configs/emo_llama_7b.py --workdir=gs://b/sweeps/lr \
      --name=emo-sweep --zone=us-west4-a --accelerator_type=v5litepod-8 \
      --repo_url=https://github.com/you/emo_jax.git --dry_run
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import pathlib
import re
import sys
from typing import Any, Iterable, Sequence

from launch import tpu_vm

Point = dict[str, Any]


class Hyper:
  """The sweep vocabulary handed to ``get_hyper``."""

  @staticmethod
  def sweep(key: str, values: Iterable[Any]) -> list[Point]:
    values = list(values)
    if not values:
      raise ValueError(f"sweep over {key!r} has no values")
    return [{key: v} for v in values]

  @staticmethod
  def fixed(key: str, value: Any) -> list[Point]:
    return [{key: value}]

  @staticmethod
  def product(sweeps: Sequence[list[Point]]) -> list[Point]:
    points = []
    for combo in itertools.product(*sweeps):
      merged: Point = {}
      for part in combo:
        clash = merged.keys() & part.keys()
        if clash:
          raise ValueError(f"product sets {sorted(clash)} twice")
        merged.update(part)
      points.append(merged)
    return points

  @staticmethod
  def zipit(sweeps: Sequence[list[Point]]) -> list[Point]:
    lengths = {len(s) for s in sweeps}
    if len(lengths) > 1:
      raise ValueError(f"zipit needs sweeps of one length, got {sorted(lengths)}")
    return [dict(kv for part in parts for kv in part.items()) for parts in zip(*sweeps)]


def load_config_module(config: str):
  """Import ``configs/x.py`` (a trailing ``:arg`` is ignored here) by file path."""
  path = pathlib.Path(config.split(":", 1)[0])
  if not path.is_file():
    raise FileNotFoundError(f"config file {path} not found")
  spec = importlib.util.spec_from_file_location(f"_sweep_cfg_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def expand(config: str) -> list[Point]:
  """The points of ``config``'s ``get_hyper``, keys without the ``config.`` prefix."""
  module = load_config_module(config)
  if not hasattr(module, "get_hyper"):
    raise ValueError(f"{config} defines no get_hyper(h)")
  points = list(module.get_hyper(Hyper()))
  if not points:
    raise ValueError(f"{config}: get_hyper returned no points")
  out = []
  for p in points:
    if not isinstance(p, dict):
      raise ValueError(f"{config}: sweep point {p!r} is not a dict")
    out.append({(k[len("config."):] if k.startswith("config.") else k): v for k, v in p.items()})
  return out


def point_name(index: int, point: Point) -> str:
  """``03_learning_rate=0.0002_rank=16``: index first so names sort and stay unique."""
  parts = [f"{k.rsplit('.', 1)[-1]}={tpu_vm._format_value(v)}" for k, v in point.items()]
  name = "_".join([f"{index:02d}", *parts])
  return re.sub(r"[^\w.=-]", "-", name)[:120]


def point_workdirs(base: str, points: Sequence[Point]) -> list[str]:
  return [f"{base.rstrip('/')}/{point_name(i, p)}" for i, p in enumerate(points)]


def sweep_steps(spec: tpu_vm.TpuSpec, config: str, base_workdir: str, points: Sequence[Point],
                *, placement: str = "sequential", setup_args: argparse.Namespace | None = None,
                env: dict[str, str] | None = None, create: bool = True,
                extra_overrides: Sequence[str] = ()) -> list[tpu_vm.Step]:
  """gcloud steps for a whole sweep (create + setup when ``create``)."""
  workdirs = point_workdirs(base_workdir, points)
  extra = dict(tpu_vm._split_override(o) for o in extra_overrides)
  cmds = [tpu_vm.train_command(config, w, {**extra, **p}) for w, p in zip(workdirs, points)]
  logs = [tpu_vm.run_name(w) for w in workdirs]
  if placement == "sequential":
    tpu_vm.check_workdir(spec, base_workdir)
    steps = []
    if create:
      steps += tpu_vm.create_steps(spec)
      steps += tpu_vm.setup_and_data_steps(spec, setup_args) if setup_args else []
    steps.append(tpu_vm.ssh(spec, tpu_vm.remote_script(cmds, logs, env), kind="run"))
    return steps
  if placement == "vm_per_point":
    steps = []
    for i, (cmd, log) in enumerate(zip(cmds, logs)):
      s = _point_spec(spec, i)
      tpu_vm.check_workdir(s, base_workdir)
      if create:
        steps += tpu_vm.create_steps(s)
        steps += tpu_vm.setup_and_data_steps(s, setup_args) if setup_args else []
      steps.append(tpu_vm.ssh(s, tpu_vm.remote_script([cmd], [log], env), kind="run"))
    return steps
  raise ValueError(f"placement must be 'sequential' or 'vm_per_point', got {placement!r}")


def _point_spec(spec: tpu_vm.TpuSpec, index: int) -> tpu_vm.TpuSpec:
  import dataclasses
  return dataclasses.replace(spec, name=f"{spec.name}-{index:02d}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  tpu_vm.add_tpu_flags(parser)
  tpu_vm.add_setup_flags(parser)
  tpu_vm.add_run_flags(parser)
  parser.add_argument("--placement", default="sequential",
                      choices=("sequential", "vm_per_point"))
  parser.add_argument("--no_create", action="store_true",
                      help="the TPU VM(s) exist and are set up: only start the runs")
  args = parser.parse_args(argv)
  try:
    spec = tpu_vm.spec_from_args(args)
    points = expand(args.config)
    if not args.no_create and not (args.repo_url or args.tarball):
      raise ValueError("give --repo_url or --tarball (or --no_create for existing VMs)")
    steps = sweep_steps(spec, args.config, args.workdir, points, placement=args.placement,
                        setup_args=None if args.no_create else args,
                        env=tpu_vm.parse_env(args.env), create=not args.no_create,
                        extra_overrides=args.override)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    print(f"# {len(points)} sweep points on {spec.accelerator_type} ({spec.hosts} host(s) each)")
    for w, p in zip(point_workdirs(args.workdir, points), points):
      print(f"#   {w}: {p}")
  tpu_vm.execute(steps, dry_run=args.dry_run)
  return 0


if __name__ == "__main__":
  sys.exit(main())
