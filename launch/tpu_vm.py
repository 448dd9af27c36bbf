"""Cloud TPU VM launcher: create, install, feed data, train on every worker, tail, delete.

Usage (every sub-command accepts ``--dry_run``, which prints the gcloud commands
instead of running them)::

  python -m launch.tpu_vm all --name=emo-v5e --zone=us-west4-a \
      --accelerator_type=v5litepod-8 --spot \
      --repo_url=https://github.com/you/emo_jax.git --branch=main \
      --data_gcs=gs://my-bucket/fer --config=configs/emo_llama_7b.py \
      --workdir=gs://my-bucket/runs/7b-lora --override=learning_rate=2e-4 --dry_run

Sub-commands: ``create`` (TPU VM or queued resource, then wait for READY),
``setup`` (install the project on ``--worker=all``), ``data`` (copy from GCS or
mount with gcsfuse on every worker, into ``--data_dir``), ``run`` (``python -m
emo_jax.main`` on ``--worker=all``; JAX's multi-controller runtime makes every host one
process; ``--config.data.root`` is the data step's folder), ``logs`` (tail a worker's
log), ``delete`` and ``all`` (create, setup, data, run, logs; it also prints the commands
that follow the run and tear the TPU down). The command builders are pure functions returning ``Step`` lists so that
tests can check the sequences without gcloud.

Our choices (not facts about Cloud TPU): the project lives in ``~/emo_jax`` on
each worker, logs in ``~/logs/<run>.log``; training runs under ``nohup`` so an
ssh drop does not kill it; the TPU runtime image defaults below are the ones
documented for each generation at the time of writing (override with
``--runtime_version``).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

REPO_DIR = "~/emo_jax"
LOG_DIR = "~/logs"
# The last line of a run's log once its command has ended (followers of the log see it).
EXIT_LINE = "launch.tpu_vm: the command exited with status"

# Runtime images per generation (Cloud TPU docs); users override with --runtime_version.
_DEFAULT_RUNTIME = {
  "v2": "tpu-ubuntu2204-base",
  "v3": "tpu-ubuntu2204-base",
  "v4": "tpu-ubuntu2204-base",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v5p": "v2-alpha-tpuv5",
  "v6e": "v2-alpha-tpuv6e",
}


@dataclasses.dataclass(frozen=True)
class TpuSpec:
  """Where and what to create.

  Attributes:
    name: TPU VM (node) name; also the queued-resource id when ``queued``.
    zone: GCP zone, e.g. ``us-west4-a``.
    accelerator_type: e.g. ``v5litepod-8`` (single host), ``v5p-32`` (4 hosts).
    runtime_version: TPU software image; ``None`` picks the generation default.
    project: GCP project; ``None`` uses gcloud's configured project.
    spot: Spot VM (preemptible at any time, cheapest).
    preemptible: legacy preemptible TPU (``tpu-vm create`` only).
    queued: request through ``queued-resources create`` instead of ``tpu-vm create``.
  """
  name: str
  zone: str
  accelerator_type: str
  runtime_version: str | None = None
  project: str | None = None
  spot: bool = False
  preemptible: bool = False
  queued: bool = False

  def __post_init__(self):
    if self.spot and self.preemptible:
      raise ValueError("choose one of --spot and --preemptible, not both")
    if self.queued and self.preemptible:
      raise ValueError("queued resources take --spot, not --preemptible")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name):
      raise ValueError(f"TPU name {self.name!r} must be lower case letters, digits and '-'")
    num_hosts(self.accelerator_type)  # validates the type

  @property
  def runtime(self) -> str:
    return self.runtime_version or default_runtime_version(self.accelerator_type)

  @property
  def hosts(self) -> int:
    return num_hosts(self.accelerator_type)


@dataclasses.dataclass(frozen=True)
class Step:
  """One gcloud (or local) command. ``poll_until`` set: rerun until stdout is one of them."""
  kind: str
  argv: tuple[str, ...]
  poll_until: tuple[str, ...] = ()
  fail_on: tuple[str, ...] = ()

  def shell(self) -> str:
    return shlex.join(self.argv)


def _split_type(accelerator_type: str) -> tuple[str, int]:
  m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator_type)
  if not m:
    raise ValueError(
      f"unknown accelerator type {accelerator_type!r}; expected e.g. v4-8, v5p-16, "
      "v5litepod-8, v6e-16")
  gen = "v5litepod" if m.group(1) == "v5e" else m.group(1)
  return gen, int(m.group(2))


def num_hosts(accelerator_type: str) -> int:
  """Number of TPU VM workers (hosts) of a slice.

  Facts (Cloud TPU docs): v2/v3/v4/v5p type suffixes count TensorCores, 8 per host
  (v4/v5p: 4 chips x 2 cores); v5e/v6e suffixes count chips, up to 8 on one host and
  4 per host in multi-host slices.
  """
  gen, n = _split_type(accelerator_type)
  if gen in ("v5litepod", "v6e"):
    return 1 if n <= 8 else n // 4
  return max(1, n // 8)


def default_runtime_version(accelerator_type: str) -> str:
  return _DEFAULT_RUNTIME[_split_type(accelerator_type)[0]]


def _common(spec: TpuSpec) -> list[str]:
  flags = [f"--zone={spec.zone}"]
  if spec.project:
    flags.append(f"--project={spec.project}")
  return flags


# ----------------------------------------------------------------------------- create / delete


def create_steps(spec: TpuSpec) -> list[Step]:
  """Create the TPU (VM or queued resource) and wait until it is usable."""
  if spec.queued:
    argv = ["gcloud", "compute", "tpus", "queued-resources", "create", spec.name,
            f"--node-id={spec.name}", *_common(spec),
            f"--accelerator-type={spec.accelerator_type}",
            f"--runtime-version={spec.runtime}"]
    if spec.spot:
      argv.append("--spot")
    wait = ["gcloud", "compute", "tpus", "queued-resources", "describe", spec.name,
            *_common(spec), "--format=value(state.state)"]
    return [Step("create", tuple(argv)),
            Step("wait", tuple(wait), poll_until=("ACTIVE",),
                 fail_on=("FAILED", "SUSPENDED"))]
  argv = ["gcloud", "compute", "tpus", "tpu-vm", "create", spec.name, *_common(spec),
          f"--accelerator-type={spec.accelerator_type}", f"--version={spec.runtime}"]
  if spec.spot:
    argv.append("--spot")
  if spec.preemptible:
    argv.append("--preemptible")
  wait = ["gcloud", "compute", "tpus", "tpu-vm", "describe", spec.name, *_common(spec),
          "--format=value(state)"]
  return [Step("create", tuple(argv)),
          Step("wait", tuple(wait), poll_until=("READY",),
               fail_on=("PREEMPTED", "TERMINATED"))]


def delete_steps(spec: TpuSpec) -> list[Step]:
  if spec.queued:  # --force also deletes the node the queued resource holds
    argv = ["gcloud", "compute", "tpus", "queued-resources", "delete", spec.name,
            *_common(spec), "--force", "--quiet"]
  else:
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "delete", spec.name, *_common(spec),
            "--quiet"]
  return [Step("delete", tuple(argv))]


# ----------------------------------------------------------------------------- ssh / scp


def ssh(spec: TpuSpec, command: str, worker: str | int = "all", kind: str = "ssh") -> Step:
  """``gcloud compute tpus tpu-vm ssh`` running ``command`` (a shell string) on workers."""
  return Step(kind, ("gcloud", "compute", "tpus", "tpu-vm", "ssh", spec.name, *_common(spec),
                     f"--worker={worker}", f"--command={command}"))


def scp(spec: TpuSpec, local: str, remote: str, worker: str | int = "all",
        kind: str = "copy") -> Step:
  return Step(kind, ("gcloud", "compute", "tpus", "tpu-vm", "scp", local,
                     f"{spec.name}:{remote}", *_common(spec), f"--worker={worker}"))


def _jax_version(requirements: pathlib.Path | None = None) -> str:
  path = requirements or pathlib.Path(__file__).resolve().parents[1] / "requirements.txt"
  for line in path.read_text().splitlines():
    m = re.fullmatch(r"\s*jax==([\w.]+)\s*", line)
    if m:
      return m.group(1)
  raise ValueError(f"no 'jax==<version>' pin in {path}")


def accelerator_pip(accelerator: str, jax_version: str | None = None) -> str:
  """The pip requirement that swaps the pinned CPU jax for an accelerator build."""
  extras = {"tpu": "tpu", "cuda12": "cuda12", "cpu": None}
  if accelerator not in extras:
    raise ValueError(f"accelerator must be one of {sorted(extras)}, got {accelerator!r}")
  version = jax_version or _jax_version()
  if extras[accelerator] is None:
    return f"jax=={version}"
  return f"jax[{extras[accelerator]}]=={version}"


def install_steps(spec: TpuSpec, *, repo_url: str | None = None, branch: str = "main",
                  tarball: str | None = None, accelerator: str = "tpu") -> list[Step]:
  """Put the project on every worker and run scripts/setup.sh there.

  Either ``repo_url`` (git clone, or fetch + checkout when already cloned) or
  ``tarball`` (a local ``.tar.gz`` of the repository, e.g. from ``git archive``,
  copied with ``tpu-vm scp --worker=all``). setup.sh installs the pinned runtime
  stack (requirements.txt: no test-only torch / transformers / peft), then the
  accelerator build of the same jax version replaces the CPU one.
  """
  if (repo_url is None) == (tarball is None):
    raise ValueError("give exactly one of repo_url and tarball")
  steps = []
  if repo_url is not None:
    q_url, q_branch = shlex.quote(repo_url), shlex.quote(branch)
    fetch = (f"if [ -d {REPO_DIR}/.git ]; then git -C {REPO_DIR} fetch --depth=1 origin "
             f"{q_branch} && git -C {REPO_DIR} checkout -f FETCH_HEAD; "
             f"else git clone --depth=1 --branch={q_branch} {q_url} {REPO_DIR}; fi")
  else:
    name = pathlib.PurePath(tarball).name
    steps.append(scp(spec, tarball, f"~/{name}"))
    fetch = (f"mkdir -p {REPO_DIR} && tar -xzf ~/{shlex.quote(name)} -C {REPO_DIR}")
  setup = (f"cd {REPO_DIR} && bash scripts/setup.sh && .venv/bin/pip install -q "
           f"{shlex.quote(accelerator_pip(accelerator))}")
  steps.append(ssh(spec, f"set -e; {fetch}; {setup}", kind="install"))
  return steps


def data_steps(spec: TpuSpec, gcs_path: str, local_dir: str = "~/data",
               mode: str = "copy") -> list[Step]:
  """Make ``gcs_path`` readable at ``local_dir`` on every worker.

  ``copy``: ``gcloud storage rsync`` (fast random access, needs disk);
  ``gcsfuse``: install gcsfuse and mount the bucket (prefix) read-only.
  """
  m = re.fullmatch(r"gs://([^/]+)/?(.*)", gcs_path)
  if not m:
    raise ValueError(f"data path must be gs://bucket[/prefix], got {gcs_path!r}")
  if mode == "copy":
    cmd = f"mkdir -p {local_dir} && gcloud storage rsync -r {shlex.quote(gcs_path)} {local_dir}"
  elif mode == "gcsfuse":
    bucket, prefix = m.group(1), m.group(2).rstrip("/")
    install = ("if ! command -v gcsfuse >/dev/null; then "
               "echo \"deb https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\""
               " | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
               "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
               " | sudo gpg --dearmor -o /usr/share/keyrings/cloud.google.gpg --yes && "
               "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi")
    only_dir = f"--only-dir={shlex.quote(prefix)} " if prefix else ""
    cmd = (f"{install}; mkdir -p {local_dir} && gcsfuse -o ro --implicit-dirs {only_dir}"
           f"{shlex.quote(bucket)} {local_dir}")
  else:
    raise ValueError(f"data mode must be 'copy' or 'gcsfuse', got {mode!r}")
  return [ssh(spec, cmd, kind="data")]


# ----------------------------------------------------------------------------- run / logs


def override_flags(overrides: dict[str, object] | Sequence[str]) -> list[str]:
  """``{'a.b': 1}`` or ``['a.b=1']`` -> ``['--config.a.b=1']`` (ml_collections CLI overrides)."""
  items = overrides.items() if isinstance(overrides, dict) else (
    _split_override(o) for o in overrides)
  flags = []
  for key, value in items:
    key = key[len("config."):] if key.startswith("config.") else key
    if not re.fullmatch(r"[A-Za-z_][\w.]*", key):
      raise ValueError(f"bad config override key {key!r}")
    flags.append(f"--config.{key}={_format_value(value)}")
  return flags


def _split_override(text: str) -> tuple[str, str]:
  if "=" not in text:
    raise ValueError(f"override must be key=value, got {text!r}")
  key, value = text.split("=", 1)
  return key.strip(), value.strip()


def _format_value(value: object) -> str:
  if isinstance(value, bool):
    return "True" if value else "False"
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(_format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def train_command(config: str, workdir: str, overrides: dict | Sequence[str] = (),
                  extra_flags: Sequence[str] = ()) -> list[str]:
  """The training entry point's argv, identical on every host."""
  return ["python", "-m", "emo_jax.main", f"--config={config}", f"--workdir={workdir}",
          *override_flags(overrides), *extra_flags]


