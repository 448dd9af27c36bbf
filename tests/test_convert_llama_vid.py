"""LLaMA-VID import: a tiny checkpoint with the real key names (sharded safetensors + index,
and pickled .bin shards behind allow_pickle), forward parity with a torch composition of
transformers' InstructBlipQFormerModel / LlamaForCausalLM, a torch EVA re-implementation and
LLaMA-VID's token_generation re-computed here."""
import json
import math

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from safetensors.numpy import save_file
from transformers import (InstructBlipQFormerConfig, InstructBlipQFormerModel, LlamaConfig,
                          LlamaForCausalLM)

from emo_jax.convert.llama_vid import load_llama_vid
from emo_jax.convert.safetensors_io import CheckpointError
from llamavid_testutil import (CV, DEPTH, GRID, HEADS_V, IMG, MLP_V, NQ, PATCH,  # noqa: F401
                              _lavis_qformer_key, _torch_eva, _torch_frame_tokens)

IMAGE = -200


def _eva_state_dict(g: torch.Generator) -> dict[str, torch.Tensor]:
  r = lambda *s: 0.2 * torch.randn(*s, generator=g)  # noqa: E731
  n = (IMG // PATCH) ** 2 + 1
  sd = {"cls_token": r(1, 1, CV), "pos_embed": r(1, n, CV),
        "patch_embed.proj.weight": r(CV, 3, PATCH, PATCH), "patch_embed.proj.bias": r(CV)}
  for i in range(DEPTH):
    b = f"blocks.{i}."
    sd.update({b + "norm1.weight": 1 + r(CV), b + "norm1.bias": r(CV),
               b + "attn.qkv.weight": r(3 * CV, CV), b + "attn.q_bias": r(CV),
               b + "attn.v_bias": r(CV), b + "attn.proj.weight": r(CV, CV),
               b + "attn.proj.bias": r(CV), b + "norm2.weight": 1 + r(CV), b + "norm2.bias": r(CV),
               b + "mlp.fc1.weight": r(MLP_V, CV), b + "mlp.fc1.bias": r(MLP_V),
               b + "mlp.fc2.weight": r(CV, MLP_V), b + "mlp.fc2.bias": r(CV)})
  return sd


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """Reference torch modules + a LLaMA-VID directory in two formats."""
  torch.manual_seed(0)
  g = torch.Generator().manual_seed(0)
  qcfg = InstructBlipQFormerConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=32,
                                   max_position_embeddings=32, encoder_hidden_size=CV)
  qformer = InstructBlipQFormerModel(qcfg).eval()
  lcfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     rope_theta=10000.0)
  llm = LlamaForCausalLM(lcfg).eval()
  d = lcfg.hidden_size
  mods = {"vlm_att_ln": torch.nn.LayerNorm(CV), "vlm_att_projector": torch.nn.Linear(16, CV),
          "vlm_att_key_projector": torch.nn.Linear(CV, CV),
          "vlm_att_val_projector": torch.nn.Linear(CV, d),
          "mm_projector": torch.nn.Sequential(torch.nn.Linear(CV, d), torch.nn.GELU(),
                                              torch.nn.Linear(d, d))}
  with torch.no_grad():
    mods["vlm_att_ln"].weight.add_(0.3 * torch.randn(CV, generator=g))
    mods["vlm_att_ln"].bias.add_(0.3 * torch.randn(CV, generator=g))
  query = 0.5 * torch.randn(1, NQ, 16, generator=g)
  eva = _eva_state_dict(g)

  sd = {k: v for k, v in llm.state_dict().items()}
  for k, v in qformer.state_dict().items():
    sd["model.vlm_att_encoder.bert." + _lavis_qformer_key(k)] = v
  sd["model.vlm_att_encoder.bert.embeddings.position_ids"] = torch.arange(32)[None]
  sd["model.vlm_att_query"] = query
  for name, m in mods.items():
    for k, v in m.state_dict().items():
      sd[f"model.{name}.{k}"] = v
  for k, v in eva.items():
    sd["model.vision_tower.vision_tower." + k] = v
  sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}

  hf = lcfg.to_dict()
  hf.pop("rope_parameters", None)
  hf.update(model_type="llava", architectures=["LlavaLlamaAttForCausalLM"], rope_theta=10000.0,
            rope_scaling=None, mm_hidden_size=CV, mm_projector_type="mlp2x_gelu",
            mm_vision_tower="./model_zoo/LAVIS/eva_vit_g.pth", bert_type="qformer_pretrain",
            num_query=NQ, compress_type=f"grid:{GRID}", image_aspect_ratio="pad")
  keys = sorted(sd)
  shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
  root = tmp_path_factory.mktemp("llama_vid")
  safe, binary = root / "safe", root / "bin"
  for dir_, stem, ext in ((safe, "model", "safetensors"), (binary, "pytorch_model", "bin")):
    dir_.mkdir()
    (dir_ / "config.json").write_text(json.dumps(hf))
    weight_map = {}
    for i, names in enumerate(shards):
      fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
      part = {k: sd[k] for k in names}
      if ext == "safetensors":
        save_file({k: v.numpy() for k, v in part.items()}, str(dir_ / fname))
      else:
        torch.save(part, dir_ / fname)
      weight_map.update({k: fname for k in names})
    index = f"{stem}.{ext}.index.json" if ext == "bin" else "model.safetensors.index.json"
    (dir_ / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  return dict(safe=safe, binary=binary, qformer=qformer, llm=llm, mods=mods, query=query,
              eva=eva, hf=hf, sd=sd)


def _batch(tpf, rng):
  b, f = 2, 2
  frames = rng.normal(size=(b, f, IMG, IMG, 3)).astype(np.float32)
  frame_mask = np.array([[True, True], [True, False]])  # a 2-frame clip and an image
  frames[~frame_mask] = 0
  prefix, suffix = 3, 4
  t = prefix + f * tpf + suffix
  ids = rng.integers(3, 64, size=(b, t)).astype(np.int32)
  ids[:, prefix:prefix + f * tpf] = IMAGE
  mask = np.ones((b, t), np.int32)
  mask[1, prefix + tpf:prefix + 2 * tpf] = 0
  qids = rng.integers(1, 50, size=(b, 5)).astype(np.int32)
  qmask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)
  return dict(frames=frames, frame_mask=frame_mask, qformer_ids=qids, qformer_mask=qmask,
              input_ids=ids, attention_mask=mask, loss_mask=np.zeros_like(mask)), prefix


