"""GRPO on two `jax.distributed` processes on localhost (2 fake CPU devices each) against
one process with 4 devices: the rollout, host-side rewards and the update must agree. Its
own file, so the test runner can schedule it beside the SFT multi-host test."""

import subprocess
import sys

import numpy as np
import pytest

from ports import free_port
from test_multihost import ROOT, TIMEOUT_S, _check, _env, run_processes

# -------------------------------------------------------------------------- GRPO on 2 hosts

GRPO_STEPS = 2

# The tiny random model never names a class, so the built-in rewards would all be 0, every
# advantage 0 and the update trivial. A reward registered by the config (the user-extension
# path) that differs between random completions makes the update carry real gradients.
GRPO_CONFIG = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from configs import posttrain
from emo_jax.posttrain import rewards


def letter_share(prompts, completions, **_):
  return [sum(ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]


rewards.register("letter_share", lambda **_: letter_share)


def get_config(arg=None):
  c = posttrain.get_config("test")
  c.grpo.update(dict(rewards=("letter_share",), batch_size=4, num_generations=4,
                     num_steps={GRPO_STEPS}))
  return c
"""


def _grpo_argv(config, workdir, *extra) -> list:
  return [sys.executable, "-m", "emo_jax.main", f"--config={config}", "--mode=grpo",
          f"--workdir={workdir}", "--config.eval.at_end=False", "--config.export.at_end=False",
          "--config.checkpoint.async_save=False", *extra]


def _grpo_log(workdir) -> dict:
  import json
  with open(workdir / "posttrain_log.jsonl") as f:
    return {r["step"]: r for r in map(json.loads, f)}


@pytest.mark.slow
def test_grpo_two_processes_match_one_process(tmp_path):
  """GRPO across two processes gives what one process gives: the rollout (sharded prompts,
  one key for the global batch, completions gathered per host), host-side rewards, group
  advantages and the update."""
  config = tmp_path / "grpo_config.py"
  config.write_text(GRPO_CONFIG)
  single_dir = tmp_path / "single"
  single = subprocess.run(_grpo_argv(config, single_dir), cwd=ROOT, env=_env(4), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT_S)
  _check(single.stdout, single.returncode, "single-process GRPO")
  port = free_port()
  multi_dir = tmp_path / "multi"
  run_processes([_grpo_argv(config, multi_dir, f"--config.data.root={single_dir / 'data'}",
                            f"--coordinator_address=localhost:{port}", "--num_processes=2",
                            f"--process_id={i}") for i in range(2)], _env(2), "GRPO")
  ref, got = _grpo_log(single_dir), _grpo_log(multi_dir)
  assert sorted(ref) == sorted(got) == list(range(1, GRPO_STEPS + 1))
  for s in ref:
    assert ref[s]["reward_std"] > 0 and ref[s]["grad_norm"] > 0, ref[s]   # a real update
    for k in ("reward", "reward_std", "rewards/letter_share", "completion_length", "kl",
              "loss", "grad_norm"):
      np.testing.assert_allclose(got[s][k], ref[s][k], rtol=1e-4, atol=1e-6,
                                 err_msg=f"step {s} {k}")
