"""Helpers of the kill-and-resume tests: run the main job until a step, read its final state."""
import os
import subprocess
import json
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


def _run_until(cmd, at_step, sig, timeout=600):
  """Starts the job; sends `sig` once it printed step=`at_step` (None: run to the end).
  Returns (returncode, stdout)."""
  p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  out = []
  t0 = time.time()
  for line in p.stdout:
    out.append(line)
    if at_step is not None and line.startswith(f"step={at_step} "):
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
