"""Q-Former parity vs transformers InstructBlipQFormerModel (fp32, max abs diff <= 1e-4)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

from emo_jax.convert.vision_hf import qformer_config_from_state_dict, qformer_from_state_dict
from emo_jax.models.qformer import InstructBlipQFormer, QFormerConfig, QFormerModel
from vision_testutil import max_diff

TOL = 1e-4
B, Q, T, N, CV = 2, 4, 5, 6, 24


@pytest.fixture(scope="module")
def ref():
  hc = InstructBlipQFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=48, encoder_hidden_size=CV,
                                 max_position_embeddings=16, vocab_size=50,
                                 cross_attention_frequency=2)
  torch.manual_seed(0)
  tm = InstructBlipQFormerModel(hc).eval()
  with torch.no_grad():  # non-trivial LayerNorms so a swapped/missed name shows
    for name, p in tm.named_parameters():
      if "LayerNorm" in name or "layernorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  query_tokens = np.random.RandomState(9).randn(1, Q, 32).astype(np.float32)
  sd["query_tokens"] = query_tokens
  cfg = QFormerConfig.from_hf_dict(hc.to_dict(), num_query_tokens=Q)
  model = qformer_from_state_dict(sd, cfg, prefix="", query_tokens_key="query_tokens")
  rng = np.random.RandomState(1)
  inputs = dict(
      q=rng.randn(B, Q, 32).astype(np.float32),
      ids=rng.randint(1, 50, size=(B, T)).astype(np.int64),
      text_mask=np.array([[1] * T, [1, 1, 1, 0, 0]], np.int64),  # sample 1: right padding
      enc=rng.randn(B, N, CV).astype(np.float32),
      enc_mask=np.array([[1] * N, [1, 1, 1, 1, 0, 0]], np.int64),
  )
  return hc, tm, sd, cfg, model, inputs


def _hf(tm, q=None, ids=None, mask=None, enc=None, enc_mask=None):
  t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
  with torch.no_grad():
    return tm(input_ids=t(ids), attention_mask=t(mask), query_embeds=t(q),
              encoder_hidden_states=t(enc), encoder_attention_mask=t(enc_mask)).last_hidden_state


def test_query_outputs_with_text_and_padding_match_hf(ref):
  _, tm, _, _, model, x = ref
  full_mask = np.concatenate([np.ones((B, Q), np.int64), x["text_mask"]], axis=1)
  want = _hf(tm, x["q"], x["ids"], full_mask, x["enc"])[:, :Q]
  got = model.qformer(jnp.asarray(x["q"]), jnp.asarray(x["ids"]), jnp.asarray(full_mask),
                      jnp.asarray(x["enc"]))
  assert got.shape == (B, Q, 32)
  assert max_diff(got, want) <= TOL
  # A [B, T] text mask means the same as [B, Q+T] with the queries unmasked.
  got_t = model.qformer(jnp.asarray(x["q"]), jnp.asarray(x["ids"]),
                        jnp.asarray(x["text_mask"]), jnp.asarray(x["enc"]))
  assert max_diff(got_t, want) <= 1e-6
  # Masked text positions do not matter: change their ids.
  ids2 = x["ids"].copy()
  ids2[1, 3:] = 7
  got2 = model.qformer(jnp.asarray(x["q"]), jnp.asarray(ids2), jnp.asarray(full_mask),
                       jnp.asarray(x["enc"]))
  assert max_diff(got2, got) <= 1e-6
  # ...but unmasked ones do (the text really steers the queries).
  ids3 = x["ids"].copy()
  ids3[1, 0] = (ids3[1, 0] + 1) % 50
  got3 = model.qformer(jnp.asarray(x["q"]), jnp.asarray(ids3), jnp.asarray(full_mask),
                       jnp.asarray(x["enc"]))
  assert max_diff(got3[1], got[1]) > 1e-4 and max_diff(got3[0], got[0]) <= 1e-6


def test_encoder_mask_and_query_only_match_hf(ref):
  _, tm, _, _, model, x = ref
  want = _hf(tm, x["q"], None, None, x["enc"], x["enc_mask"])
  got = model.qformer(jnp.asarray(x["q"]), None, None, jnp.asarray(x["enc"]),
                      jnp.asarray(x["enc_mask"]))
  assert max_diff(got, want) <= TOL


def test_text_only_path_matches_hf(ref):
  _, tm, _, _, model, x = ref
  want = _hf(tm, None, x["ids"], x["text_mask"])
  got = model.qformer(None, jnp.asarray(x["ids"]), jnp.asarray(x["text_mask"]), None)
  assert got.shape == (B, T, 32)
  # Compare only unpadded rows' positions (padded query rows are unconstrained garbage in both).
  assert max_diff(got * x["text_mask"][..., None], want.numpy() * x["text_mask"][..., None]) <= TOL


def test_learned_query_tokens_used_when_none_given(ref):
  _, tm, sd, _, model, x = ref
  full_mask = np.concatenate([np.ones((B, Q), np.int64), x["text_mask"]], axis=1)
  qt = np.broadcast_to(sd["query_tokens"], (B, Q, 32)).copy()
  want = _hf(tm, qt, x["ids"], full_mask, x["enc"])[:, :Q]
  got = model(None, jnp.asarray(x["ids"]), jnp.asarray(x["text_mask"]), jnp.asarray(x["enc"]))
  assert max_diff(got, want) <= TOL


def test_llama_vid_layout_config_inference_and_remat(ref):
  """LAVIS/LLaMA-VID names (`bert.` prefix, `attention.self`, `embeddings.LayerNorm`, vocab
  30523-style extra row) load through the same code; remat changes no number."""
  hc, tm, sd, _, _, x = ref
  lv = {}
  for k, v in sd.items():
    if k == "query_tokens":
      lv["model.vlm_att_query"] = v
      continue
    k = k.replace(".attention.attention.", ".attention.self.").replace(
        ".crossattention.attention.", ".crossattention.self.").replace(
        "embeddings.layernorm.", "embeddings.LayerNorm.")
    if k == "embeddings.word_embeddings.weight":
      v = np.concatenate([v, np.random.RandomState(5).randn(1, v.shape[1]).astype(v.dtype)])
    lv["model.vlm_att_encoder.bert." + k] = v
  lv["model.vlm_att_encoder.bert.embeddings.position_ids"] = np.arange(16)[None]  # buffer
  prefix = "model.vlm_att_encoder.bert."
  cfg = qformer_config_from_state_dict(lv, prefix, num_attention_heads=4,
                                       query_tokens_key="model.vlm_att_query", remat=True)
  assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.cross_attention_frequency,
          cfg.encoder_hidden_size, cfg.intermediate_size, cfg.num_query_tokens) == (
              51, 3, 2, CV, 48, Q)
  m = qformer_from_state_dict(lv, cfg, prefix=prefix, query_tokens_key="model.vlm_att_query")
  assert isinstance(m, InstructBlipQFormer)
  full_mask = np.concatenate([np.ones((B, Q), np.int64), x["text_mask"]], axis=1)
  want = _hf(tm, x["q"], x["ids"], full_mask, x["enc"])[:, :Q]
  got = m(jnp.asarray(x["q"]), jnp.asarray(x["ids"]), jnp.asarray(x["text_mask"]),
          jnp.asarray(x["enc"]))
  assert max_diff(got, want) <= TOL


def test_structure_names_and_errors():
  cfg = QFormerConfig(vocab_size=10, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                      intermediate_size=24, max_position_embeddings=8, encoder_hidden_size=12,
                      cross_attention_frequency=2, num_query_tokens=3)
  m = QFormerModel(cfg, rngs=nnx.Rngs(0))
  names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  assert "encoder.layer.0.crossattention.self.key.kernel" in names
  assert "encoder.layer.2.crossattention.self.key.kernel" in names
  assert not any(n.startswith("encoder.layer.1.crossattention") for n in names)
  assert "encoder.layer.3.output_query.LayerNorm.scale" in names
  assert "embeddings.LayerNorm.scale" in names
  for p, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.get_value().ndim, p
  q = jnp.zeros((1, 3, 16))
  with pytest.raises(ValueError, match="attention_mask"):
    m(q, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5)), jnp.zeros((1, 2, 12)))
  with pytest.raises(ValueError, match="encoder_hidden_states"):
    m(q, jnp.zeros((1, 4), jnp.int32), None, None)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    m(q, jnp.zeros((1, 9), jnp.int32), None, jnp.zeros((1, 2, 12)))