def run_name(workdir: str) -> str:
  return re.sub(r"[^\w.=-]", "_", workdir.rstrip("/").rsplit("/", 1)[-1]) or "run"


def check_workdir(spec: TpuSpec, workdir: str) -> None:
  """Multi-host runs need one workdir all hosts see (orbax writes from every process)."""
  if spec.hosts > 1 and not workdir.startswith("gs://"):
    raise ValueError(f"{spec.accelerator_type} has {spec.hosts} hosts: --workdir must be a "
                     f"gs:// path every host can write, got {workdir!r}")


def remote_script(commands: Sequence[Sequence[str]], log_names: Sequence[str],
                  env: dict[str, str] | None = None, background: bool = True) -> str:
  """A shell string running ``commands`` one after another, each into its own log, which
  ends with ``EXIT_LINE`` and the command's exit status. In the foreground the string
  exits with the last command's status."""
  exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in (env or {}).items())
  body = "; ".join(f"{shlex.join(c)} > {LOG_DIR}/{n}.log 2>&1; rc=$?; "
                   f"echo \"{EXIT_LINE} $rc\" >> {LOG_DIR}/{n}.log"
                   for c, n in zip(commands, log_names, strict=True))
  prefix = f"cd {REPO_DIR} && . .venv/bin/activate && mkdir -p {LOG_DIR} && {exports}"
  if not background:
    return f"{prefix}{body}; exit $rc"
  # Only the nohup job goes to the background (braces): a backgrounded ``a && b && nohup ...``
  # list would keep the ssh session's stdout open, and ssh would wait for the whole run.
  return f"{prefix}{{ nohup bash -c {shlex.quote(body)} < /dev/null > /dev/null 2>&1 & }}"