@pytest.fixture(scope="module")
def loaded(ckpt):
  return load_llama_vid(str(ckpt["safe"]), qformer_num_heads=2, vision_num_heads=HEADS_V)


def test_import_matches_torch_composition(ckpt, loaded):
  model = loaded
  cfg = model.config
  assert cfg.compress_type == "grid:2" and not cfg.use_face
  assert cfg.tokens_per_frame == 1 + GRID * GRID
  assert cfg.vision.num_used_layers == DEPTH  # the in-checkpoint copy: every block it holds
  batch, prefix = _batch(cfg.tokens_per_frame, np.random.default_rng(0))
  run = nnx.jit(lambda m, b: (m(b), m.encode_frames(b)))
  logits, visual = map(np.asarray, run(model, batch))
  tpf = cfg.tokens_per_frame
  with torch.no_grad():
    for i in range(2):
      nf = int(batch["frame_mask"][i].sum())
      tok = _torch_frame_tokens(ckpt, batch["frames"][i, :nf], batch["qformer_ids"][i],
                                batch["qformer_mask"][i])  # [nf, tpf, D]
      np.testing.assert_allclose(visual[i, :nf * tpf], tok.reshape(nf * tpf, -1).numpy(),
                                 atol=1e-4, rtol=1e-4)
      ids = torch.tensor(batch["input_ids"][i]).long()
      emb = ckpt["llm"].model.embed_tokens
      suffix_start = prefix + batch["frame_mask"].shape[1] * tpf
      embeds = torch.cat([emb(ids[:prefix]), tok.reshape(nf * tpf, -1),
                          emb(ids[suffix_start:])])[None]
      ref = ckpt["llm"](inputs_embeds=embeds).logits[0].numpy()
      keep = batch["attention_mask"][i] == 1  # padding-frame slots are absent in LLaMA-VID
      np.testing.assert_allclose(logits[i][keep], ref, atol=1e-4, rtol=1e-4)


def test_bin_shards_need_allow_pickle_and_load_the_same(ckpt, loaded):
  with pytest.raises(CheckpointError, match="allow_pickle"):
    load_llama_vid(str(ckpt["binary"]), qformer_num_heads=2, vision_num_heads=HEADS_V)
  m = load_llama_vid(str(ckpt["binary"]), allow_pickle=True, qformer_num_heads=2,
                     vision_num_heads=HEADS_V)
  a = nnx.to_flat_state(nnx.state(loaded, nnx.Param))
  b = dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
  assert len(a) == len(b)
  for path, v in a:
    np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(b[path][...]), err_msg=str(path))
  # Spot-check the mapping of the projectors (torch Linear weight = our kernel transposed).
  np.testing.assert_array_equal(np.asarray(m.mm_projector.linear_2.kernel[...]),
                                ckpt["sd"]["model.mm_projector.2.weight"].numpy().T)
  np.testing.assert_array_equal(np.asarray(m.vlm_att_query[...]), ckpt["query"].numpy())


