"""Loaders refuse what they cannot represent: HF `hidden_act` (parity with transformers for
the supported ones, refusal by name for the rest), computation-changing config fields,
integer-stored weights, and a fuzz over malformed safetensors headers, config.json files
and bundle configs, each of which must be a CheckpointError naming the file (and the
tensor or field)."""
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from emo_jax.convert import bundle as bundle_lib
from emo_jax.convert import hf
from emo_jax.convert.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from emo_jax.models.layers import activations
from llama_testutil import TINY, hf_logits, make_hf

IDS = np.random.RandomState(0).randint(3, 96, (2, 9))


def test_every_activation_matches_transformers():
  x = np.linspace(-12, 12, 2001, dtype=np.float32)
  for name, fn in activations.ACT2FN.items():
    ref = transformers.activations.ACT2FN[name]
    with torch.no_grad():
      want = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x))), want, atol=2e-6, rtol=2e-6,
                               err_msg=name)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu2"])
def test_llama_with_other_activation_matches_transformers(tmp_path, act):
  ref = make_hf(tmp_path / "hf", hidden_act=act)
  ours = hf.load_llama(tmp_path / "hf")
  assert ours.config.hidden_act == act
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(IDS))), hf_logits(ref, IDS),
                             atol=1e-4, rtol=1e-4)
  # And the saved config says so (transformers reloads the same function).
  hf.save_llama(ours, tmp_path / "out")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_act"] == act


def _hf_dir(tmp_path, **cfg_changes):
  make_hf(tmp_path / "hf")
  p = tmp_path / "hf" / "config.json"
  d = json.loads(p.read_text())
  d.update(cfg_changes)
  p.write_text(json.dumps(d))
  return tmp_path / "hf"


@pytest.mark.parametrize("changes,field", [
    ({"hidden_act": "prelu"}, "hidden_act"),
    ({"hidden_act": "no_such_act"}, "hidden_act"),
    ({"hidden_act": 3}, "hidden_act"),
    ({"sliding_window": 4}, "sliding_window"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"hidden_size": "32"}, "hidden_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"rope_scaling": [1, 2]}, "rope_scaling"),
])
def test_config_field_that_cannot_be_honoured_is_refused(tmp_path, changes, field):
  path = _hf_dir(tmp_path, **changes)
  with pytest.raises(CheckpointError) as e:
    hf.load_llama(path)
  assert "config.json" in str(e.value) and field in str(e.value)


def test_integer_stored_weight_is_refused(tmp_path):
  make_hf(tmp_path / "hf")
  f = tmp_path / "hf" / "model.safetensors"
  sf = SafetensorsFile(f)
  tensors = {k: np.array(sf.get(k)) for k in sf.keys()}
  del sf
  key = "model.layers.0.mlp.up_proj.weight"
  tensors[key] = np.round(tensors[key] * 100).astype(np.int32)
  write_safetensors(f, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()])
  with pytest.raises(CheckpointError, match=f"{key}.*int32"):
    hf.load_llama(tmp_path / "hf")


# --------------------------------------------------------------------------- fuzz


def _file(tmp_path, header_bytes: bytes, data: bytes = b"\0" * 64) -> str:
  p = tmp_path / "x.safetensors"
  p.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
  return str(p)


def _header(**entry):
  base = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
  base.update(entry)
  return json.dumps({"w": {k: v for k, v in base.items() if v is not _DROP}}).encode()


