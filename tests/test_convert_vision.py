"""Checkpoint import on disk: HF CLIPVisionModel / CLIPModel directories, an HF InstructBLIP
directory, and LAVIS eva_vit_g weights (safetensors and pickled .pth) -> same numbers as the
reference modules with the same weights (fp32, max abs diff <= 1e-4)."""
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from emo_jax.convert import hf
from emo_jax.convert.eva import load_eva_vit
from emo_jax.convert.safetensors_io import CheckpointError

from vision_testutil import TorchEva, max_diff  # TorchEva: the LAVIS-structured torch reference

TOL = 1e-4


def _nchw(x):
  return torch.from_numpy(x).permute(0, 3, 1, 2)


def _tiny_clip_vision_config():
  return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, patch_size=4, image_size=16)


def test_load_clip_vision_from_clip_vision_model_dir(tmp_path):
  torch.manual_seed(0)
  tm = transformers.CLIPVisionModel(_tiny_clip_vision_config()).eval()
  tm.save_pretrained(tmp_path, safe_serialization=True)
  m = hf.load_clip_vision(str(tmp_path))
  x = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
  with torch.no_grad():
    want = tm(_nchw(x)).last_hidden_state
  got = m(jnp.asarray(x))
  assert got.shape == (2, 17, 32)
  assert max_diff(got, want) <= TOL


def test_load_clip_vision_from_full_clip_model_dir_skips_text_tower(tmp_path):
  cfg = transformers.CLIPConfig(
      vision_config=_tiny_clip_vision_config().to_dict(),
      text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=40, max_position_embeddings=8),
      projection_dim=8)
  torch.manual_seed(1)
  tm = transformers.CLIPModel(cfg).eval()
  tm.save_pretrained(tmp_path, safe_serialization=True)
  m = hf.load_clip_vision(str(tmp_path), feature_layer=-2)
  x = np.random.RandomState(1).randn(1, 16, 16, 3).astype(np.float32)
  with torch.no_grad():
    want = tm.vision_model(_nchw(x), output_hidden_states=True).hidden_states[-2]
  assert max_diff(m(jnp.asarray(x)), want) <= TOL


def test_load_clip_vision_rejects_non_clip_and_missing_weights(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "bert"}')
  with pytest.raises(CheckpointError, match="not a CLIP"):
    hf.load_clip_vision(str(tmp_path))
  (tmp_path / "config.json").write_text(_tiny_clip_vision_config().to_json_string())
  safetensors.numpy.save_file({"embeddings.class_embedding": np.zeros(32, np.float32)},
                              str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match="missing"):
    hf.load_clip_vision(str(tmp_path))


def _tiny_instructblip(tmp_path):
  cfg = transformers.InstructBlipConfig(
      vision_config=dict(hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, patch_size=4, image_size=8),
      qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=16, vocab_size=50,
                          encoder_hidden_size=24),
      text_config=dict(model_type="llama", hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                       vocab_size=64),
      num_query_tokens=4)
  torch.manual_seed(2)
  tm = transformers.InstructBlipForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    tm.query_tokens.normal_()
    for name, p in tm.qformer.named_parameters():
      if "LayerNorm" in name or "layernorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  tm.save_pretrained(tmp_path, safe_serialization=True)
  return tm


def test_load_instructblip_qformer_matches_hf(tmp_path):
  tm = _tiny_instructblip(tmp_path)
  m = hf.load_instructblip_qformer(str(tmp_path))
  rng = np.random.RandomState(3)
  b, t = 2, 5
  ids = rng.randint(1, 50, size=(b, t)).astype(np.int64)
  text_mask = np.array([[1] * t, [1, 1, 0, 0, 0]], np.int64)
  enc = rng.randn(b, 5, 24).astype(np.float32)
  q = tm.query_tokens.detach().expand(b, -1, -1)
  full_mask = torch.cat([torch.ones(b, 4, dtype=torch.long), torch.from_numpy(text_mask)], 1)
  with torch.no_grad():
    want = tm.qformer(input_ids=torch.from_numpy(ids), attention_mask=full_mask, query_embeds=q,
                      encoder_hidden_states=torch.from_numpy(enc)).last_hidden_state[:, :4]
  got = m(None, jnp.asarray(ids), jnp.asarray(full_mask.numpy()), jnp.asarray(enc))
  assert got.shape == (b, 4, 32)
  assert max_diff(got, want) <= TOL
  got_explicit = m(jnp.asarray(q.numpy()), jnp.asarray(ids), jnp.asarray(text_mask),
                   jnp.asarray(enc))
  assert max_diff(got_explicit, want) <= TOL


