"""The Cloud TPU path rehearsed on one machine: `python -m launch.tpu_vm all` for a 2-host
slice (v4-16) against a stand-in gcloud (tests/fake_cloud: worker folders, one process
per host, JAX coordinator on localhost) and a local GCS emulator (tests/cloud_testutil).

The launcher's own commands run: create + wait, setup from a local git clone (the install
itself is checked and replaced by a link to this environment), `gcloud storage rsync` of
the data from the emulated bucket into each worker's ~/data, and a 2-process training run
of the tiny config whose workdir is gs:// on the emulator. The bucket holds the first
request for the step-4 checkpoint (so the step-2 one is committed and training is at a
known point, whatever the machine's speed); then worker 1 is SIGKILLed (a lost host). Its
partner would wait in a collective for a peer that never comes, as on a real slice; it is
killed too (the slice restarts), leaving a half-written step 4 in the bucket. `launch.tpu_vm run` then resumes both hosts from the bucket, and the final
train state equals, bit for bit, that of an uninterrupted 2-host run of the same command.

What only a real TPU shows (launch/README.md): the TPU runtime and its interconnect,
metadata-based host discovery, the GCS client of tf.io.gfile (the emulator serves epath
through gcsfs, see tests/cloud_testutil.py), real IAM, quotas and preemptions.
"""
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import cloud_testutil
from input_pipeline import paths
from launch import tpu_vm

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_cloud"
STEPS = 6
TIMEOUT_S = 1800   # per wait: generous, for a loaded machine (the steps wait on compiles)
B = f"gs://{cloud_testutil.BUCKET}"


def _clone_source(tmp: pathlib.Path) -> str:
  """A git repository holding this checkout's files (committed or not) on branch main."""
  src = tmp / "origin"
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
  for rel in filter(None, files):
    s = ROOT / rel
    if s.is_file():
      (src / rel).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(s, src / rel)
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
  for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "rehearsal"]):
    subprocess.run(git + cmd, cwd=src, check=True, capture_output=True)
  return f"file://{src}"


def _launcher(args, env, **kw):
  return subprocess.Popen([sys.executable, "-m", "launch.tpu_vm", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(predicate, what, timeout=TIMEOUT_S, procs=(), logs=lambda: ""):
  """Polls `predicate`; a launcher that failed or a timeout raises with `logs()` attached."""
  deadline = time.monotonic() + timeout
  while not predicate():
    for p in procs:
      if p.poll() is not None and p.returncode != 0:
        raise AssertionError(f"{what}: launcher exited {p.returncode}:\n"
                             f"{p.stdout.read()[-4000:]}{logs()}")
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}{logs()}")
    time.sleep(0.3)


def _committed(workdir, step):
  return paths.exists(f"{workdir}/checkpoints/{step}/commit_success.txt")


def _killpg_all(worker: pathlib.Path, sig=signal.SIGKILL):
  for line in (worker / ".pgids").read_text().split():
    try:
      os.killpg(int(line), sig)
    except ProcessLookupError:
      pass


def _log(fake_root, tpu, worker, run):
  p = pathlib.Path(fake_root) / tpu / f"worker-{worker}" / "logs" / f"{run}.log"
  return p.read_text() if p.exists() else ""


def _state(workdir, step):
  import jax
  import orbax.checkpoint as ocp
  path = f"{workdir}/checkpoints/{step}/state"
  meta = ocp.StandardCheckpointer().metadata(path)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=one) for k, v in tree.items()}
  return ocp.StandardCheckpointer().restore(path, target)