def run_steps(spec: TpuSpec, config: str, workdir: str, overrides=(),
              env: dict[str, str] | None = None, background: bool = True,
              data_root: str | None = None) -> list[Step]:
  """Start ``python -m emo_jax.main`` on ``--worker=all`` (one JAX process per host).
  ``data_root``: the folder the data step filled, passed as ``--config.data.root``."""
  check_workdir(spec, workdir)
  extra = [f"--config.data.root={data_root}"] if data_root else []
  cmd = train_command(config, workdir, overrides, extra)
  return [ssh(spec, remote_script([cmd], [run_name(workdir)], env, background), kind="run")]


def logs_steps(spec: TpuSpec, log_name: str, worker: int = 0, follow: bool = True) -> list[Step]:
  tail = f"tail -n 200 {'-F ' if follow else ''}{LOG_DIR}/{shlex.quote(log_name)}.log"
  return [ssh(spec, tail, worker=worker, kind="logs")]


# ----------------------------------------------------------------------------- execution


Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


def _run_step(argv: Sequence[str]) -> subprocess.CompletedProcess:
  """Runs one step with its output on the terminal (the log tail, install progress)."""
  return subprocess.run(list(argv), check=True, text=True)


def _poll_state(argv: Sequence[str]) -> subprocess.CompletedProcess:
  """Runs one state query and keeps its output (the state) for the caller."""
  return subprocess.run(list(argv), check=True, text=True, stdout=subprocess.PIPE)


