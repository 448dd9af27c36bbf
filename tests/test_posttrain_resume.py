"""A GRPO run killed with SIGKILL resumes bit-exactly on CPU (rollout RNG included)."""
import json
import os
import random
import signal
import sys

import numpy as np
import pytest

from resume_testutil import (REPO, _run_until, _summary, assert_same_final_state,
                             committed_steps)

NUM_STEPS = 10
TIMEOUT = 1800   # seconds per subprocess (a loaded 2-core machine)


def _cmd(workdir, data_root):
  return [sys.executable, "-m", "emo_jax.main", "--config=configs/posttrain.py:test",
          "--mode=grpo", f"--workdir={workdir}", f"--config.data.root={data_root}",
          f"--config.grpo.num_steps={NUM_STEPS}", "--config.checkpoint.every_steps=1",
          "--config.checkpoint.max_to_keep=20", "--config.eval.at_end=False",
          "--config.export.at_end=False"]


def _log(workdir):
  """Last logged record per step (a step that ran twice keeps its rerun)."""
  out = {}
  with open(os.path.join(workdir, "posttrain_log.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      out[r["step"]] = r
  return out


@pytest.mark.slow
def test_grpo_sigkill_resume_is_bitwise(tmp_path):
  assert os.path.isdir(REPO)
  data = str(tmp_path / "data")
  rc, out = _run_until(_cmd(tmp_path / "ref", data), None, None, TIMEOUT)
  assert rc == 0, out[-3000:]
  assert _summary(out)["step"] == NUM_STEPS
  # SIGKILL at an arbitrary step once some save has committed (saves are asynchronous: at a
  # fraction of a second per step, the first can still be in flight a few steps later).
  kill_at = random.Random(os.getpid()).randint(2, NUM_STEPS // 2)
  rc, out = _run_until(_cmd(tmp_path / "run", data), kill_at, signal.SIGKILL, TIMEOUT,
                       ready=lambda: bool(committed_steps(tmp_path / "run")))
  assert rc == -signal.SIGKILL, out[-3000:]
  last = committed_steps(tmp_path / "run")[-1]
  assert last < NUM_STEPS
  rc, out = _run_until(_cmd(tmp_path / "run", data), None, None, TIMEOUT)
  assert rc == 0, out[-3000:]
  assert f"resumed from step {last}" in out
  assert_same_final_state(tmp_path / "ref", tmp_path / "run", NUM_STEPS)
  ref_log, run_log = _log(tmp_path / "ref"), _log(tmp_path / "run")
  assert sorted(ref_log) == sorted(run_log) == list(range(1, NUM_STEPS + 1))
  for s in ref_log:   # the same rollouts: same rewards, lengths, KL and loss at every step
    for k in ("reward", "completion_length", "kl", "loss", "grad_norm"):
      assert ref_log[s][k] == run_log[s][k], (s, k)
