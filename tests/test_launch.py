"""Dry runs of the Cloud TPU launcher and the sweep launcher: command sequences, flags, workdirs."""

import pathlib
import re
import shlex
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch import sweep, tpu_vm  # noqa: E402


def _dry_run(capsys, module, argv):
  rc = module.main([*argv, "--dry_run"])
  out = capsys.readouterr()
  assert rc == 0, out.err
  lines = [l for l in out.out.splitlines() if l and not l.startswith("#")]
  return [shlex.split(l.split("  # ")[0]) for l in lines], out.out


def _flag(argv, name):
  vals = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(vals) == 1, (name, argv)
  return vals[0]


def _verb(argv):
  """('tpu-vm', 'create') etc. from a gcloud argv."""
  assert argv[:3] == ["gcloud", "compute", "tpus"], argv
  return argv[3], argv[4]


BASE = ["--zone=us-west4-a", "--repo_url=https://github.com/me/emo_jax.git", "--branch=dev",
        "--config=configs/emo_llama_7b.py", "--override=learning_rate=2e-4",
        "--override=lora.rank=16"]


def test_num_hosts_facts():
  assert tpu_vm.num_hosts("v5litepod-8") == 1
  assert tpu_vm.num_hosts("v5litepod-16") == 4
  assert tpu_vm.num_hosts("v6e-256") == 64
  assert tpu_vm.num_hosts("v4-8") == 1
  assert tpu_vm.num_hosts("v4-32") == 4
  assert tpu_vm.num_hosts("v5p-16") == 2
  assert tpu_vm.num_hosts("v3-8") == 1
  with pytest.raises(ValueError, match="unknown accelerator"):
    tpu_vm.num_hosts("a100-8")


