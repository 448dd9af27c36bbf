"""Every config file in configs/ loads, builds a valid model config, and sweeps expand;
presets and dtype names are parsed strictly."""
import glob
import importlib.util
import os

import jax
import pytest

from emo_jax.train import task as task_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
# base.py is the shared tree the experiment files override, not an experiment itself.
CONFIG_FILES = [f for f in CONFIG_FILES
                if os.path.basename(f) not in ("__init__.py", "base.py")]

ARGS = {"default.py": [None, "video", "test", "video,test"],
        "emo_llama_7b.py": [None, "fsdp_tp", "dp,video"],
        "sweep.py": [None],
        "posttrain.py": [None, "test", "7b", "7b,fsdp_tp,video"],
        "au_bp4d.py": ["bp4d", "disfa"]}


def _load(path):
  spec = importlib.util.spec_from_file_location(f"cfg_{os.path.basename(path)[:-3]}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_every_config_file_is_covered():
  assert {os.path.basename(f) for f in CONFIG_FILES} == set(ARGS)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in ARGS.items() for a in args])
def test_config_loads_and_model_config_is_valid(name, arg):
  cfg = _load(os.path.join(ROOT, "configs", name)).get_config(arg)
  mc = task_lib.model_config(cfg)            # EmoLlamaConfig validation
  pc = task_lib.pipeline_config(cfg, mc)     # PipelineConfig validation
  assert pc.tokens_per_frame == mc.tokens_per_frame
  assert cfg.optimizer.lr > 0 and cfg.train.accum_steps >= 1
  for g in cfg.optimizer.groups:
    assert len(g) == 3 and g[2] > 0
  assert set(cfg.eval.modes) <= {"generate", "likelihood"}
  assert set(cfg.export.formats) <= {"hf", "peft", "bundle"}
  assert cfg.sharding.rules in ("dp", "fsdp", "fsdp_tp")
  assert len(cfg.mesh.shape) == 3


def test_bad_preset_is_an_error():
  with pytest.raises(ValueError, match="preset"):
    _load(os.path.join(ROOT, "configs", "default.py")).get_config("nope")


def test_preset_errors_name_the_valid_presets():
  seven_b = _load(os.path.join(ROOT, "configs", "emo_llama_7b.py"))
  with pytest.raises(ValueError, match="valid presets.*fsdp, fsdp_tp, dp, video"):
    seven_b.get_config("fsdp,vidoe")
  with pytest.raises(ValueError, match="exclude each other"):
    seven_b.get_config("dp,fsdp_tp")
  assert seven_b.get_config("video,dp").sharding.rules == "dp"
  assert seven_b.get_config("video,dp").mesh.shape == (-1, 1, 1)
  assert seven_b.get_config(None).sharding.rules == "fsdp"


def test_parse_presets():
  from configs import base
  p = base.parse_presets(" test , video", config="x.py", flags=("video", "test"))
  assert "video" in p and "test" in p and p.choice is None
  assert base.parse_presets("", config="x.py", flags=("a",), one_of=("b", "c")) == \
      base.Presets(flags=frozenset(), choice="b")
  with pytest.raises(ValueError, match=r"x.py: unknown preset\(s\) 'z'; valid presets .*: b, c, a"):
    base.parse_presets("a,z", config="x.py", flags=("a",), one_of=("b", "c"))


def test_experiment_configs_override_the_base_tree():
  """Every base field exists, with the base's type, in every experiment config."""
  from configs import base

  def leaves(d, pre=""):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from leaves(v, pre + k + ".")
      else:
        yield pre + k, v

  want = dict(leaves(base.get_base_config().to_dict()))
  for name, args in ARGS.items():
    got = dict(leaves(_load(os.path.join(ROOT, "configs", name)).get_config(args[0]).to_dict()))
    for k, v in want.items():
      assert k in got, (name, k)
      assert type(got[k]) is type(v), (name, k, got[k], v)


def test_dtype_names():
  import jax.numpy as jnp
  from emo_jax import dtypes
  assert dtypes.to_dtype("bfloat16") == jnp.bfloat16
  assert dtypes.to_dtype(jnp.float16) == jnp.dtype("float16")
  assert dtypes.compute_dtype("") is None and dtypes.compute_dtype("float32") is None
  assert dtypes.compute_dtype("bfloat16") == jnp.bfloat16
  with pytest.raises(ValueError, match="unknown dtype name 'bf16'; valid names: float32, "
                                       "bfloat16, float16"):
    dtypes.to_dtype("bf16")
  cfg = _load(os.path.join(ROOT, "configs", "default.py")).get_config("test")
  cfg.model.llm.dtype = "fp32"
  with pytest.raises(ValueError, match="unknown dtype name 'fp32'"):
    task_lib.model_config(cfg)


def test_paper_config_facts():
  cfg = _load(os.path.join(ROOT, "configs", "emo_llama_7b.py")).get_config(None)
  mc = task_lib.model_config(cfg)
  assert (mc.llm.hidden_size, mc.llm.num_hidden_layers, mc.llm.vocab_size) == (4096, 32, 32000)
  assert (mc.vision.kind, mc.vision.hidden_size, mc.vision.feature_layer) == ("eva", 1408, 39)
  assert mc.qformer.num_query_tokens == 32 and "vision" not in mc.trainable
  assert "lora" in mc.trainable and mc.lora_rank > 0
  assert cfg.data.pipeline.global_batch_size == 128 and cfg.data.pipeline.max_length == 2048
  assert cfg.optimizer.warmup_frac == 0.03
  lrs = {g[0]: g[2] for g in cfg.optimizer.groups}
  assert lrs["lora"] == 2e-4 and cfg.optimizer.lr == 2e-5
  # The LoRA group regex selects exactly the LoRA params of an (abstract) tiny stand-in.
  from emo_jax.train import optimizer as opt_lib
  import re
  rx = re.compile(cfg.optimizer.groups[0][1])
  assert rx.search("language_model/model/layers/0/self_attn/q_proj/lora_a")
  assert not rx.search("language_model/model/layers/0/self_attn/q_proj/kernel")
  assert not rx.search("mm_projector/linear_1/kernel")
  del opt_lib


def test_sweep_expands():
  from launch import sweep as sweep_lib
  points = sweep_lib.expand(os.path.join(ROOT, "configs", "sweep.py"))
  assert len(points) == 6
  base = _load(os.path.join(ROOT, "configs", "sweep.py")).get_config(None)
  for p in points:
    for k in p:   # every swept key exists in the base config
      node = base
      for part in k.split("."):
        node = node[part]


@pytest.mark.parametrize("name,arg", [("default.py", None), ("default.py", "test"),
                                      ("au_bp4d.py", "bp4d"), ("au_bp4d.py", "disfa")])
def test_au_section_is_valid(name, arg):
  from emo_jax.train import au_train
  from input_pipeline import au as au_lib
  from input_pipeline import datasets
  cfg = _load(os.path.join(ROOT, "configs", name)).get_config(arg)
  assert au_train.enabled(cfg)
  assert cfg.au.data.name in datasets.READERS
  n = len(au_lib.dataset_aus(cfg.au.data.name))
  assert au_train.head_config(cfg, n).num_aus == n
  assert au_train.loss_config(cfg).margin == 0.05
  assert set(int(f) for f in cfg.au.folds) <= {1, 2, 3}
  if name == "au_bp4d.py":
    assert n == (12 if arg == "bp4d" else 8) and not cfg.au.synthetic.generate