def test_face_modules_and_lora_are_fresh_and_bad_checkpoints_fail(ckpt, tmp_path):
  m = load_llama_vid(str(ckpt["safe"]), qformer_num_heads=2, vision_num_heads=HEADS_V,
                     use_face=True, lora_rank=2, compress_type="mean",
                     trainable=("qformer", "projectors", "face", "lora"),
                     face=__import__("emo_jax.models.face", fromlist=["x"]).FaceMiningConfig(
                         face_dim=16, hidden_dim=16, num_heads=2, num_tokens=2))
  assert m.config.use_face and m.face_prior is not None and m.config.lora_rank == 2
  assert m.config.compress_type == "mean" and m.config.tokens_per_frame == 1 + 1 + 2
  lb = [v for p, v in nnx.to_flat_state(nnx.state(m, nnx.LoRAParam)) if p[-1] == "lora_b"]
  assert lb and all(not np.asarray(v[...]).any() for v in lb)  # LoRA starts at the base model
  # Unknown tensors, a missing vision tower and unsupported variants are clear errors.
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps(ckpt["hf"]))
  sd = {k: v.numpy() for k, v in ckpt["sd"].items()}
  save_file({**sd, "model.vlm_att_extra.weight": np.zeros((2, 2), np.float32)},
            str(bad / "model.safetensors"))
  with pytest.raises(CheckpointError, match="not understood"):
    load_llama_vid(str(bad), qformer_num_heads=2, vision_num_heads=HEADS_V)
  # A vlm_att_bert_proj although the widths agree: not a model LLaMA-VID builds.
  save_file({**sd, "model.vlm_att_bert_proj.weight": np.zeros((CV, CV), np.float32),
             "model.vlm_att_bert_proj.bias": np.zeros((CV,), np.float32)},
            str(bad / "model.safetensors"))
  with pytest.raises(CheckpointError, match="vlm_att_bert_proj is present"):
    load_llama_vid(str(bad), qformer_num_heads=2, vision_num_heads=HEADS_V)
  save_file({k: v for k, v in sd.items() if "vision_tower" not in k},
            str(bad / "model.safetensors"))
  with pytest.raises(CheckpointError, match="vision_path"):
    load_llama_vid(str(bad), qformer_num_heads=2, vision_num_heads=HEADS_V)
  (bad / "config.json").write_text(json.dumps({**ckpt["hf"], "bert_type": "raw_bert"}))
  with pytest.raises(CheckpointError, match="bert_type"):
    load_llama_vid(str(bad), qformer_num_heads=2, vision_num_heads=HEADS_V)


# ------------------------------------------------------------------ LLaMA-VID variants


def _write_dir(path, sd, hf):
  path.mkdir()
  (path / "config.json").write_text(json.dumps(hf))
  save_file({k: v.detach().numpy() if hasattr(v, "detach") else v for k, v in sd.items()},
            str(path / "model.safetensors"))
  return str(path)


def _visual_parity(model, ck, **ref_kw):
  batch, _ = _batch(model.config.tokens_per_frame, np.random.default_rng(1))
  visual = np.asarray(nnx.jit(lambda m, b: m.encode_frames(b))(model, batch))
  tpf = model.config.tokens_per_frame
  with torch.no_grad():
    for i in range(2):
      nf = int(batch["frame_mask"][i].sum())
      tok = _torch_frame_tokens(ck, batch["frames"][i, :nf], batch["qformer_ids"][i],
                                batch["qformer_mask"][i], **ref_kw)
      np.testing.assert_allclose(visual[i, :nf * tpf], tok.reshape(nf * tpf, -1).numpy(),
                                 atol=1e-4, rtol=1e-4)


def test_bert_proj_variant_matches_upstream(ckpt, tmp_path):
  """A vision width (24) other than the Q-Former's cross-attention width (20): LLaMA-VID's
  vlm_att_bert_proj (24 -> 20) runs before vlm_att_ln (LayerNorm(20))."""
  g = torch.Generator().manual_seed(3)
  enc = 20
  qformer = InstructBlipQFormerModel(InstructBlipQFormerConfig(
      vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=32, encoder_hidden_size=enc)).eval()
  mods = dict(ckpt["mods"], vlm_att_ln=torch.nn.LayerNorm(enc),
              vlm_att_bert_proj=torch.nn.Linear(CV, enc))
  with torch.no_grad():
    mods["vlm_att_ln"].weight.add_(0.3 * torch.randn(enc, generator=g))
  sd = {k: v for k, v in ckpt["sd"].items() if not k.startswith(
      ("model.vlm_att_encoder.", "model.vlm_att_ln."))}
  for k, v in qformer.state_dict().items():
    sd["model.vlm_att_encoder.bert." + _lavis_qformer_key(k)] = v
  for name in ("vlm_att_ln", "vlm_att_bert_proj"):
    for k, v in mods[name].state_dict().items():
      sd[f"model.{name}.{k}"] = v
  path = _write_dir(tmp_path / "proj", sd, ckpt["hf"])
  model = load_llama_vid(path, qformer_num_heads=2, vision_num_heads=HEADS_V)
  assert model.vlm_att_bert_proj is not None and model.config.qformer.encoder_hidden_size == enc
  np.testing.assert_array_equal(np.asarray(model.vlm_att_bert_proj.kernel[...]),
                                mods["vlm_att_bert_proj"].weight.detach().numpy().T)
  _visual_parity(model, dict(ckpt, qformer=qformer, mods=mods))
  # Without the projection the widths cannot meet: named, not a shape error deep inside.
  path = _write_dir(tmp_path / "noproj", {k: v for k, v in sd.items()
                                           if "bert_proj" not in k}, ckpt["hf"])
  with pytest.raises(CheckpointError, match="vlm_att_bert_proj is absent"):
    load_llama_vid(path, qformer_num_heads=2, vision_num_heads=HEADS_V)