@pytest.mark.slow
def test_two_host_rehearsal_kill_and_resume(tmp_path):
  hold = tmp_path / "hold"
  emu = cloud_testutil.Emulator(str(tmp_path / "emulator.log"), hold_file=str(hold))
  old = cloud_testutil.apply_env(dict(emu.env))
  from etils.epath import gpath
  gpath._is_tf_installed.cache_clear()   # pylint: disable=protected-access
  fake_root = tmp_path / "cloud"
  env = dict(os.environ, **emu.env, FAKE_GCLOUD_ROOT=str(fake_root),
             FAKE_GCLOUD_PYTHON=sys.executable, FAKE_GCLOUD_VENV=sys.prefix,
             FAKE_GCLOUD_DEVICES_PER_HOST="1", PATH=f"{FAKE}{os.pathsep}{os.environ['PATH']}",
             PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
  procs = []
  try:
    # The data: the tiny config's synthetic set, uploaded to the bucket.
    from configs import default
    from emo_jax.train import assets
    s = default.get_config("test").data.synthetic
    local = tmp_path / "data"
    assets.ensure_default_data(str(local), num_images=s.num_images, num_clips=s.num_clips,
                               seed=s.seed, image_size=s.image_size)
    paths.upload_tree(str(local), f"{B}/fer")

    repo = _clone_source(tmp_path)
    common = ["--zone=local-a", "--accelerator_type=v4-16", "--config=configs/default.py:test",
              f"--override=train.num_steps={STEPS}", "--override=checkpoint.every_steps=2",
              "--override=checkpoint.async_save=False", "--override=eval.at_end=False",
              "--override=export.at_end=False"]

    # 1) The uninterrupted reference: `all` on its own TPU, run in the foreground, deleted.
    ref_wd = f"{B}/runs/ref"
    ref = _launcher(["all", "--name=ref", *common, f"--repo_url={repo}", "--branch=main",
                     f"--data_gcs={B}/fer", f"--workdir={ref_wd}", "--delete_after"], env)
    procs.append(ref)
    out = ref.communicate(timeout=TIMEOUT_S)[0]
    assert ref.returncode == 0, out[-3000:] + "".join(
        f"\n--- worker {i} log:\n" + _log(fake_root, "ref", i, "ref")[-3000:] for i in range(2))
    assert _committed(ref_wd, STEPS)
    assert not (fake_root / "ref.json").exists()   # --delete_after deleted it

    # 2) The same with a lost host: `all` (background run, then following the log).
    wd = f"{B}/runs/r"
    hold.write_text("runs/r/checkpoints/4")   # the bucket stalls the step-4 save
    run = _launcher(["all", "--name=emo", *common, f"--repo_url={repo}", "--branch=main",
                     f"--data_gcs={B}/fer", f"--workdir={wd}"], env, start_new_session=True)
    procs.append(run)
    workers = [fake_root / "emo" / f"worker-{i}" for i in range(2)]
    engaged = pathlib.Path(str(hold) + ".engaged")

    def logs():
      return "".join(f"\n--- worker {i} log:\n" + _log(fake_root, "emo", i, "r")[-3000:]
                     for i in range(2))

    def engaged_or_ended():   # a run that ended before the save fails the wait at once
      if any(tpu_vm.EXIT_LINE in _log(fake_root, "emo", i, "r") for i in range(2)):
        raise AssertionError(f"the run ended before the step-4 save:{logs()}")
      return engaged.exists()

    _wait_for(engaged_or_ended, "the step-4 checkpoint save", procs=[run], logs=logs)
    _killpg_all(workers[1])
    _killpg_all(workers[0])   # the surviving host is stuck in a collective: restart it too
    hold.unlink()
    try:
      os.killpg(run.pid, signal.SIGTERM)   # stop following the log
    except ProcessLookupError:
      pass
    run_out = run.communicate(timeout=60)[0]
    assert _committed(wd, 2) and not _committed(wd, 4) and not _committed(wd, STEPS)
    assert "# follow the run: python -m launch.tpu_vm logs --name=emo" in run_out
    assert "# tear it down:   python -m launch.tpu_vm delete --name=emo" in run_out
    assert "step=2 loss=" in run_out   # the launcher followed worker 0's log on the terminal
    first = _log(fake_root, "emo", 0, "r")
    assert "step=2 loss=" in first and f"step={STEPS} loss=" not in first

    # Setup ran the runtime install (recorded, not executed) from the local clone, and the
    # data step filled ~/data on every worker from the bucket.
    installs = [json.loads(l) for l in (fake_root / "installs.jsonl").read_text().splitlines()]
    assert {i["tpu"] for i in installs} == {"ref", "emo"}
    assert all(not i["test"] and i["pip"].startswith("jax[tpu]==") for i in installs)
    for w in workers:
      assert (w / "emo_jax" / ".git").is_dir() and (w / "emo_jax" / "launch" / "tpu_vm.py").exists()
      assert (w / "data" / "GENERATED.json").read_text() == (local / "GENERATED.json").read_text()

    # 3) Resume: the launcher's run step on the same TPU, same data root, in the foreground.
    res = _launcher(["run", "--name=emo", *common, f"--workdir={wd}", "--data_root=~/data",
                     "--foreground"], env)
    procs.append(res)
    out = res.communicate(timeout=TIMEOUT_S)[0]
    assert res.returncode == 0, out[-3000:] + _log(fake_root, "emo", 0, "r")[-3000:]
    second = _log(fake_root, "emo", 0, "r")
    assert "resumed from step" in second and "step=1 loss=" not in second, second[-3000:]
    assert f"step={STEPS} loss=" in second
    assert second.rstrip().endswith(f"{tpu_vm.EXIT_LINE} 0"), second[-3000:]
    assert _committed(wd, STEPS)
    dl = _launcher(["delete", "--name=emo", "--zone=local-a", "--accelerator_type=v4-16"], env)
    assert dl.wait(60) == 0 and not (fake_root / "emo").exists()

    # The resumed run's final train state equals the uninterrupted run's.
    a, b = _state(ref_wd, STEPS), _state(wd, STEPS)
    assert sorted(a) == sorted(b) and any(k.startswith("params/") for k in a)
    assert int(np.asarray(b["step"])) == STEPS
    for k in a:
      np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for tpu in ("ref", "emo"):
      d = fake_root / tpu
      for i in range(2):
        if (d / f"worker-{i}" / ".pgids").exists():
          _killpg_all(d / f"worker-{i}")
    cloud_testutil.restore_env(old)
    gpath._is_tf_installed.cache_clear()   # pylint: disable=protected-access
    emu.stop()
