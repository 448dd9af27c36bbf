"""benchmarks/bench_llama_mfu.py runs end to end on a tiny shape and reports consistent numbers
(the 7B accelerator measurement runs this same code path)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_llama_mfu  # noqa: E402

from emo_jax.perf.flops import lora_step_flops  # noqa: E402
from emo_jax.models.llama import LlamaConfig  # noqa: E402


def test_bench_llama_mfu_tiny_reports_flops_mfu_and_trains(tmp_path):
  plan = bench_llama_mfu.main(["--shape", "tiny", "--batch", "2", "--seq", "64",
                               "--targets", "q_proj,v_proj", "--remat", "full", "--plan-only",
                               "--out", str(tmp_path)])
  assert not (tmp_path / "llama_mfu_tiny.json").exists()   # planned, nothing run
  mem = plan["memory_bytes"]
  # The frozen weights are arguments of the step: at least their fp32 bytes.
  cfg = LlamaConfig(**bench_llama_mfu.SHAPES["tiny"])
  weights = cfg.num_hidden_layers * (4 * 128 * 128 + 3 * 128 * 344) + 2 * 512 * 128
  assert mem["argument"] >= 4 * weights and mem["temp"] > 0
  assert mem["peak"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
  bench_llama_mfu.main(["--shape", "tiny", "--batch", "2", "--seq", "64", "--steps", "2",
                        "--targets", "q_proj,v_proj", "--remat", "full", "--matmul", "256",
                        "--peak-tflops", "0.5", "--out", str(tmp_path)])
  res = json.loads((tmp_path / "llama_mfu_tiny.json").read_text())
  assert res["traced_matmul_flops_per_step"] == plan["traced_matmul_flops_per_step"]
  want = lora_step_flops(cfg, batch=2, seq=64, rank=16, targets=("q_proj", "v_proj"))
  assert res["model_flops_per_step"] == want["total"]
  # Remat recomputes the forward's matmuls: the traced count exceeds the model count.
  assert res["traced_matmul_flops_per_step"] > res["model_flops_per_step"]
  assert res["traced_unknown_loops"] == 0
  step = res["step_s_median"]
  assert res["tokens_per_s"] == pytest.approx(2 * 64 / step)
  assert res["mfu"] == pytest.approx(want["total"] / step / 0.5e12)
  assert res["hfu"] == pytest.approx(res["traced_matmul_flops_per_step"] / step / 0.5e12)
  # The step trains (LoRA B starts at zero, so the first update moves the loss).
  assert res["loss_last"] < res["loss_first"]
  assert "| " in (tmp_path / "llama_mfu_tiny.md").read_text()
