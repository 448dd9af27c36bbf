"""The main job end to end in a subprocess (the README command's code path, tiny preset):
data generation -> train -> eval (both modes, report + PNG) -> export, then --mode=eval
and --mode=export on the finished workdir."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=900):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  p = subprocess.run([sys.executable, "-m", "emo_jax.main", *args], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=timeout)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
  return json.loads(p.stdout[p.stdout.index("\n{") + 1:] if not p.stdout.startswith("{")
                    else p.stdout)


@pytest.mark.slow
def test_main_job_train_eval_export(tmp_path):
  wd = str(tmp_path / "wd")
  out = _main("--config=configs/default.py:test", f"--workdir={wd}")
  assert out["step"] == 6 and not out["preempted"]
  ev = out["eval"]
  for mode in ("generate", "likelihood"):
    r = ev[mode]["synthetic_images"]
    assert 0.0 <= r["war"] <= 1.0 and 0.0 <= r["uar"] <= 1.0
    assert r["num_samples"] == 14                     # 70 images, 20% test split
    assert os.path.getsize(os.path.join(
        wd, "eval", f"confusion_synthetic_images_{mode}.png")) > 1000
  with open(os.path.join(wd, "eval", "report.json")) as f:
    report = json.load(f)
  assert report["step"] == 6
  assert "groups" in report["modes"]["generate"]["synthetic_images"]   # AGR breakdown
  md = open(os.path.join(wd, "eval", "report.md")).read()
  assert "| synthetic_images |" in md
  # The AU stage: a head per configured fold on the trained vision tower, in the report.
  au = out["au"]
  assert 0.0 <= au["mean_f1"] <= 1.0 and 0.0 < au["all_positive_mean_f1"] <= 1.0
  assert list(au["folds"]) == ["1"] and "## Action units (synthetic_au)" in md
  assert os.path.exists(os.path.join(wd, "au", "fold1", "au_head.safetensors"))
  exp = out["export"]
  assert os.path.exists(os.path.join(exp["hf"], "config.json"))
  assert os.path.exists(os.path.join(exp["bundle"], "emo_llama_config.json"))
  assert exp["peft"] is None            # the default trains the LLM in full: no LoRA
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(wd))   # TensorBoard

  # The same evaluation from the saved checkpoint reproduces the numbers.
  again = _main("--config=configs/default.py:test", f"--workdir={wd}", "--mode=eval")
  assert again["eval"] == ev
