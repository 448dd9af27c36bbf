"""Helpers of the kill-and-resume tests: run the main job until a step, read its final state."""
import os
import subprocess
import json
import re
import time

import numpy as np

from emo_jax.train import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def committed_steps(workdir) -> list[int]:
  """Steps under `workdir`/checkpoints whose save finished (orbax's commit marker)."""
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return []
  return sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.exists(
      os.path.join(root, n, ckpt_lib.COMMIT_MARKER)))


def _run_until(cmd, at_step, sig, timeout=600, ready=None):
  """Starts the job; sends `sig` at the first step >= `at_step` it prints (None: run to
  the end) for which `ready()` holds (default: always). Returns (returncode, stdout)."""
  p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  out = []
  t0 = time.time()
  for line in p.stdout:
    out.append(line)
    m = re.match(r"step=(\d+) ", line)
    if (at_step is not None and m and int(m.group(1)) >= at_step
        and (ready is None or ready())):
      p.send_signal(sig)
      at_step = None
    if time.time() - t0 > timeout:
      p.kill()
      raise TimeoutError("".join(out[-30:]))
  p.wait()
  return p.returncode, "".join(out)


def _final_arrays(workdir):
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ck.latest_step()
  restored = ck.manager.restore(step, args=ckpt_lib.ocp.args.Composite(
      state=ckpt_lib.ocp.args.StandardRestore()))
  ck.close()
  return step, {k: np.asarray(v) for k, v in restored["state"].items()}


def _summary(out):
  return json.loads(out[out.rindex("\n{"):])


def assert_same_final_state(ref_dir, run_dir, num_steps):
  """The two runs' last checkpoints: same step, same keys, bit-identical arrays."""
  ref_step, ref = _final_arrays(ref_dir)
  run_step, run = _final_arrays(run_dir)
  assert ref_step == run_step == num_steps
  assert ref.keys() == run.keys() and len(ref) > 10
  for k in ref:
    np.testing.assert_array_equal(ref[k], run[k], err_msg=k)   # bitwise
