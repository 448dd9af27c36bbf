"""Multi-host on one machine.

End to end (slow): two `python -m emo_jax.main` processes joined by
`jax.distributed.initialize(coordinator_address='localhost:<port>', num_processes=2,
process_id=i)`, 4 fake CPU devices each (8 global; cross-process collectives over gloo),
train the tiny config and must give the same per-step losses and the same checkpointed
train state as one process with 8 devices. This is the code path a Cloud TPU pod runs on
`--worker=all`.

Input side (fast): the global batch of a step must hold the same examples, token for
token, whatever the number of processes, shuffled answer options included (the
per-example randomness is keyed by the global position, before the host split).
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from ports import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 2
TIMEOUT_S = 900

CONFIG = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from configs import default


def get_config(arg=None):
  c = default.get_config("test")
  c.data.pipeline.shuffle_options = SHUFFLE   # see tests/test_multihost.py docstring
  return c
"""


def _write_config(path: pathlib.Path, shuffle: bool) -> pathlib.Path:
  path.write_text(CONFIG.replace("SHUFFLE", repr(shuffle)))
  return path


def _env(devices: int) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _main_argv(config, workdir, *extra) -> list:
  return [sys.executable, "-m", "emo_jax.main", f"--config={config}",
          f"--workdir={workdir}", f"--config.train.num_steps={STEPS}",
          "--config.train.log_every=1", "--config.eval.at_end=False",
          "--config.export.at_end=False", "--config.checkpoint.async_save=False", *extra]


def _losses(text: str) -> dict[int, float]:
  return {int(s): float(l) for s, l in re.findall(r"step=(\d+) loss=([-\d.eE+naif]+)", text)}


def _check(out: str, rc: int, what: str) -> None:
  assert rc == 0, f"{what} failed (rc={rc}):\n{out[-4000:]}"


def run_processes(argvs: list[list[str]], env: dict, what: str,
                  timeout: float = TIMEOUT_S) -> list[str]:
  """Starts one subprocess per argv at once (the processes of one jax.distributed job),
  waits for all, kills any left over, checks every exit code; returns their outputs."""
  procs = [subprocess.Popen(a, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for a in argvs]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, out) in enumerate(zip(procs, outs)):
    _check(out, p.returncode, f"{what} process {i}")
  return outs


# ------------------------------------------------------------------------------ input side


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  from emo_jax.train import assets
  root = tmp_path_factory.mktemp("mh_data")
  paths = assets.ensure_default_data(str(root), num_images=24, num_clips=0, seed=0,
                                     image_size=48)
  return str(root), paths


def _global_first_batch(root, paths, shuffle_options: bool, count: int) -> dict:
  from configs import default
  from emo_jax.train import task as task_lib
  from input_pipeline import pipeline as pl
  from input_pipeline.records import SkipCounter
  c = default.get_config("test")
  c.data.root = root
  mc = task_lib.model_config(c)
  toks = task_lib.tokenizers(paths)
  recs = task_lib.train_records(c, root, SkipCounter(strict=True))
  pcfg = task_lib.pipeline_config(c, mc, shuffle=True, num_epochs=None, drop_remainder=True,
                                  seed=c.seed, shuffle_options=shuffle_options)
  parts = [next(iter(pl.make_dataset(recs, pcfg, *toks, process_index=i,
                                     process_count=count))) for i in range(count)]
  # The global array holds each process's rows as a block; process i has the examples
  # i, i+count, ... of the global shuffled order. GRPO samples in that order: restore it.
  from emo_jax.posttrain.grpo import global_order
  glob = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  order = global_order(len(glob["input_ids"]), count)
  return {k: v[order] for k, v in glob.items()}


