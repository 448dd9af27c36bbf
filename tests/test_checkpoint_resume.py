"""orbax checkpointing: state + grain iterator round trip, keep policy, half-written
checkpoints never restored, and (subprocess) SIGKILL / SIGTERM resume of the main job."""
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax.train import checkpoint as ckpt_lib
from resume_testutil import REPO, _env, _final_arrays, _run_until, _summary, assert_same_final_state  # noqa: F401


def _iter(seed=1):
  ds = grain.MapDataset.range(200).shuffle(seed=seed).batch(4)
  return ckpt_lib.CheckpointableIterator(iter(ds.to_iter_dataset()))


def _state(step):
  return {"step": jnp.int32(step), "params": {"w": jnp.full((2, 3), float(step))},
          "rng": jax.random.fold_in(jax.random.key(0), step)}


def test_state_and_iterator_round_trip_and_keep_policy(tmp_path):
  it = _iter()
  ck = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2, keep_period=3, save_every_steps=1)
  for step in range(1, 8):
    next(it)
    assert ck.should_save(step)
    ck.save(step, _state(step), it)
  ck.close()
  # keep-N (6, 7) plus keep-every-3 (3, 6).
  assert sorted(ckpt_lib.Checkpointer(str(tmp_path)).all_steps()) == [3, 6, 7]
  expected_next = next(it)

  it2 = _iter()
  ck2 = ckpt_lib.Checkpointer(str(tmp_path))
  restored, step = ck2.restore(_state(0), it2)
  assert step == 7
  np.testing.assert_array_equal(restored["params"]["w"], np.full((2, 3), 7.0))
  assert int(restored["step"]) == 7
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                jax.random.key_data(_state(7)["rng"]))
  np.testing.assert_array_equal(next(it2), expected_next)   # same next batch
  ck2.close()


def test_time_based_saving(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), save_every_steps=0, save_every_secs=0.0)
  assert ck.should_save(5)
  ck2 = ckpt_lib.Checkpointer(str(tmp_path / "b"), save_every_steps=0, save_every_secs=3600)
  assert not ck2.should_save(5)
  ck.close(); ck2.close()


@pytest.mark.parametrize("damage", ["tmp_dir", "no_commit_marker"])
def test_half_written_checkpoint_is_never_restored(tmp_path, damage):
  ck = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=5, save_every_steps=1,
                             async_save=False)
  for step in (1, 2):
    ck.save(step, _state(step), None)
  ck.close()
  if damage == "tmp_dir":
    # What a crash during the write of step 3 leaves behind.
    shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp-1234")
  else:
    # A step directory whose commit never happened (marker missing).
    shutil.copytree(tmp_path / "2", tmp_path / "3")
    os.remove(tmp_path / "3" / "commit_success.txt")
    (tmp_path / "3" / "state" / "garbage").write_text("partial")
  ck2 = ckpt_lib.Checkpointer(str(tmp_path))
  restored, step = ck2.restore(_state(0), None)
  assert step == 2
  np.testing.assert_array_equal(restored["params"]["w"], np.full((2, 3), 2.0))
  # The run can write step 3 again and it becomes the latest.
  assert ck2.save(3, _state(3), None)
  ck2.wait()
  assert ck2.latest_step() == 3
  ck2.close()


def test_iterator_without_state_is_rejected():
  with pytest.raises(TypeError, match="get_state"):
    ckpt_lib.CheckpointableIterator(iter([1, 2]))


# ------------------------------------------------------------------------------------------
# The main job in subprocesses: SIGKILL at an arbitrary step, SIGTERM, restart.

import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


NUM_STEPS = 12


def _cmd(workdir, data_root, every_steps):
  return [sys.executable, "-m", "emo_jax.main", "--config=configs/default.py:test",
          f"--workdir={workdir}", f"--config.data.root={data_root}",
          f"--config.train.num_steps={NUM_STEPS}",
          f"--config.checkpoint.every_steps={every_steps}",
          "--config.checkpoint.max_to_keep=20", "--config.train.log_batch_hashes=True",
          "--config.eval.at_end=False", "--config.export.at_end=False"]


def _hashes(workdir):
  seen = {}
  with open(os.path.join(workdir, "batch_hashes.0.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      seen.setdefault(r["step"], set()).add(r["sha1"])
  return seen


@pytest.mark.slow
def test_sigterm_then_sigkill_resume_bitwise(tmp_path):
  data = str(tmp_path / "data")
  # Reference: never interrupted.
  rc, out = _run_until(_cmd(tmp_path / "ref", data, 4), None, None)
  assert rc == 0, out[-3000:]
  assert _summary(out)["step"] == NUM_STEPS
  # SIGTERM (preemption notice): finish the step, save it, exit 0 before the end.
  rc, out = _run_until(_cmd(tmp_path / "run", data, 4), 2, signal.SIGTERM)
  assert rc == 0, out[-3000:]
  s = _summary(out)
  assert s["preempted"] and s["step"] < NUM_STEPS, s
  ck = ckpt_lib.Checkpointer(str(tmp_path / "run" / "checkpoints"))
  assert ck.latest_step() == s["step"]      # saved at the step it stopped, not periodically
  ck.close()
  # Restart; SIGKILL at an arbitrary later step (its async save may be half written).
  kill_at = random.Random(os.getpid()).randint(s["step"] + 1, NUM_STEPS - 2)
  rc, out = _run_until(_cmd(tmp_path / "run", data, 4), kill_at, signal.SIGKILL)
  assert rc == -signal.SIGKILL, out[-3000:]
  assert f"resumed from step {s['step']}" in out
  # Restart to the end.
  rc, out = _run_until(_cmd(tmp_path / "run", data, 4), None, None)
  assert rc == 0, out[-3000:]
  assert _summary(out)["step"] == NUM_STEPS

  assert_same_final_state(tmp_path / "ref", tmp_path / "run", NUM_STEPS)
  # Same batch at every step, including the steps that ran twice.
  ref_h, run_h = _hashes(tmp_path / "ref"), _hashes(tmp_path / "run")
  assert sorted(ref_h) == sorted(run_h) == list(range(1, NUM_STEPS + 1))
  for step in ref_h:
    assert len(ref_h[step]) == 1 and run_h[step] == ref_h[step], step
  assert len({next(iter(v)) for v in ref_h.values()}) == NUM_STEPS   # batches differ
