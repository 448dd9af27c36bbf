"""HF / PEFT interop: load, save (single + sharded), LoRA merge on export, PEFT adapters."""
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from emo_jax.convert import hf
from emo_jax.convert.safetensors_io import CheckpointError, CheckpointReader
from emo_jax.models.lora import apply_lora, lora_modules
from llama_testutil import hf_logits, make_hf

IDS = np.random.RandomState(0).randint(0, 96, (2, 10))


def _randomize_lora(model, seed=0):
  key = jax.random.key(seed)
  for _, m in lora_modules(model):
    key, sub = jax.random.split(key)
    m.lora_b.set_value(0.05 * jax.random.normal(sub, m.lora_b[...].shape))


def test_round_trip_single_and_sharded(tmp_path):
  ref = make_hf(tmp_path / "hf", num_key_value_heads=2,
                rope_scaling=dict(rope_type="linear", factor=2.0))
  model = hf.load_llama(tmp_path / "hf")
  files = hf.save_llama(model, tmp_path / "out")
  assert files == ["model.safetensors"]
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert back.config.rope_parameters["rope_type"] == "linear"
  for k, v in ref.state_dict().items():
    np.testing.assert_array_equal(back.state_dict()[k].numpy(), v.numpy(), err_msg=k)
  np.testing.assert_array_equal(hf_logits(back, IDS), hf_logits(ref, IDS))
  # Sharded export above the threshold: index + several files, readable by both sides.
  files = hf.save_llama(model, tmp_path / "sharded", max_shard_bytes=40_000)
  assert len(files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
  np.testing.assert_array_equal(hf_logits(back, IDS), hf_logits(ref, IDS))
  again = hf.load_llama(tmp_path / "sharded", scan_layers=True)
  np.testing.assert_allclose(np.asarray(again(jnp.asarray(IDS))), hf_logits(ref, IDS),
                             atol=1e-4, rtol=0)
  # A scanned model saves per-layer HF keys again.
  hf.save_llama(again, tmp_path / "from_scan")
  keys = set(CheckpointReader(tmp_path / "from_scan").keys())
  assert keys == set(ref.state_dict())


def test_lora_merged_export_and_peft_adapter(tmp_path):
  base = make_hf(tmp_path / "hf", num_key_value_heads=2)
  model = hf.load_llama(tmp_path / "hf")
  apply_lora(model, rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj",
                                              "gate_proj"], rngs=nnx.Rngs(3))
  _randomize_lora(model)
  ours = np.asarray(model(jnp.asarray(IDS)))
  assert np.abs(ours - hf_logits(base, IDS)).max() > 1e-3  # the adapter does something

  # Merged export (the model itself stays unmerged).
  hf.save_llama(model, tmp_path / "merged")
  assert lora_modules(model)
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
  np.testing.assert_allclose(hf_logits(merged, IDS), ours, atol=1e-4, rtol=0)

  # PEFT adapter on top of the HF base.
  hf.save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "hf"))
  cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
  keys = CheckpointReader(tmp_path / "adapter" / "adapter_model.safetensors").keys()
  assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
  peft_model = peft.PeftModel.from_pretrained(make_hf(None, num_key_value_heads=2),
                                              tmp_path / "adapter").eval()
  sd = peft_model.state_dict()
  a0 = sd["base_model.model.model.layers.1.mlp.gate_proj.lora_A.default.weight"].numpy()
  np.testing.assert_array_equal(
    a0, np.asarray(model.model.layers[1].mlp.gate_proj.lora_a[...]).T)
  np.testing.assert_allclose(hf_logits(peft_model, IDS), ours, atol=1e-4, rtol=0)

  # Import the adapter back (eager and scanned layouts).
  for scan in (False, True):
    fresh = hf.load_llama(tmp_path / "hf", scan_layers=scan)
    hf.load_peft_adapter(fresh, tmp_path / "adapter")
    assert len(lora_modules(fresh)) == (5 if scan else 10)
    np.testing.assert_allclose(np.asarray(fresh(jnp.asarray(IDS))), ours, atol=1e-4, rtol=0)


def test_peft_partial_targets_export(tmp_path):
  make_hf(tmp_path / "hf")
  model = hf.load_llama(tmp_path / "hf")
  apply_lora(model, rank=2, alpha=4, targets=[r"model\.layers\.1\.self_attn\.v_proj"])
  _randomize_lora(model, 1)
  hf.save_peft_adapter(model, tmp_path / "adapter")
  peft_model = peft.PeftModel.from_pretrained(make_hf(None), tmp_path / "adapter").eval()
  names = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
  assert names == ["base_model.model.model.layers.1.self_attn.v_proj.lora_A"]
  np.testing.assert_allclose(hf_logits(peft_model, IDS), np.asarray(model(jnp.asarray(IDS))),
                             atol=1e-4, rtol=0)


def test_bf16_load_and_pickle_opt_in(tmp_path):
  ref = make_hf(None)
  torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
  with pytest.raises(CheckpointError, match="allow_pickle"):
    hf.load_llama(tmp_path)
  model = hf.load_llama(tmp_path, dtype=jnp.bfloat16, allow_pickle=True)
  k = model.model.layers[0].self_attn.q_proj.kernel[...]
  assert k.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    np.asarray(k), ref.model.layers[0].self_attn.q_proj.weight.detach().numpy().T.astype(
      ml_dtypes.bfloat16))
  out = model(jnp.asarray(IDS))
  assert out.dtype == jnp.float32
  assert np.abs(np.asarray(out) - hf_logits(ref, IDS)).max() < 0.1


def test_bad_checkpoints_raise(tmp_path):
  make_hf(tmp_path / "hf")
  with pytest.raises(CheckpointError, match="do not fit"):
    hf.load_llama(tmp_path / "hf", num_hidden_layers=1)
  with pytest.raises(CheckpointError, match="missing tensor"):
    hf.load_llama(tmp_path / "hf", num_hidden_layers=3)
  with pytest.raises(CheckpointError, match="shape"):
    hf.load_llama(tmp_path / "hf", intermediate_size=40)
  with pytest.raises(CheckpointError, match="config.json not found"):
    hf.load_llama(tmp_path / "missing")
  (tmp_path / "no_weights").mkdir()
  (tmp_path / "no_weights" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
  with pytest.raises(CheckpointError, match="no safetensors"):
    hf.load_llama(tmp_path / "no_weights")