@pytest.mark.parametrize("shuffle_options", [False, True])
def test_global_batch_independent_of_process_count(tiny_data, shuffle_options):
  root, paths = tiny_data
  one = _global_first_batch(root, paths, shuffle_options, 1)
  two = _global_first_batch(root, paths, shuffle_options, 2)
  assert sorted(one) == sorted(two)
  assert one["input_ids"].shape[0] == 8
  for k in one:
    np.testing.assert_array_equal(two[k], one[k], err_msg=k)


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  config = _write_config(tmp_path / "mh_config.py", shuffle=False)
  # 1) One process, 8 devices (also generates the synthetic data both runs read: the
  #    multi-process run gets it ready-made, process 1 does not wait for process 0).
  single_dir = tmp_path / "single"
  single = subprocess.run(_main_argv(config, single_dir), cwd=ROOT, env=_env(8), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT_S)
  _check(single.stdout, single.returncode, "single-process run")
  ref = _losses(single.stdout)
  assert sorted(ref) == list(range(1, STEPS + 1)), single.stdout[-3000:]

  # 2) Two processes x 4 devices on localhost, same data, one shared workdir.
  port = free_port()
  multi_dir = tmp_path / "multi"
  outs = run_processes(
      [_main_argv(config, multi_dir, f"--config.data.root={single_dir / 'data'}",
                  f"--coordinator_address=localhost:{port}", "--num_processes=2",
                  f"--process_id={i}") for i in range(2)], _env(4), "multi-process run")
  got = _losses(outs[0])
  assert sorted(got) == sorted(ref), outs[0][-3000:]
  for step in ref:   # main prints the loss with 4 decimals
    assert np.isfinite(ref[step])
    np.testing.assert_allclose(got[step], ref[step], atol=2e-4, err_msg=f"step {step}")

  # The trained state both runs checkpointed at the last step: same keys, same values.
  import orbax.checkpoint as ocp
  import jax
  a = ocp.StandardCheckpointer().restore(single_dir / "checkpoints" / str(STEPS) / "state")
  # The 2-process checkpoint names devices of two hosts: restore it onto this one.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=one) for k, v in a.items()}
  b = ocp.StandardCheckpointer().restore(multi_dir / "checkpoints" / str(STEPS) / "state",
                                         target)
  assert sorted(a) == sorted(b) and len(a) > 10
  assert int(np.asarray(a["step"])) == int(np.asarray(b["step"])) == STEPS
  # Accumulated gradients (Adam first moments): equal up to the reduction order. Gradients
  # that are zero in exact arithmetic (a key bias under softmax) are pure rounding noise,
  # far below the tolerance scaled by the largest moment.
  mus = [k for k in a if "/mu/" in k]
  assert mus
  scale = max(float(np.max(np.abs(np.asarray(a[k])))) for k in mus)
  assert scale > 0
  for key in mus:
    np.testing.assert_allclose(np.asarray(b[key]), np.asarray(a[key]), rtol=1e-3,
                               atol=1e-4 * scale, err_msg=key)
  # Parameters: Adam turns such noise g into steps lr * |g| / (|g| + eps) (eps 1e-8), a few
  # 1e-6 here; a real mismatch of data or gradients moves weights by ~lr = 2e-3 per step.
  params = [k for k in a if k.startswith("params/")]
  assert params
  for key in params:
    np.testing.assert_allclose(np.asarray(b[key]), np.asarray(a[key]), rtol=1e-4, atol=1e-4,
                               err_msg=key)


# ------------------------------------------------------------------ hosts' bucket lengths

LENGTHS_SCRIPT = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import jax
import numpy as np
from jax.experimental import multihost_utils
port, pid = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(coordinator_address=f"localhost:{{port}}", num_processes=2,
                           process_id=pid)
from emo_jax import sharding
from input_pipeline import pipeline
length = (4, 7)[pid]          # each host bucketed its own examples
ids = np.full((2, length), 10 + pid, np.int32)
batch = dict(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=np.ones_like(ids),
             label=np.array([pid, pid], np.int32))
out = sharding.common_sequence_length(batch, pipeline.sequence_pad_values(-1))
mesh = sharding.make_mesh((1, 4, 1))
g = sharding.to_global_batch(out, mesh)
full = {{k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
         for k, v in g.items()}}
if pid == 0:
  np.savez(sys.argv[3], **full)
print("done", pid, flush=True)
"""


def test_hosts_with_different_bucket_lengths_agree(tmp_path):
  """Two processes whose local batches were bucketed to 4 and 7 tokens build one global
  batch of length 7: the shorter host's rows padded (pad id, zero masks), nothing cut."""
  script = tmp_path / "lengths.py"
  script.write_text(LENGTHS_SCRIPT)
  port, out = free_port(), tmp_path / "global.npz"
  run_processes([[sys.executable, str(script), str(port), str(i), str(out)] for i in range(2)],
                _env(2), "lengths", timeout=300)
  g = np.load(out)
  assert g["input_ids"].shape == g["attention_mask"].shape == g["loss_mask"].shape == (4, 7)
  np.testing.assert_array_equal(g["input_ids"][:2], [[10] * 4 + [-1] * 3] * 2)
  np.testing.assert_array_equal(g["input_ids"][2:], [[11] * 7] * 2)
  np.testing.assert_array_equal(g["attention_mask"][:2], [[1] * 4 + [0] * 3] * 2)
  np.testing.assert_array_equal(g["loss_mask"][2:], np.ones((2, 7)))
  np.testing.assert_array_equal(g["label"], [0, 0, 1, 1])
