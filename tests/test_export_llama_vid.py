"""Export in LLaMA-VID's layout: save_llama_vid -> load_llama_vid gives the same numbers (LoRA
merged), and the written tensors load, under their upstream names, into the torch modules
LLaMA-VID builds: transformers' LlamaForCausalLM (the LLM keys), InstructBlipQFormerModel
(the `vlm_att_encoder.bert.*` keys, LAVIS names) and the LAVIS EVA forward (the
`vision_tower.vision_tower.*` keys)."""
import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (InstructBlipQFormerConfig, InstructBlipQFormerModel, LlamaConfig,
                          LlamaForCausalLM)

from emo_jax.convert import hf
from emo_jax.convert.safetensors_io import CheckpointError, CheckpointReader
from emo_jax.models import lora
from emo_jax.models.emo_llama import EmoLlama, EmoLlamaConfig, dummy_batch
import llamavid_testutil as lv

ENC = 20  # the Q-Former's cross-attention width != the ViT's 24: vlm_att_bert_proj


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  base = EmoLlamaConfig.tiny(trainable=("qformer", "projectors", "face", "lora"))
  cfg = base.replace(qformer=dataclasses.replace(base.qformer, encoder_hidden_size=ENC),
                     face=dataclasses.replace(base.face, query_mode="qformer"))
  model = EmoLlama(cfg, rngs=nnx.Rngs(0))
  # Non-zero LoRA factors, so merging changes the LLM weights.
  rng = np.random.default_rng(0)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    var.set_value(jax.numpy.asarray(0.1 * rng.normal(size=var.get_value().shape), np.float32))
  out = tmp_path_factory.mktemp("export") / "llama-vid-emo"
  files = hf.save_llama_vid(model, out, max_shard_bytes=64 * 1024)
  merged = lora.merge_lora(nnx.clone(model))
  return dict(model=model, merged=merged, out=out, files=files)


def test_layout_config_and_key_names(exported):
  out = exported["out"]
  assert len(exported["files"]) > 1 and (out / "model.safetensors.index.json").exists()
  reader = CheckpointReader(out)
  keys = set(reader.keys())
  for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
            "model.vlm_att_query", "model.vlm_att_ln.weight", "model.vlm_att_bert_proj.weight",
            "model.vlm_att_projector.bias", "model.vlm_att_key_projector.weight",
            "model.vlm_att_val_projector.weight", "model.mm_projector.0.weight",
            "model.mm_projector.2.bias",
            "model.vlm_att_encoder.bert.embeddings.LayerNorm.weight",
            "model.vlm_att_encoder.bert.encoder.layer.0.crossattention.self.key.weight",
            "model.vlm_att_encoder.bert.encoder.layer.1.intermediate_query.dense.weight",
            "model.vision_tower.vision_tower.cls_token", "model.vision_tower.vision_tower.pos_embed",
            "model.vision_tower.vision_tower.blocks.1.attn.qkv.weight",
            "model.vision_tower.vision_tower.blocks.0.attn.v_bias"):
    assert k in keys, k
  assert not any("lora" in k for k in keys)
  assert reader.shape("model.vlm_att_bert_proj.weight") == (ENC, lv.CV)  # torch [out, in]
  assert reader.shape("model.vlm_att_encoder.bert.encoder.layer.0.crossattention.self.key.weight"
                      ) == (16, ENC)
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["model_type"] == "llava" and cfg["architectures"] == ["LlavaLlamaAttForCausalLM"]
  assert (cfg["mm_hidden_size"], cfg["num_query"], cfg["compress_type"], cfg["bert_type"],
          cfg["mm_projector_type"], cfg["mm_vision_select_feature"]) == (
              lv.CV, 4, "grid:2", "qformer_pretrain", "mlp2x_gelu", "patch")
  assert cfg["mm_use_im_patch_token"] is False and cfg["mm_use_im_start_end"] is False
  assert "eva" in cfg["mm_vision_tower"].lower()  # how LLaMA-VID picks its EVA tower