def execute(steps: Sequence[Step], *, dry_run: bool, out=None, runner: Runner | None = None,
            poll_seconds: float = 30.0, poll_timeout: float = 6 * 3600.0) -> None:
  """Print (dry run) or run the steps in order; ``wait`` steps poll until ready."""
  out = out or sys.stdout
  run_step, poll_state = (runner, runner) if runner else (_run_step, _poll_state)
  for step in steps:
    if dry_run:
      note = f"  # repeat until {'|'.join(step.poll_until)}" if step.poll_until else ""
      print(step.shell() + note, file=out)
      continue
    print(f"+ {step.shell()}", file=out, flush=True)
    if not step.poll_until:
      run_step(step.argv)
      continue
    deadline = time.monotonic() + poll_timeout
    while True:
      state = poll_state(step.argv).stdout.strip()
      if state in step.poll_until:
        break
      if state in step.fail_on:
        raise RuntimeError(f"{step.argv[5]} reached state {state}")
      if time.monotonic() > deadline:
        raise TimeoutError(f"{step.argv[5]} not {step.poll_until} after {poll_timeout} s")
      print(f"  state={state or '?'}; waiting {poll_seconds:.0f} s", file=out, flush=True)
      time.sleep(poll_seconds)


# ----------------------------------------------------------------------------- CLI