def _eva_state(seed=4):
  torch.manual_seed(seed)
  ref = TorchEva().eval()
  return ref, {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


def test_load_eva_from_safetensors_and_from_pth_behind_allow_pickle(tmp_path):
  ref, sd = _eva_state()
  st = tmp_path / "eva_vit_g.safetensors"
  safetensors.numpy.save_file(sd, str(st))
  pth = tmp_path / "eva_vit_g.pth"
  torch.save(ref.state_dict(), pth)
  x = np.random.RandomState(5).randn(2, 16, 16, 3).astype(np.float32)
  with torch.no_grad():
    outs = ref(_nchw(x))
  m = load_eva_vit(str(st), num_attention_heads=4)  # default: all blocks but the last (LAVIS)
  assert max_diff(m(jnp.asarray(x)), outs[-2]) <= TOL
  with pytest.raises(CheckpointError, match="allow_pickle"):
    load_eva_vit(str(pth), num_attention_heads=4)
  m_pth = load_eva_vit(str(pth), allow_pickle=True, num_attention_heads=4, feature_layer=-1)
  assert max_diff(m_pth(jnp.asarray(x)), outs[-1]) <= TOL


def test_load_eva_resizes_position_table_like_lavis(tmp_path):
  ref, sd = _eva_state(seed=6)
  st = tmp_path / "eva.safetensors"
  safetensors.numpy.save_file(sd, str(st))
  m = load_eva_vit(str(st), num_attention_heads=4, image_size=24)  # grid 4 -> 6
  assert m.embeddings.position_embedding.embedding.shape == (1 + 36, 32)
  # LAVIS interpolate_pos_embed: bicubic (align_corners=False) of the grid part, CLS kept.
  with torch.no_grad():
    grid = ref.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    ref.pos_embed = torch.nn.Parameter(
        torch.cat([ref.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 36, 32)], 1))
  x = np.random.RandomState(7).randn(1, 24, 24, 3).astype(np.float32)
  with torch.no_grad():
    want = ref(_nchw(x))[-2]
  assert max_diff(m(jnp.asarray(x)), want) <= TOL


def test_load_eva_rejects_unknown_tensors_and_bf16_loads(tmp_path):
  _, sd = _eva_state(seed=8)
  bad = dict(sd)
  bad["blocks.0.gamma_1"] = np.ones(32, np.float32)
  safetensors.numpy.save_file(bad, str(tmp_path / "bad.safetensors"))
  with pytest.raises(CheckpointError, match="gamma_1"):
    load_eva_vit(str(tmp_path / "bad.safetensors"), num_attention_heads=4)
  safetensors.numpy.save_file(sd, str(tmp_path / "ok.safetensors"))
  m = load_eva_vit(str(tmp_path / "ok.safetensors"), jnp.bfloat16, num_attention_heads=4,
                   scan_layers=True)
  assert m.encoder.layers.mlp.fc1.kernel.dtype == jnp.bfloat16
  assert m.encoder.layers.mlp.fc1.kernel.shape == (2, 32, 80)
  y = m(jnp.zeros((1, 16, 16, 3), jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_load_qformer_into_model_with_bigger_vocab_and_eva_load_into(tmp_path):
  """The in-place loaders the training task uses: an InstructBLIP Q-Former into a host with
  LLaMA-VID's extra vocabulary row, and EVA weights into an existing VisionTransformer."""
  from flax import nnx
  from emo_jax.convert import eva, vision_hf
  from emo_jax.models.qformer import QFormerConfig, QFormerModel
  from emo_jax.models.vit import VisionConfig, VisionTransformer

  tm = _tiny_instructblip(tmp_path / "iblip")
  qcfg = QFormerConfig.from_hf_dict(tm.config.to_dict(), vocab_size=51)

  class Host(nnx.Module):
    def __init__(self):
      self.vlm_att_encoder = QFormerModel(qcfg, rngs=nnx.Rngs(1))
      self.vlm_att_query = nnx.Param(jnp.zeros((1, 4, 32)))

  host = Host()
  extra_row = np.asarray(host.vlm_att_encoder.embeddings.word_embeddings.embedding[...][50])
  vision_hf.load_qformer_into(host, str(tmp_path / "iblip"))
  np.testing.assert_array_equal(
      np.asarray(host.vlm_att_encoder.embeddings.word_embeddings.embedding[...][50]), extra_row)
  rng = np.random.RandomState(10)
  ids = rng.randint(1, 50, size=(1, 3)).astype(np.int64)
  enc = rng.randn(1, 5, 24).astype(np.float32)
  q = tm.query_tokens.detach()
  with torch.no_grad():
    want = tm.qformer(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(1, 7).long(),
                      query_embeds=q, encoder_hidden_states=torch.from_numpy(enc)
                      ).last_hidden_state[:, :4]
  got = host.vlm_att_encoder(host.vlm_att_query[...], jnp.asarray(ids), None, jnp.asarray(enc))
  assert max_diff(got, want) <= TOL

  ref, sd = _eva_state(seed=11)
  safetensors.numpy.save_file(sd, str(tmp_path / "eva.safetensors"))
  vit = VisionTransformer(VisionConfig(kind="eva", hidden_size=32, intermediate_size=80,
                                       num_hidden_layers=3, num_attention_heads=4, patch_size=4,
                                       image_size=16, layer_norm_eps=1e-6, hidden_act="gelu",
                                       feature_layer=2), rngs=nnx.Rngs(0))
  eva.load_into(vit, str(tmp_path / "eva.safetensors"))
  x = np.random.RandomState(12).randn(1, 16, 16, 3).astype(np.float32)
  with torch.no_grad():
    want = ref(_nchw(x))[1]
  assert max_diff(vit(jnp.asarray(x)), want) <= TOL