_DROP = object()
HEADER_CASES = {
    "garbage": b"\xff\xfe\x00garbage",
    "not_json": b"{not json",
    "json_list": b"[1, 2, 3]",
    "json_string": b'"hello"',
    "deep_nesting": b"[" * 100000 + b"]" * 100000,
    "entry_is_list": json.dumps({"w": [1, 2]}).encode(),
    "metadata_list": json.dumps({"__metadata__": [1]}).encode(),
    "no_dtype": _header(dtype=_DROP),
    "no_shape": _header(shape=_DROP),
    "no_data_offsets": _header(data_offsets=_DROP),
    "unknown_dtype": _header(dtype="F128"),
    "dtype_not_string": _header(dtype=7),
    "shape_not_list": _header(shape="2x2"),
    "negative_dim": _header(shape=[-2, 2]),
    "float_dim": _header(shape=[2.0, 2]),
    "offsets_past_end": _header(data_offsets=[0, 10_000]),
    "offsets_reversed": _header(data_offsets=[16, 0]),
    "offsets_negative": _header(data_offsets=[-16, 0]),
    "offsets_three": _header(data_offsets=[0, 8, 16]),
    "offsets_strings": _header(data_offsets=["0", "16"]),
    "size_mismatch": _header(data_offsets=[0, 12]),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_fuzz_malformed_safetensors_header(tmp_path, case):
  path = _file(tmp_path, HEADER_CASES[case])
  with pytest.raises(CheckpointError) as e:
    SafetensorsFile(path).get("w")
  assert path in str(e.value)
  if case.startswith(("no_", "unknown", "dtype_", "shape", "negative", "float_", "offsets",
                      "size", "entry")):
    assert "'w'" in str(e.value)


@pytest.mark.parametrize("n", [0, 7])
def test_fuzz_truncated_file(tmp_path, n):
  p = tmp_path / "t.safetensors"
  p.write_bytes(b"\x01" * n)
  with pytest.raises(CheckpointError, match=str(p)):
    SafetensorsFile(p)


def test_fuzz_header_size_past_end(tmp_path):
  p = tmp_path / "t.safetensors"
  p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
  with pytest.raises(CheckpointError, match="exceeds the file size"):
    SafetensorsFile(p)


CONFIG_CASES = {
    "binary": b"\x00\xff\x10",
    "not_json": b"{'vocab_size': 1}",
    "list": b"[]",
    "number": b"42",
    "deep": b"[" * 100000 + b"]" * 100000,
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_fuzz_config_json(tmp_path, case):
  make_hf(tmp_path / "hf")
  p = tmp_path / "hf" / "config.json"
  p.write_bytes(CONFIG_CASES[case])
  with pytest.raises(CheckpointError, match=str(p)):
    hf.load_llama(tmp_path / "hf")


def test_fuzz_index_weight_map(tmp_path):
  make_hf(tmp_path / "hf")
  (tmp_path / "hf" / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
  with pytest.raises(CheckpointError, match="weight_map"):
    hf.load_llama(tmp_path / "hf")


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
  from flax import nnx
  from emo_jax.models.emo_llama import EmoLlama, EmoLlamaConfig
  path = tmp_path_factory.mktemp("bundle")
  model = EmoLlama(EmoLlamaConfig.tiny(), rngs=nnx.Rngs(0))
  bundle_lib.save_bundle(model, path)
  return path


@pytest.mark.parametrize("case", ["no_config", "config_list", "no_llm", "no_vision",
                                  "unknown_field", "not_json"])
def test_fuzz_bundle_config(tiny_bundle, tmp_path, case):
  import shutil
  path = tmp_path / "b"
  shutil.copytree(tiny_bundle, path)
  f = path / bundle_lib.CONFIG_NAME
  doc = json.loads(f.read_text())
  if case == "no_config":
    del doc["config"]
  elif case == "config_list":
    doc["config"] = []
  elif case == "no_llm":
    del doc["config"]["llm"]
  elif case == "no_vision":
    del doc["config"]["vision"]
  elif case == "unknown_field":
    doc["config"]["bogus"] = 1
  f.write_text(json.dumps(doc) if case != "not_json" else "{")
  with pytest.raises(CheckpointError, match=str(f)):
    bundle_lib.load_bundle(path)


def test_bundle_integer_weight_refused(tiny_bundle, tmp_path):
  import shutil
  path = tmp_path / "b"
  shutil.copytree(tiny_bundle, path)
  sf = SafetensorsFile(path / "model.safetensors")
  tensors = {k: np.array(sf.get(k)) for k in sf.keys()}
  del sf
  key = next(k for k in tensors if k.endswith("kernel"))
  tensors[key] = tensors[key].astype(np.int16)
  write_safetensors(path / "model.safetensors",
                    [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()])
  with pytest.raises(CheckpointError, match=f"{key} is stored as int16"):
    bundle_lib.load_bundle(path)