def test_single_host_sequence(capsys):
  cmds, text = _dry_run(capsys, tpu_vm, [
    "all", "--name=emo-1", "--accelerator_type=v5litepod-8", "--spot",
    "--workdir=gs://bkt/runs/lora7b", "--data_gcs=gs://bkt/fer", *BASE])
  assert "1 host(s)" in text
  verbs = [_verb(c) for c in cmds]
  assert verbs == [("tpu-vm", "create"), ("tpu-vm", "describe"), ("tpu-vm", "ssh"),
                   ("tpu-vm", "ssh"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh")]
  create, wait, install, data, run, logs = cmds
  assert create[5] == "emo-1" and "--spot" in create and "--preemptible" not in create
  assert _flag(create, "accelerator-type") == "v5litepod-8"
  assert _flag(create, "version") == "v2-alpha-tpuv5-lite"
  assert _flag(create, "zone") == "us-west4-a"
  assert "READY" in text.splitlines()[2]
  for c in (install, data, run):
    assert _flag(c, "worker") == "all"
  assert _flag(logs, "worker") == "0"
  inst = _flag(install, "command")
  assert "git clone --depth=1 --branch=dev https://github.com/me/emo_jax.git" in inst
  assert "bash scripts/setup.sh &&" in inst and "jax[tpu]==" in inst
  # Runtime requirements only: no --test, no torch index.
  assert "--test" not in inst and "torch" not in inst
  assert "gcloud storage rsync -r gs://bkt/fer ~/data" in _flag(data, "command")
  remote = _flag(run, "command")
  assert remote.startswith("cd ~/emo_jax && . .venv/bin/activate")
  assert "nohup" in remote
  # The training argv inside the remote script, unquoted once more.
  inner = shlex.split(shlex.split(remote.split("nohup bash -c ", 1)[1])[0])
  assert inner[:3] == ["python", "-m", "emo_jax.main"]
  assert _flag(inner, "config") == "configs/emo_llama_7b.py"
  assert _flag(inner, "workdir") == "gs://bkt/runs/lora7b"
  assert _flag(inner, "config.learning_rate") == "2e-4"
  assert _flag(inner, "config.lora.rank") == "16"
  # The run reads the data where the data step wrote it.
  assert _flag(inner, "config.data.root") == "~/data"
  assert "~/logs/lora7b.log" in _flag(logs, "command")
  # How to follow and tear down, printed as comments.
  comments = [l for l in text.splitlines() if l.startswith("# ")]
  follow = [shlex.split(l.split(": ", 1)[1].split("  (")[0]) for l in comments
            if "follow the run" in l][0]
  down = [shlex.split(l.split(": ", 1)[1]) for l in comments if "tear it down" in l][0]
  assert follow[:4] == ["python", "-m", "launch.tpu_vm", "logs"]
  assert _flag(follow, "log") == "lora7b" and _flag(follow, "name") == "emo-1"
  assert down[:4] == ["python", "-m", "launch.tpu_vm", "delete"] and _flag(down, "name") == "emo-1"
  # Those commands parse and plan the matching steps.
  assert tpu_vm.plan(tpu_vm.build_parser().parse_args(follow[3:])) == [
      s for s in tpu_vm.logs_steps(tpu_vm.TpuSpec("emo-1", "us-west4-a", "v5litepod-8"),
                                   "lora7b")]
  assert tpu_vm.plan(tpu_vm.build_parser().parse_args(down[3:])) == tpu_vm.delete_steps(
      tpu_vm.TpuSpec("emo-1", "us-west4-a", "v5litepod-8"))


def test_multi_host_queued_sequence(capsys):
  cmds, text = _dry_run(capsys, tpu_vm, [
    "all", "--name=emo-pod", "--accelerator_type=v5p-32", "--queued", "--spot",
    "--workdir=gs://bkt/runs/pod", "--data_gcs=gs://bkt/fer", "--data_mode=gcsfuse",
    "--delete_after", *BASE])
  assert "4 host(s)" in text
  verbs = [_verb(c) for c in cmds]
  assert verbs == [("queued-resources", "create"), ("queued-resources", "describe"),
                   ("tpu-vm", "ssh"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh"),
                   ("queued-resources", "delete")]
  create = cmds[0]
  assert _flag(create, "node-id") == "emo-pod" and "--spot" in create
  assert _flag(create, "runtime-version") == "v2-alpha-tpuv5"
  assert "ACTIVE" in text
  # Every worker installs, mounts and trains; the run blocks so delete comes after it.
  for c in cmds[2:5]:
    assert _flag(c, "worker") == "all"
  assert "gcsfuse -o ro --implicit-dirs --only-dir=fer bkt ~/data" in _flag(cmds[3], "command")
  assert "nohup" not in _flag(cmds[4], "command")
  assert "--config.data.root=~/data" in _flag(cmds[4], "command")
  assert "--force" in cmds[5]
  assert "tear it down" not in text   # --delete_after deletes by itself


def test_multi_host_needs_shared_workdir(capsys):
  rc = tpu_vm.main(["run", "--name=emo-pod", "--zone=z", "--accelerator_type=v4-16",
                    "--config=configs/default.py", "--workdir=/tmp/run", "--dry_run"])
  assert rc == 2 and "gs://" in capsys.readouterr().err
  # Single host: a local workdir is fine.
  assert tpu_vm.main(["run", "--name=emo-1", "--zone=z", "--accelerator_type=v4-8",
                      "--config=configs/default.py", "--workdir=/tmp/run", "--dry_run"]) == 0


def test_tarball_install_and_bad_flags(capsys):
  spec = tpu_vm.TpuSpec(name="emo-t", zone="z", accelerator_type="v4-16", preemptible=True)
  steps = tpu_vm.install_steps(spec, tarball="/tmp/emo_jax.tar.gz")
  assert [s.kind for s in steps] == ["copy", "install"]
  assert steps[0].argv[5:7] == ("/tmp/emo_jax.tar.gz", "emo-t:~/emo_jax.tar.gz")
  assert "--worker=all" in steps[0].argv
  assert "tar -xzf ~/emo_jax.tar.gz" in steps[1].argv[-1]
  assert "--preemptible" in tpu_vm.create_steps(spec)[0].argv
  with pytest.raises(ValueError, match="exactly one"):
    tpu_vm.install_steps(spec)
  with pytest.raises(ValueError, match="not both"):
    tpu_vm.TpuSpec(name="x", zone="z", accelerator_type="v4-8", spot=True, preemptible=True)
  with pytest.raises(ValueError, match="lower case"):
    tpu_vm.TpuSpec(name="Bad_Name", zone="z", accelerator_type="v4-8")
  with pytest.raises(ValueError, match="gs://"):
    tpu_vm.data_steps(spec, "/local/data")


def test_execute_polls_until_ready():
  spec = tpu_vm.TpuSpec(name="emo-1", zone="z", accelerator_type="v4-8")
  states = iter(["CREATING", "CREATING", "READY"])
  seen = []

  class Done:
    def __init__(self, out):
      self.stdout = out

  def runner(argv):
    seen.append(argv[4])
    return Done(next(states) if argv[4] == "describe" else "")

  import io
  tpu_vm.execute(tpu_vm.create_steps(spec) + tpu_vm.delete_steps(spec), dry_run=False,
                 runner=runner, poll_seconds=0, out=io.StringIO())
  assert seen == ["create", "describe", "describe", "describe", "delete"]
  with pytest.raises(RuntimeError, match="PREEMPTED"):
    tpu_vm.execute(tpu_vm.create_steps(spec), dry_run=False, poll_seconds=0,
                   runner=lambda a: Done("PREEMPTED"), out=io.StringIO())


SWEEP_CFG = """
def get_config(arg=None):
  raise AssertionError('the sweep launcher must not build the config')

def get_hyper(h):
  return h.product([h.sweep('config.learning_rate', [1e-4, 2e-4]),
                    h.sweep('config.lora.rank', [8, 16])])
"""


def _remote_runs(run_argv):
  """Training argvs inside a remote nohup chain."""
  remote = _flag(run_argv, "command")
  body = shlex.split(remote.split("nohup bash -c ", 1)[1])[0]
  return [shlex.split(part.split(" > ")[0]) for part in body.split("; ")
          if part.startswith("python ")], body


def test_sweep_four_points_sequential(tmp_path, capsys):
  cfg = tmp_path / "sweep_cfg.py"
  cfg.write_text(SWEEP_CFG)
  cmds, text = _dry_run(capsys, sweep, [
    "--name=emo-sw", "--zone=z", "--accelerator_type=v5litepod-16", f"--config={cfg}",
    "--workdir=gs://bkt/sweeps/lr", "--repo_url=https://github.com/me/emo_jax.git"])
  assert "4 sweep points" in text and "4 host(s)" in text
  assert [_verb(c)[1] for c in cmds] == ["create", "describe", "ssh", "ssh"]
  assert all(_flag(c, "worker") == "all" for c in cmds[2:])
  runs, body = _remote_runs(cmds[3])
  assert len(runs) == 4
  got = {(_flag(r, "config.learning_rate"), _flag(r, "config.lora.rank")) for r in runs}
  assert got == {("0.0001", "8"), ("0.0001", "16"), ("0.0002", "8"), ("0.0002", "16")}
  workdirs = [_flag(r, "workdir") for r in runs]
  assert len(set(workdirs)) == 4
  assert all(w.startswith("gs://bkt/sweeps/lr/0") for w in workdirs)
  assert workdirs[3] == "gs://bkt/sweeps/lr/03_learning_rate=0.0002_rank=16"
  for w in workdirs:  # one log per run
    assert f"~/logs/{w.rsplit('/', 1)[1]}.log" in body


def test_sweep_vm_per_point_and_errors(tmp_path, capsys):
  cfg = tmp_path / "sweep_cfg.py"
  cfg.write_text(SWEEP_CFG)
  cmds, _ = _dry_run(capsys, sweep, [
    "--name=emo-sw", "--zone=z", f"--config={cfg}", "--workdir=gs://bkt/sw",
    "--placement=vm_per_point", "--no_create", "--override=total_steps=100"])
  assert len(cmds) == 4
  assert [c[5] for c in cmds] == ["emo-sw-00", "emo-sw-01", "emo-sw-02", "emo-sw-03"]
  runs = [_remote_runs(c)[0][0] for c in cmds]
  assert all(_flag(r, "config.total_steps") == "100" for r in runs)
  assert len({_flag(r, "workdir") for r in runs}) == 4
  # A config without get_hyper, zipit length mismatch and a product clash are clear errors.
  plain = tmp_path / "plain.py"
  plain.write_text("def get_config(arg=None):\n  return None\n")
  assert sweep.main(["--name=a", "--zone=z", f"--config={plain}", "--workdir=gs://b/x",
                     "--no_create", "--dry_run"]) == 2
  assert "get_hyper" in capsys.readouterr().err
  h = sweep.Hyper()
  with pytest.raises(ValueError, match="one length"):
    h.zipit([h.sweep("a", [1, 2]), h.sweep("b", [1])])
  with pytest.raises(ValueError, match="twice"):
    h.product([h.sweep("a", [1]), h.fixed("a", 2)])
  assert h.zipit([h.sweep("a", [1, 2]), h.sweep("b", [3, 4])]) == [{"a": 1, "b": 3},
                                                                   {"a": 2, "b": 4}]


def test_sweep_of_the_repository_sweep_config(capsys, monkeypatch):
  """configs/sweep.py (lr x LoRA rank): one run per point, overrides the real config keys."""
  monkeypatch.chdir(ROOT)
  points = sweep.expand("configs/sweep.py")
  assert len(points) == 6 and all(set(p) == {"optimizer.lr", "model.lora_rank"} for p in points)
  cmds, _ = _dry_run(capsys, sweep, [
    "--name=emo-sw", "--zone=z", "--accelerator_type=v4-8", "--config=configs/sweep.py",
    "--workdir=/tmp/sweeps/lr_rank", "--no_create"])
  runs, _ = _remote_runs(cmds[0])
  assert len(runs) == 6
  assert {(_flag(r, "config.optimizer.lr"), _flag(r, "config.model.lora_rank")) for r in runs} \
      == {(lr, r) for lr in ("0.001", "0.002", "0.004") for r in ("4", "16")}
  # Every point's overrides apply to the config the training entry point loads.
  from ml_collections import config_flags  # noqa: F401
  import importlib
  cfg_mod = importlib.import_module("configs.sweep")
  base = cfg_mod.get_config(None)
  for p in points:
    c = base.copy_and_resolve_references()
    for k, v in p.items():
      node = c
      *parents, leaf = k.split(".")
      for part in parents:
        node = node[part]
      assert leaf in node, k
      node[leaf] = v


def test_data_root_agrees_with_data_step(capsys):
  """The data step's destination is the run's --config.data.root; a different explicit
  root is refused; without a data step nothing is passed (the config's own root)."""
  common = ["all", "--name=emo-1", "--zone=z", "--accelerator_type=v4-8",
            "--repo_url=https://x/y.git", "--config=configs/emo_llama_7b.py",
            "--workdir=gs://b/r"]
  cmds, _ = _dry_run(capsys, tpu_vm, [*common, "--data_gcs=gs://b/fer", "--data_dir=/mnt/fer"])
  assert "gcloud storage rsync -r gs://b/fer /mnt/fer" in _flag(cmds[3], "command")
  assert "--config.data.root=/mnt/fer" in _flag(cmds[4], "command")
  assert tpu_vm.main([*common, "--data_gcs=gs://b/fer", "--data_dir=/mnt/fer",
                      "--data_root=/other", "--dry_run"]) == 2
  assert "differs" in capsys.readouterr().err
  cmds, _ = _dry_run(capsys, tpu_vm, common)
  assert "data.root" not in _flag(cmds[3], "command")
  cmds, _ = _dry_run(capsys, tpu_vm, ["run", "--name=emo-1", "--zone=z",
                                      "--accelerator_type=v4-8", "--config=configs/default.py",
                                      "--workdir=/tmp/r", "--data_root=/mnt/d"])
  assert "--config.data.root=/mnt/d" in _flag(cmds[0], "command")


def test_runtime_requirements_exclude_test_references():
  runtime = (ROOT / "requirements.txt").read_text()
  test = (ROOT / "requirements-test.txt").read_text()
  names = lambda text: {l.split("==")[0].strip().lower() for l in text.splitlines()
                        if "==" in l and not l.lstrip().startswith("#")}
  assert {"torch", "transformers", "peft", "pytest", "gcp-storage-emulator"}.isdisjoint(
      names(runtime))
  assert {"torch", "transformers", "peft", "pytest", "gcp-storage-emulator", "gcsfs"} <= names(test)
  assert "-r requirements.txt" in test.splitlines()
  assert {"jax", "orbax-checkpoint", "etils", "grain"} <= names(runtime)
  setup = (ROOT / "scripts" / "setup.sh").read_text()
  assert "requirements-test.txt" in setup and "setup.sh --test" in (
      ROOT / "scripts" / "test.sh").read_text()


def _with_flags(argv, text):
  """`argv` with the flags quoted in `text` set (a flag of the same name is replaced)."""
  flags = shlex.split(text.replace("\n", " "))
  names = {f.split("=", 1)[0] for f in flags}
  return [a for a in argv if a.split("=", 1)[0] not in names] + flags


def _readme_dry_runs(text):
  """(argv, printed) for each ```bash launcher call followed by its printed block, and for
  each later "The same with `<flags>` prints:" paragraph followed by its block."""
  blocks = text.split("```")
  out, base = [], None
  for i, b in enumerate(blocks):
    if b.startswith("bash\npython -m launch.tpu_vm all") and i + 2 < len(blocks):
      base = shlex.split(b[len("bash\n"):].replace("\\\n", " "))[3:]
      out.append((base, blocks[i + 2].strip("\n")))
    elif base and i % 2 == 0 and i + 1 < len(blocks):
      m = re.search(r"The same with `([^`]*)` prints:\s*$", b)
      if m:
        out.append((_with_flags(base, m.group(1)), blocks[i + 1].strip("\n")))
  return out


@pytest.mark.parametrize("doc", ["README.md", "launch/README.md"])
def test_documented_sequences_are_the_launchers_output(doc, capsys):
  """The command sequences the docs quote verbatim are what the launcher prints today."""
  runs = _readme_dry_runs((ROOT / doc).read_text())
  assert runs, f"no launcher example in {doc}"
  for argv, printed in runs:
    assert tpu_vm.main(argv) == 0
    assert capsys.readouterr().out.strip("\n") == printed