def test_tensors_load_into_the_upstream_torch_modules(exported):
  """The names and layouts are the ones the torch modules expect (strict loads)."""
  model, merged, out = exported["model"], exported["merged"], exported["out"]
  reader = CheckpointReader(out)
  sd = {k: torch.tensor(np.asarray(reader.get(k))) for k in reader.keys()}
  cfg = model.config
  # LLM: transformers' LlamaForCausalLM, strict, == our merged LLM's logits.
  c = cfg.llm
  llm = LlamaForCausalLM(LlamaConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
      num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
      rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
      tie_word_embeddings=c.tie_word_embeddings)).eval()
  llm.load_state_dict({k: v for k, v in sd.items() if k.startswith(("model.layers", "model.norm",
                                                                    "model.embed", "lm_head"))})
  ids = np.random.default_rng(1).integers(3, c.vocab_size, size=(1, 9))
  with torch.no_grad():
    ref = llm(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(merged.language_model(jax.numpy.asarray(ids)))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
  # Q-Former: LAVIS names -> HF InstructBlipQFormerModel, strict.
  q = cfg.qformer
  qformer = InstructBlipQFormerModel(InstructBlipQFormerConfig(
      vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
      num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
      max_position_embeddings=q.max_position_embeddings, encoder_hidden_size=ENC)).eval()
  prefix = "model.vlm_att_encoder.bert."
  hf_names = {lv._lavis_qformer_key(k): k for k in qformer.state_dict()}
  missing = qformer.load_state_dict(
      {hf_names[k[len(prefix):]]: v for k, v in sd.items() if k.startswith(prefix)},
      strict=False).missing_keys
  assert all("position_ids" in k for k in missing), missing  # a buffer, not a weight
  # EVA: the LAVIS forward on the exported tensors == our vision tower.
  vprefix = "model.vision_tower.vision_tower."
  eva = {k[len(vprefix):]: v for k, v in sd.items() if k.startswith(vprefix)}
  x = np.random.default_rng(2).normal(size=(2, lv.IMG, lv.IMG, 3)).astype(np.float32)
  with torch.no_grad():
    ref = lv._torch_eva(eva, torch.tensor(x).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(np.asarray(model.vision_tower(x)), ref, atol=1e-4, rtol=1e-4)
  # A full frame through torch: vlm_att_bert_proj -> vlm_att_ln -> Q-Former -> tokens.
  mods = {"vlm_att_ln": torch.nn.LayerNorm(ENC), "vlm_att_bert_proj": torch.nn.Linear(lv.CV, ENC),
          "vlm_att_projector": torch.nn.Linear(q.hidden_size, lv.CV),
          "vlm_att_key_projector": torch.nn.Linear(lv.CV, lv.CV),
          "vlm_att_val_projector": torch.nn.Linear(lv.CV, c.hidden_size),
          "mm_projector": torch.nn.Sequential(torch.nn.Linear(lv.CV, c.hidden_size),
                                              torch.nn.GELU(),
                                              torch.nn.Linear(c.hidden_size, c.hidden_size))}
  for name, m in mods.items():
    m.load_state_dict({k[len(f"model.{name}."):]: v for k, v in sd.items()
                       if k.startswith(f"model.{name}.")})
  ck = dict(eva=eva, qformer=qformer, mods=mods, query=sd["model.vlm_att_query"])
  batch = dummy_batch(cfg, [1], num_frames=1, pixels="float32")
  tpf, n_lv = cfg.tokens_per_frame, 1 + cfg.num_content_tokens  # LLaMA-VID's [ctx, content]
  visual = np.asarray(merged.encode_frames(batch))[0].reshape(1, tpf, -1)[:, :n_lv]
  with torch.no_grad():
    ref = lv._torch_frame_tokens(ck, batch["frames"][0], batch["qformer_ids"][0],
                                 batch["qformer_mask"][0]).numpy()
  np.testing.assert_allclose(visual, ref, atol=1e-4, rtol=1e-4)


def test_round_trip_is_bit_identical(exported):
  merged, out = exported["merged"], exported["out"]
  loaded = hf.load_llama_vid(str(out))
  assert loaded.config.use_face and loaded.config.face == merged.config.face
  assert loaded.config.lora_rank == 0 and loaded.vlm_att_bert_proj is not None
  want = {p: v for p, v in nnx.to_flat_state(nnx.state(merged, nnx.Param))}
  got = {p: v for p, v in nnx.to_flat_state(nnx.state(loaded, nnx.Param))}
  assert set(got) == set(want)
  for p, v in want.items():
    np.testing.assert_array_equal(np.asarray(got[p].get_value()), np.asarray(v.get_value()),
                                  err_msg=str(p))
  batch = dummy_batch(merged.config, [2, 1], num_frames=2)
  run = nnx.jit(lambda m, b: m(b))
  np.testing.assert_array_equal(np.asarray(run(loaded, batch)), np.asarray(run(merged, batch)))
  # The LoRA model itself gives the same logits up to the merge's rounding.
  np.testing.assert_allclose(np.asarray(run(exported["model"], batch)),
                             np.asarray(run(merged, batch)), atol=1e-4, rtol=1e-4)


def test_unexportable_models_are_refused(tmp_path):
  cfg = EmoLlamaConfig.tiny(use_face=False, lora_rank=0, trainable=("qformer",))
  with pytest.raises(CheckpointError, match="grid:1"):
    hf.save_llama_vid(EmoLlama(cfg.replace(compress_type="grid:1"), rngs=nnx.Rngs(0)),
                      tmp_path / "a")
  clip = cfg.replace(vision=dataclasses.replace(cfg.vision, kind="clip", hidden_act="quick_gelu"))
  with pytest.raises(CheckpointError, match="vision.kind 'clip'"):
    hf.save_llama_vid(EmoLlama(clip, rngs=nnx.Rngs(0)), tmp_path / "b")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