@pytest.mark.parametrize("compress", ["mean", None])
def test_cls_patch_variant_matches_upstream(ckpt, tmp_path, compress):
  """mm_vision_select_feature='cls_patch': the CLS token stays in the context attention
  and in the content tokens ('mean' over 257 tokens, or all 1 + P of them)."""
  hf = dict(ckpt["hf"], mm_vision_select_feature="cls_patch", compress_type=compress)
  model = load_llama_vid(_write_dir(tmp_path / "cls", ckpt["sd"], hf), qformer_num_heads=2,
                         vision_num_heads=HEADS_V)
  assert model.config.vision_select_feature == "cls_patch"
  n_patch = (IMG // PATCH) ** 2
  assert model.config.tokens_per_frame == 1 + (1 if compress == "mean" else 1 + n_patch)
  _visual_parity(model, ckpt, select="cls_patch", compress=compress or "none")


def test_grid_pooling_as_avg_pool2d_including_non_dividing_grids():
  """content_tokens == mm_projector(avg_pool2d(kernel=stride=side//g)) on a 7x7 patch grid,
  where no g divides: g=2 (kernel 3, 2x2 out, last row / column dropped), g=3 (kernel 2,
  3x3), g=4 and 5 (kernel 1: 7x7 out, more than g*g, as upstream), g=7."""
  from emo_jax.models.emo_llama import EmoLlama, EmoLlamaConfig
  from emo_jax.models.vit import VisionConfig

  base = EmoLlamaConfig.tiny(use_face=False, lora_rank=0, trainable=("qformer", "projectors"))
  vis = VisionConfig(**{**base.vision.__dict__, "image_size": 28})  # 7x7 patches
  rng = np.random.default_rng(0)
  for g in (2, 3, 4, 5, 7):
    cfg = base.replace(vision=vis, compress_type=f"grid:{g}")
    model = EmoLlama(cfg, rngs=nnx.Rngs(0))
    patches = rng.normal(size=(3, 49, CV)).astype(np.float32)
    ours = np.asarray(model.content_tokens(patches))
    p = model.mm_projector
    proj = lambda x: F.linear(F.gelu(F.linear(x, torch.tensor(np.asarray(p.linear_1.kernel[...]).T),  # noqa: E731
                                              torch.tensor(np.asarray(p.linear_1.bias[...])))),
                              torch.tensor(np.asarray(p.linear_2.kernel[...]).T),
                              torch.tensor(np.asarray(p.linear_2.bias[...])))
    x = torch.tensor(patches).reshape(3, 7, 7, CV).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(x, kernel_size=7 // g, stride=7 // g, padding=0)
    ref = proj(pooled.permute(0, 2, 3, 1).flatten(1, 2)).detach().numpy()
    assert ours.shape == ref.shape == (3, cfg.num_content_tokens, cfg.llm.hidden_size), g
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field,value,match", [
    ("compress_type", "grid:1", "compress_type 'grid:1'.*asserts"),
    ("mm_vision_select_feature", "cls", "mm_vision_select_feature 'cls'"),
    ("mm_vision_tower", "./model_zoo/OpenAI/clip-vit-large-patch14", "mm_vision_tower"),
    ("mm_vision_select_feature", "cls_patch", "cls_patch"),  # with grid:2: upstream fails
])
def test_unsupported_variants_are_refused_naming_the_field(ckpt, tmp_path, field, value, match):
  path = _write_dir(tmp_path / "v", ckpt["sd"], dict(ckpt["hf"], **{field: value}))
  with pytest.raises(CheckpointError, match=match):
    load_llama_vid(path, qformer_num_heads=2, vision_num_heads=HEADS_V)
