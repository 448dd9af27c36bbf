"""Face prior interface, Face Info Mining (both query modes) and the AGR sentence."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from emo_jax.models import face, face_prior
from emo_jax.models.face import FaceInfoMining, FaceMiningConfig, agr_sentence, agr_sentences
from emo_jax.models.face_prior import FacePriors, TinyFacePrior, TinyFacePriorConfig


def test_tiny_prior_shapes_and_local_features_follow_landmarks():
  cfg = TinyFacePriorConfig(image_size=32, channels=(4, 8), feat_dim=6, global_grid=2)
  prior = TinyFacePrior(cfg, rngs=nnx.Rngs(0))
  crops = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  out = nnx.jit(lambda mod, x: mod(x))(prior, crops)
  assert out.global_feats.shape == (3, 4, 6)
  assert out.local_feats.shape == (3, 68, 6)
  assert out.landmarks.shape == (3, 68, 2)
  assert (out.age_logits.shape, out.gender_logits.shape, out.race_logits.shape) == (
      (3, 8), (3, 2), (3, 5))
  lm = np.asarray(out.landmarks)
  assert (lm > 0).all() and (lm < 1).all()
  # Local features are the feature map sampled at the landmarks: compare with torch grid_sample
  # (align_corners=False, border padding) on the same feature map.
  x = crops
  for conv in prior.convs:
    x = jax.nn.gelu(conv(x), approximate=False)
  fmap = np.asarray(prior.feat_proj(x))
  grid = torch.tensor(lm * 2 - 1)[:, None]  # [N, 1, L, 2] in [-1, 1]
  ref = torch.nn.functional.grid_sample(torch.tensor(fmap).permute(0, 3, 1, 2), grid,
                                        mode="bilinear", padding_mode="border",
                                        align_corners=False)[:, :, 0].permute(0, 2, 1)
  np.testing.assert_allclose(np.asarray(out.local_feats), ref.numpy(), atol=1e-5)
  # Global tokens are the 2x2 average pool of the feature map.
  pooled = fmap.reshape(3, 2, 4, 2, 4, 6).mean((2, 4)).reshape(3, 4, 6)
  np.testing.assert_allclose(np.asarray(out.global_feats), pooled, atol=1e-5)


def test_tiny_prior_rejects_bad_crops():
  # The checks run before any weight is used: an abstract module is enough (no init cost).
  prior = nnx.eval_shape(lambda: TinyFacePrior(TinyFacePriorConfig(), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="divisible"):
    prior(jnp.zeros((1, 30, 30, 3)))
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
    prior(jnp.zeros((1, 32, 32)))


def _reference_mining(m: FaceInfoMining, queries, feats):
  """numpy re-computation of the documented block (pre-LN cross-attn + MLP, final LN, proj)."""
  def lin(layer, x):
    return x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])

  def ln(layer, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * np.asarray(layer.scale[...]) + np.asarray(
        layer.bias[...])

  cfg = m.config
  h, d = cfg.num_heads, cfg.hidden_dim // cfg.num_heads
  kv = ln(m.kv_layernorm, lin(m.input_proj, feats))
  xq = ln(m.query_layernorm, queries)
  n = queries.shape[0]
  q = lin(m.q_proj, xq).reshape(n, -1, h, d)
  k = lin(m.k_proj, kv).reshape(n, -1, h, d)
  v = lin(m.v_proj, kv).reshape(n, -1, h, d)
  s = np.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(d)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  att = np.einsum("nhqk,nkhd->nqhd", p, v).reshape(n, -1, cfg.hidden_dim)
  x = queries + lin(m.o_proj, att)
  hmid = lin(m.fc1, ln(m.mlp_layernorm, x))
  hmid = np.asarray(jax.nn.gelu(hmid, approximate=False))
  x = x + lin(m.fc2, hmid)
  return lin(m.out_proj, ln(m.final_layernorm, x))


@pytest.mark.parametrize("mode", ["learned", "qformer"])
def test_face_info_mining_both_query_modes(mode):
  cfg = FaceMiningConfig(face_dim=6, hidden_dim=8, num_heads=2, num_tokens=4, out_dim=10,
                         query_mode=mode, qformer_dim=12)
  m = FaceInfoMining(cfg, rngs=nnx.Rngs(3))
  keys = jax.random.split(jax.random.key(0), 3)
  g = jax.random.normal(keys[0], (5, 4, 6))
  loc = jax.random.normal(keys[1], (5, 68, 6))
  qf = jax.random.normal(keys[2], (5, 8, 12)) if mode == "qformer" else None
  out = nnx.jit(lambda mod, *a: mod(*a))(m, g, loc, qf)
  assert out.shape == (5, 4, 10)
  if mode == "learned":
    queries = np.broadcast_to(np.asarray(m.query_tokens[...]), (5, 4, 8))
  else:
    grouped = np.asarray(qf).reshape(5, 4, 2, 12).mean(2)
    queries = grouped @ np.asarray(m.query_proj.kernel[...]) + np.asarray(m.query_proj.bias[...])
  feats = np.concatenate([np.asarray(g), np.asarray(loc)], 1)
  np.testing.assert_allclose(np.asarray(out), _reference_mining(m, queries, feats), atol=1e-4)
  if mode == "qformer":
    # Text-conditioned: other Q-Former queries give other face tokens.
    assert not np.allclose(np.asarray(m(g, loc, qf + 1.0)), np.asarray(out))
    with pytest.raises(ValueError, match="needs the Q-Former"):
      m(g, loc, None)
    with pytest.raises(ValueError, match="must divide"):
      m(g, loc, qf[:, :6])
  # Gradients reach every parameter of the mining module.
  grads = nnx.jit(nnx.grad(lambda mod: jnp.sum(mod(g, loc, qf) ** 2)))(m)
  for path, leaf in nnx.to_flat_state(grads):
    assert np.abs(np.asarray(leaf[...])).sum() > 0, path


def test_face_mining_config_validation():
  with pytest.raises(ValueError, match="query_mode"):
    FaceMiningConfig(query_mode="text")
  with pytest.raises(ValueError, match="divisible"):
    FaceMiningConfig(hidden_dim=9, num_heads=2)


def test_agr_sentence_template_and_tables():
  assert face_prior.AGE_BINS[0] == "0-9" and face_prior.AGE_BINS[-1] == "70+"
  assert len(face_prior.AGE_BINS) == 8
  s = agr_sentence(2, 1, 3, media="video")
  assert s == face.AGR_TEMPLATE.format(media="video", age="20-29", gender="female", race="asian")
  assert agr_sentence(7, 0, 4, template="{gender}|{age}|{race}") == "male|70+|others"
  with pytest.raises(ValueError, match="age index"):
    agr_sentence(8, 0, 0)
  with pytest.raises(ValueError, match="race index"):
    agr_sentence(0, 0, -1)


def test_agr_sentences_from_frame_logits_ignore_padding_frames():
  rng = np.random.default_rng(0)
  b, f = 2, 3
  age = rng.normal(size=(b, f, 8)).astype(np.float32)
  gender = rng.normal(size=(b, f, 2)).astype(np.float32)
  race = rng.normal(size=(b, f, 5)).astype(np.float32)
  mask = np.array([[True, False, False], [True, True, False]])
  # Padding frames carry huge logits for other classes: they must not matter.
  age[:, 2, 0] = 1e6
  age[0, 1, 0] = 1e6
  priors = FacePriors(global_feats=np.zeros((b, f, 1, 1)), local_feats=np.zeros((b, f, 1, 1)),
                      landmarks=np.zeros((b, f, 68, 2)), age_logits=age, gender_logits=gender,
                      race_logits=race)
  got = agr_sentences(priors, mask, template="{age},{gender},{race}", media=["image", "video"])
  for i in range(b):
    r = mask[i]
    want = ",".join([face_prior.AGE_BINS[age[i, r].mean(0).argmax()],
                     face_prior.GENDERS[gender[i, r].mean(0).argmax()],
                     face_prior.RACES[race[i, r].mean(0).argmax()]])
    assert got[i] == want
  with pytest.raises(ValueError, match="real frame"):
    agr_sentences(priors, np.zeros((b, f), bool))
  # From the tiny prior end to end: sentence of its argmax.
  prior = TinyFacePrior(TinyFacePriorConfig(), rngs=nnx.Rngs(0))
  p = prior(jax.random.normal(jax.random.key(2), (2, 32, 32, 3)))
  sents = agr_sentences(p)
  for i in range(2):
    assert sents[i] == agr_sentence(int(np.argmax(p.age_logits[i])),
                                    int(np.argmax(p.gender_logits[i])),
                                    int(np.argmax(p.race_logits[i])))


def test_tiny_prior_config_roundtrip():
  cfg = TinyFacePriorConfig(channels=(4, 8, 8), feat_dim=12)
  assert TinyFacePriorConfig.from_dict(cfg.to_dict()) == cfg
  fm = FaceMiningConfig(num_tokens=2, query_mode="qformer")
  assert FaceMiningConfig.from_dict(dataclasses.asdict(fm)) == fm