def add_tpu_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--name", required=True, help="TPU VM / queued resource name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default=None)
  p.add_argument("--accelerator_type", default="v5litepod-8")
  p.add_argument("--runtime_version", default=None)
  p.add_argument("--spot", action="store_true")
  p.add_argument("--preemptible", action="store_true")
  p.add_argument("--queued", action="store_true", help="use a queued resource")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")


def add_setup_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--repo_url", default=None, help="git URL cloned on every worker")
  p.add_argument("--branch", default="main")
  p.add_argument("--tarball", default=None, help="local .tar.gz of the repo (git archive)")
  p.add_argument("--accelerator", default="tpu", choices=("tpu", "cuda12", "cpu"))
  p.add_argument("--data_gcs", default=None, help="gs://bucket/prefix holding the data")
  p.add_argument("--data_dir", default="~/data")
  p.add_argument("--data_mode", default="copy", choices=("copy", "gcsfuse"))


def add_run_flags(p: argparse.ArgumentParser, workdir_required: bool = True) -> None:
  p.add_argument("--config", required=True, help="configs/x.py[:arg]")
  p.add_argument("--workdir", required=workdir_required, help="gs://bucket/path")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, passed as --config.KEY=VALUE (repeatable)")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable for the training processes (repeatable)")
  p.add_argument("--foreground", action="store_true", help="block instead of nohup")
  p.add_argument("--data_root", default=None,
                 help="run: passed as --config.data.root (all: the data step's --data_dir)")


def spec_from_args(args: argparse.Namespace) -> TpuSpec:
  return TpuSpec(name=args.name, zone=args.zone, accelerator_type=args.accelerator_type,
                 runtime_version=args.runtime_version, project=args.project,
                 spot=args.spot, preemptible=args.preemptible, queued=args.queued)


def parse_env(items: Sequence[str]) -> dict[str, str]:
  return dict(_split_override(i) for i in items)


