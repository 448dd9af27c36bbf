"""A stand-in `gcloud` for rehearsing launch.tpu_vm on one machine (tests/fake_cloud/gcloud
runs it). State lives under $FAKE_GCLOUD_ROOT:

  <root>/<tpu>.json                      the TPU: accelerator type, hosts, state, JAX port
  <root>/<tpu>/worker-<i>/               worker i's home folder (HOME of its commands)
  <root>/<tpu>/worker-<i>/.pgids         process groups of the commands started there
  <root>/installs.jsonl                  the setup commands the workers were asked to run

Supported: `compute tpus tpu-vm create | describe | ssh | scp | delete` and
`storage rsync -r gs://... <dir>`. `ssh --worker=all` runs the command in every worker
folder at once, one process group each, with HOME set to the folder and the JAX
coordinator of the slice on localhost (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, which emo_jax.main reads; a real TPU VM gets them from its metadata),
`FAKE_GCLOUD_DEVICES_PER_HOST` CPU devices per host. `delete` kills every process group
started on the TPU and removes its folders.

The install step is not executed: pip installs are out of place in a rehearsal. The
fake checks it is `bash scripts/setup.sh` (runtime requirements) followed by the
accelerator jax pin, records it in installs.jsonl, and links the worker's `.venv` to
$FAKE_GCLOUD_VENV (the environment the tests run in) instead. Everything else in the
command (the git clone, the data copy, the training run) runs as written.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SETUP = re.compile(r"bash scripts/setup\.sh(?P<test> --test)?"
                   r"(?: && \.venv/bin/pip install -q (?P<pip>'[^']*'|\S+))?")


def fail(msg: str, code: int = 2):
  print(f"fake gcloud: {msg}", file=sys.stderr)
  sys.exit(code)


def root() -> str:
  r = os.environ.get("FAKE_GCLOUD_ROOT")
  if not r:
    fail("FAKE_GCLOUD_ROOT is not set")
  os.makedirs(r, exist_ok=True)
  return r


def flags(args: list[str]) -> tuple[list[str], dict[str, str]]:
  pos, kv = [], {}
  for a in args:
    if a.startswith("--"):
      k, _, v = a[2:].partition("=")
      kv[k] = v
    else:
      pos.append(a)
  return pos, kv


def state_path(name: str) -> str:
  return os.path.join(root(), f"{name}.json")


def load(name: str) -> dict:
  p = state_path(name)
  if not os.path.exists(p):
    fail(f"TPU {name} not found", 1)
  with open(p) as f:
    return json.load(f)


def worker_dir(name: str, i: int) -> str:
  return os.path.join(root(), name, f"worker-{i}")


def create(name: str, kv: dict) -> None:
  sys.path[:0] = [REPO, os.path.dirname(HERE)]
  from launch.tpu_vm import num_hosts   # the launcher's host-count facts
  from ports import free_port           # a coordinator port no outgoing connection takes
  if os.path.exists(state_path(name)):
    fail(f"TPU {name} already exists", 1)
  hosts = num_hosts(kv["accelerator-type"])
  for i in range(hosts):
    os.makedirs(worker_dir(name, i))
  with open(state_path(name), "w") as f:
    json.dump({"name": name, "accelerator_type": kv["accelerator-type"], "hosts": hosts,
               "version": kv.get("version"), "state": "READY", "port": free_port()}, f)


def rewrite_install(name: str, command: str) -> str:
  m = SETUP.search(command)
  if not m:
    return command
  venv = os.environ.get("FAKE_GCLOUD_VENV") or sys.prefix
  with open(os.path.join(root(), "installs.jsonl"), "a") as f:
    f.write(json.dumps({"tpu": name, "command": m.group(0), "test": bool(m.group("test")),
                        "pip": shlex.split(m.group("pip"))[0] if m.group("pip") else None})
            + "\n")
  return command[:m.start()] + f"ln -sfn {shlex.quote(venv)} .venv" + command[m.end():]


def worker_env(st: dict, i: int) -> dict:
  env = dict(os.environ)
  env.pop("PYTHONPATH", None)   # the worker imports its own clone
  env["HOME"] = worker_dir(st["name"], i)
  env["PATH"] = HERE + os.pathsep + env.get("PATH", "")
  n = int(os.environ.get("FAKE_GCLOUD_DEVICES_PER_HOST", "1"))
  flags_ = [f for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags_ + [f"--xla_force_host_platform_device_count={n}"])
  env["JAX_PLATFORMS"] = "cpu"
  if st["hosts"] > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{st['port']}",
               JAX_NUM_PROCESSES=str(st["hosts"]), JAX_PROCESS_ID=str(i))
  return env


def workers(st: dict, which: str) -> list[int]:
  if which == "all":
    return list(range(st["hosts"]))
  i = int(which)
  if not 0 <= i < st["hosts"]:
    fail(f"worker {i} out of range (0..{st['hosts'] - 1})")
  return [i]


def ssh(name: str, kv: dict) -> int:
  st = load(name)
  command = rewrite_install(name, kv["command"])
  procs = []
  for i in workers(st, kv.get("worker", "0")):
    p = subprocess.Popen(["bash", "-c", command], cwd=worker_dir(name, i),
                         env=worker_env(st, i), start_new_session=True)
    with open(os.path.join(worker_dir(name, i), ".pgids"), "a") as f:
      f.write(f"{p.pid}\n")
    procs.append(p)
  try:
    codes = [p.wait() for p in procs]
  except KeyboardInterrupt:
    for p in procs:
      os.killpg(p.pid, signal.SIGTERM)
    raise
  return max(codes) if codes else 0


def scp(src: str, dst: str, kv: dict) -> int:
  name, _, remote = dst.partition(":")
  st = load(name)
  for i in workers(st, kv.get("worker", "0")):
    target = remote.replace("~", worker_dir(name, i), 1) if remote.startswith("~") else \
        os.path.join(worker_dir(name, i), remote)
    shutil.copy(src, target)
  return 0


def kill_all(name: str) -> None:
  st = load(name)
  for i in range(st["hosts"]):
    p = os.path.join(worker_dir(name, i), ".pgids")
    if os.path.exists(p):
      for line in open(p).read().split():
        try:
          os.killpg(int(line), signal.SIGKILL)
        except ProcessLookupError:
          pass


def delete(name: str) -> None:
  kill_all(name)
  shutil.rmtree(os.path.join(root(), name), ignore_errors=True)
  os.remove(state_path(name))


def rsync(src: str, dst: str) -> int:
  sys.path.insert(0, REPO)
  from input_pipeline import paths   # epath: the emulated bucket when the env points there
  if not paths.is_remote(src):
    fail(f"storage rsync: source must be gs://..., got {src!r}")
  paths.download_tree(src, os.path.expanduser(dst))
  return 0


def main(argv: list[str]) -> int:
  pos, kv = flags(argv)
  if pos[:2] == ["storage", "rsync"]:
    if "-r" not in pos:
      fail("storage rsync: only -r (recursive) copies are supported")
    src, dst = [a for a in pos[2:] if a != "-r"]
    return rsync(src, dst)
  if pos[:3] != ["compute", "tpus", "tpu-vm"] or len(pos) < 5:
    fail(f"unsupported command: gcloud {shlex.join(argv)}")
  verb, name = pos[3], pos[4]
  if verb == "create":
    create(name, kv)
  elif verb == "describe":
    print(load(name)["state"] if kv.get("format") == "value(state)" else json.dumps(load(name)))
  elif verb == "ssh":
    return ssh(name, kv)
  elif verb == "scp":
    return scp(pos[4], pos[5], kv)
  elif verb == "delete":
    delete(name)
  else:
    fail(f"unsupported tpu-vm verb {verb!r}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