def setup_and_data_steps(spec: TpuSpec, args: argparse.Namespace) -> list[Step]:
  steps = install_steps(spec, repo_url=args.repo_url, branch=args.branch,
                        tarball=args.tarball, accelerator=args.accelerator)
  if args.data_gcs:
    steps += data_steps(spec, args.data_gcs, args.data_dir, args.data_mode)
  return steps


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m launch.tpu_vm", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="cmd", required=True)
  for name in ("create", "setup", "data", "run", "logs", "delete", "all"):
    p = sub.add_parser(name)
    add_tpu_flags(p)
    if name in ("setup", "data", "all"):
      add_setup_flags(p)
    if name in ("run", "all"):
      add_run_flags(p)
    if name == "logs":
      p.add_argument("--log", required=True, help="run name (last path part of the workdir)")
      p.add_argument("--worker", type=int, default=0)
    if name == "all":
      p.add_argument("--delete_after", action="store_true",
                     help="run in the foreground, then delete the TPU")
  return parser


def plan(args: argparse.Namespace) -> list[Step]:
  """The step list for a parsed command line."""
  spec = spec_from_args(args)
  if args.cmd == "create":
    return create_steps(spec)
  if args.cmd == "setup":
    return install_steps(spec, repo_url=args.repo_url, branch=args.branch,
                         tarball=args.tarball, accelerator=args.accelerator)
  if args.cmd == "data":
    if not args.data_gcs:
      raise ValueError("data: --data_gcs is required")
    return data_steps(spec, args.data_gcs, args.data_dir, args.data_mode)
  if args.cmd == "run":
    return run_steps(spec, args.config, args.workdir, args.override, parse_env(args.env),
                     background=not args.foreground, data_root=args.data_root)
  if args.cmd == "logs":
    return logs_steps(spec, args.log, args.worker)
  if args.cmd == "delete":
    return delete_steps(spec)
  # all
  check_workdir(spec, args.workdir)
  foreground = args.foreground or args.delete_after
  steps = create_steps(spec) + setup_and_data_steps(spec, args)
  # The run reads the data where the data step put it.
  data_root = args.data_root or (args.data_dir if args.data_gcs else None)
  if args.data_gcs and args.data_root and args.data_root != args.data_dir:
    raise ValueError(f"--data_root={args.data_root} differs from --data_dir={args.data_dir}, "
                     "where the data step puts --data_gcs")
  steps += run_steps(spec, args.config, args.workdir, args.override, parse_env(args.env),
                     background=not foreground, data_root=data_root)
  if args.delete_after:
    steps += delete_steps(spec)
  else:
    steps += logs_steps(spec, run_name(args.workdir))
  return steps


def follow_commands(args: argparse.Namespace) -> list[str]:
  """The commands to follow a started run and to tear its TPU down (printed by ``all``)."""
  flags = [f"--name={args.name}", f"--zone={args.zone}"]
  if args.project:
    flags.append(f"--project={args.project}")
  follow = ["python", "-m", "launch.tpu_vm", "logs", *flags, f"--log={run_name(args.workdir)}"]
  down = ["python", "-m", "launch.tpu_vm", "delete", *flags]
  if args.queued:
    down.append("--queued")
  return [f"# follow the run: {shlex.join(follow)}  (--worker=N for another host)",
          f"# tear it down:   {shlex.join(down)}"]


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    steps = plan(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  spec = spec_from_args(args)
  if args.dry_run:
    print(f"# {spec.accelerator_type}: {spec.hosts} host(s), runtime {spec.runtime}")
  tail = follow_commands(args) if args.cmd == "all" and not args.delete_after else []
  if tail and not args.dry_run:   # the last step (tail -F of the log) blocks: say it before
    execute(steps[:-1], dry_run=False)
    print("\n".join(tail), flush=True)
    execute(steps[-1:], dry_run=False)
  else:
    execute(steps, dry_run=args.dry_run)
    if tail:
      print("\n".join(tail), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
