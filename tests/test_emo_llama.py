"""EmoLlama composition: slot layout, padding / batch invariance, loss, trainable groups,
precomputed priors with Q-Former face queries, generation, config round trip."""
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_llama_testutil import cfg, model  # noqa: F401  (fixtures)
from emo_jax.models import emo_llama
from emo_jax.models.emo_llama import (EmoLlama, EmoLlamaConfig, dummy_batch, param_groups,
                                      trainable_filter)
from emo_jax.models.face import FaceMiningConfig

F_MAX = 3
FRAMES = (1, 2, 3)  # an image (1 real frame of 3) and clips of 2 and 3 frames


@pytest.fixture(scope="module")
def fns(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, batch):
    m = nnx.merge(graphdef, state)
    embeds, mask = m.embed_multimodal(batch)
    return m(batch), embeds, mask, m.encode_frames(batch)

  @jax.jit
  def grads(state, batch):
    def loss_fn(st):
      return nnx.merge(graphdef, st).loss(batch)
    return jax.value_and_grad(loss_fn, has_aux=True)(state)

  return state, forward, grads


def _batch(cfg, seed=0):
  return dummy_batch(cfg, FRAMES, num_frames=F_MAX, seed=seed)


def test_tokens_per_frame_and_config_roundtrip(cfg):
  assert cfg.num_content_tokens == 4  # grid:2
  assert cfg.tokens_per_frame == 1 + 4 + 2
  assert cfg.replace(compress_type="mean").tokens_per_frame == 1 + 1 + 2
  assert cfg.replace(compress_type="none", use_face=False).tokens_per_frame == 1 + 16
  back = EmoLlamaConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
  assert back == cfg
  # LLaMA-VID's avg_pool2d(kernel=stride=side//g): 4 // (4 // 3) = 4 outputs per axis.
  assert cfg.replace(compress_type="grid:3").num_content_tokens == 16
  with pytest.raises(ValueError, match="patch grid"):
    cfg.replace(compress_type="grid:5")
  assert cfg.replace(compress_type="none", vision_select_feature="cls_patch"
                     ).num_content_tokens == 17
  with pytest.raises(ValueError, match="cls_patch"):
    cfg.replace(vision_select_feature="cls_patch")  # with grid:2
  with pytest.raises(ValueError, match="compress_type"):
    cfg.replace(compress_type="max")
  with pytest.raises(ValueError, match="always frozen"):
    cfg.replace(trainable=("face_prior",))
  with pytest.raises(ValueError, match="unknown trainable"):
    cfg.replace(trainable=("decoder",))
  with pytest.raises(ValueError, match="lora_rank"):
    cfg.replace(lora_rank=0)
  with pytest.raises(ValueError, match="face_dim"):
    cfg.replace(face=dataclasses.replace(cfg.face, face_dim=5))
  assert cfg.face.out_dim == cfg.llm.hidden_size  # forced to the LLM width


def test_slots_padding_and_batch_invariance(cfg, fns):
  state, forward, _ = fns
  batch = _batch(cfg)
  logits, embeds, mask, visual = map(np.asarray, forward(state, batch))
  b, t = batch["input_ids"].shape
  assert logits.shape == (b, t, cfg.llm.vocab_size) and logits.dtype == np.float32
  assert np.isfinite(logits).all()
  tpf = cfg.tokens_per_frame
  for i in range(b):
    slots = np.flatnonzero(batch["input_ids"][i] == cfg.image_token_id)
    assert len(slots) == F_MAX * tpf
    for f in range(F_MAX):
      for j in range(tpf):
        s = slots[f * tpf + j]
        if batch["frame_mask"][i, f]:
          np.testing.assert_array_equal(embeds[i, s], visual[i, f * tpf + j])
          assert mask[i, s] == 1
        else:  # padding frames: nothing, and masked out
          assert not embeds[i, s].any() and mask[i, s] == 0
  # Changing padding frames (pixels and face crops) changes nothing anywhere.
  b2 = {k: np.array(v) for k, v in batch.items()}
  pad = ~batch["frame_mask"]
  b2["frames"][pad] = 5
  b2["face_crops"][pad] = 200
  logits2 = np.asarray(forward(state, b2)[0])
  np.testing.assert_allclose(logits2, logits, atol=1e-5, rtol=0)
  # Changing sample 2 entirely does not change samples 0 and 1 ...
  b3 = {k: np.array(v) for k, v in batch.items()}
  other = _batch(cfg, seed=7)
  for k in ("frames", "face_crops", "qformer_ids"):
    b3[k][2] = other[k][2]
  b3["input_ids"][2] = np.where(batch["input_ids"][2] == cfg.image_token_id,
                                cfg.image_token_id, other["input_ids"][2] % 50 + 3)
  logits3 = np.asarray(forward(state, b3)[0])
  np.testing.assert_allclose(logits3[:2], logits[:2], atol=1e-5, rtol=0)
  assert np.abs(logits3[2] - logits[2]).max() > 1e-3
  # ... while a real frame of sample 1 does change sample 1 (the test can fail).
  b4 = {k: np.array(v) for k, v in batch.items()}
  b4["frames"][1, 1] = 255 - b4["frames"][1, 1]
  logits4 = np.asarray(forward(state, b4)[0])
  valid = batch["attention_mask"][1] == 1
  assert np.abs(logits4[1][valid] - logits[1][valid]).max() > 1e-4
  np.testing.assert_allclose(logits4[[0, 2]], logits[[0, 2]], atol=1e-5, rtol=0)


def test_uint8_pixels_are_normalised_in_the_model(cfg, fns):
  """uint8 frames / crops (the pipeline's batch) give the logits of the same batch normalised
  on the host with media.preprocess_vit / preprocess_face (floating pixels are used as is)."""
  from input_pipeline import media
  state, forward, _ = fns
  batch = _batch(cfg)
  assert batch["frames"].dtype == np.uint8 and batch["face_crops"].dtype == np.uint8
  host = dict(batch)
  s, fs = cfg.vision.image_size, cfg.tiny_face_prior.image_size
  host["frames"] = np.stack([media.preprocess_vit(x, s) for x in batch["frames"]])
  host["face_crops"] = np.stack([media.preprocess_face(x, fs) for x in batch["face_crops"]])
  assert host["frames"].dtype == np.float32
  logits, _, _, visual = map(np.asarray, forward(state, batch))
  logits_h, _, _, visual_h = map(np.asarray, forward(state, host))
  att = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(visual_h, visual, atol=2e-5, rtol=0)
  np.testing.assert_allclose(logits_h[att], logits[att], atol=2e-5, rtol=0)
  # The dtype is the contract: the same pixels as float are taken as normalised already,
  # which is a very different input (the test can fail).
  raw_float = dict(batch, frames=batch["frames"].astype(np.float32),
                   face_crops=batch["face_crops"].astype(np.float32))
  logits_f = np.asarray(forward(state, raw_float)[0])
  assert np.abs(logits_f[att] - logits[att]).max() > 1e-3
  # And each of the two keys is normalised with its own statistics.
  swapped = dict(host, face_crops=np.stack([media.preprocess(x, fs, aspect="resize")
                                            for x in batch["face_crops"]]))
  logits_s = np.asarray(forward(state, swapped)[0])
  assert np.abs(logits_s[att] - logits[att]).max() > 1e-4


def test_normalize_pixels_contract():
  from emo_jax.models import pixels
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
  want = (x / 255.0 - np.asarray(pixels.CLIP_MEAN)) / np.asarray(pixels.CLIP_STD)
  got = pixels.normalize_vit(x)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=0)
  want_face = (x / 255.0 - np.asarray(pixels.IMAGENET_MEAN)) / np.asarray(pixels.IMAGENET_STD)
  np.testing.assert_allclose(np.asarray(pixels.normalize_face(x)), want_face, atol=1e-6, rtol=0)
  assert pixels.normalize_vit(x, jnp.bfloat16).dtype == jnp.bfloat16
  # Floating input is already normalised: passed through untouched (any float dtype).
  f = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(pixels.normalize_vit(f)), f)
  assert pixels.normalize_vit(f.astype(jnp.bfloat16)).dtype == jnp.bfloat16
  with pytest.raises(TypeError, match="uint8"):
    pixels.normalize_vit(x.astype(np.int32))
  with pytest.raises(ValueError, match="channels"):
    pixels.normalize_vit(x[..., :2])
  # Under jit too (the model's path).
  np.testing.assert_allclose(np.asarray(jax.jit(pixels.normalize_vit)(x)), want, atol=1e-6,
                             rtol=0)
  fb = dummy_batch(EmoLlamaConfig.tiny(), (1, 2), num_frames=2, pixels="float32")
  assert fb["frames"].dtype == fb["face_crops"].dtype == np.float32


def _nonzero(tree) -> bool:
  return any(np.abs(np.asarray(x)).sum() > 0 for x in jax.tree.leaves(tree))


def test_loss_and_gradients_reach_only_trainable_groups(cfg, model, fns):
  state, forward, grads = fns
  batch = _batch(cfg)
  (loss, aux), g = grads(state, batch)
  # Loss equals the NLL of the forward logits over loss_mask tokens (t predicted at t-1).
  logits = np.asarray(forward(state, batch)[0], np.float64)
  lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  w = batch["loss_mask"][:, 1:].astype(bool)
  tgt = batch["input_ids"][:, 1:]
  nll = -np.take_along_axis(lp[:, :-1], np.where(w, tgt, 0)[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), nll[w].mean(), rtol=1e-5)
  assert int(aux["num_tokens"]) == w.sum()
  acc = (lp[:, :-1].argmax(-1) == tgt)[w].mean()
  np.testing.assert_allclose(float(aux["accuracy"]), acc, atol=1e-6)

  # Per group: frozen groups get exactly zero gradient (stop_gradient), trainable ones non-zero.
  flat = {emo_llama._path_str(p): v for p, v in nnx.to_flat_state(g)}
  groups = param_groups(model)
  for name in ("vision", "face_prior"):
    assert not _nonzero([flat[p] for p in groups[name]]), name
  n_q = cfg.qformer.num_hidden_layers
  # Only the query outputs are used: the last layer's *text* FFN cannot get a gradient.
  text_ffn = re.compile(rf"vlm_att_encoder/encoder/layer/{n_q - 1}/(intermediate|output)/")
  for name in ("qformer", "projectors", "face", "lora"):
    for p in groups[name]:
      if not text_ffn.search(p):
        assert _nonzero(flat[p]), p

  # The trainable filter selects exactly the configured groups.
  selected = {emo_llama._path_str(p) for p, _ in
              nnx.to_flat_state(nnx.state(model, trainable_filter(cfg)))}
  want = set().union(*(groups[k] for k in cfg.trainable))
  assert selected == want
  for frozen in ("vision", "face_prior", "llm"):
    assert not selected & set(groups[frozen]), frozen
  assert set(groups["lora"]) and all("lora_" in p for p in groups["lora"])
  # Another config trains other groups.
  cfg2 = cfg.replace(trainable=("vision", "llm"))
  sel2 = {emo_llama._path_str(p) for p, _ in
          nnx.to_flat_state(nnx.state(model, trainable_filter(cfg2)))}
  assert sel2 == set(groups["vision"]) | set(groups["llm"])


def test_precomputed_priors_with_qformer_face_queries(cfg):
  cfg_q = cfg.replace(face_prior="precomputed", lora_rank=0,
                      trainable=("qformer", "projectors", "face"),
                      face=dataclasses.replace(cfg.face, query_mode="qformer"))
  m = nnx.jit(lambda: EmoLlama(cfg_q, rngs=nnx.Rngs(1)))()
  assert m.face_prior is None
  batch = dummy_batch(cfg_q, FRAMES, num_frames=F_MAX, face="precomputed")

  @nnx.jit
  def run(m, batch):
    frames = m.vision_inputs(batch["frames"])
    b, f = frames.shape[:2]
    feats = m.vision_tower(frames.reshape((b * f,) + frames.shape[2:]))
    q_out = m.qformer_queries(feats, jnp.repeat(batch["qformer_ids"], f, 0),
                              jnp.repeat(batch["qformer_mask"], f, 0))
    g = batch["face_global"].reshape((b * f,) + batch["face_global"].shape[2:])
    loc = batch["face_local"].reshape((b * f,) + batch["face_local"].shape[2:])
    want = m.face_mining(g, loc, q_out).reshape(b, f, cfg_q.face.num_tokens, -1)
    return m.encode_frames(batch), want, m(batch)

  visual, want, logits = map(np.asarray, run(m, batch))
  tpf = cfg_q.tokens_per_frame
  got = visual.reshape(len(FRAMES), F_MAX, tpf, -1)[:, :, -cfg_q.face.num_tokens:]
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert np.isfinite(logits).all()
  # The face tokens depend on the Q-Former text: another instruction, other face tokens.
  b2 = dict(batch, qformer_ids=(batch["qformer_ids"] + 1) % cfg_q.qformer.vocab_size)
  got2 = np.asarray(run(m, b2)[0]).reshape(got.shape[:2] + (tpf, -1))[:, :, -2:]
  assert np.abs(got2 - got).max() > 1e-5
  with pytest.raises(ValueError, match="face_crops"):
    m.face_priors({"frames": batch["frames"]})


def test_bad_slot_count_is_rejected(cfg, model):
  batch = _batch(cfg)
  batch["input_ids"][1, np.flatnonzero(batch["input_ids"][1] == cfg.image_token_id)[0]] = 5
  with pytest.raises(ValueError, match=r"samples \[1\] have \[20\] image slots"):
    model.embed_multimodal(batch)


def test_generate_first_token_matches_forward(cfg, model, fns):
  state, forward, _ = fns
  batch = _batch(cfg)
  # Left-pad each prompt (generation contract): move the right padding to the front.
  lengths = (batch["attention_mask"] + (batch["input_ids"] == cfg.image_token_id)).clip(0, 1)
  lens = [int(np.flatnonzero(r)[-1]) + 1 for r in lengths]
  t = batch["input_ids"].shape[1]
  left = {k: np.array(v) for k, v in batch.items()}
  for i, n in enumerate(lens):
    for k in ("input_ids", "attention_mask"):
      left[k][i] = np.concatenate([np.zeros(t - n, left[k].dtype), batch[k][i, :n]])
  out = np.asarray(model.generate(left, max_new_tokens=2, eos_token_id=None, pad_token_id=0))
  assert out.shape == (len(FRAMES), 2)
  logits = np.asarray(forward(state, left)[0])
  np.testing.assert_array_equal(out[:, 0], logits[:, -1].argmax(-1))


def test_bundle_roundtrip_gives_identical_logits(cfg, model, fns, tmp_path):
  from emo_jax.convert import bundle
  from emo_jax.convert.safetensors_io import CheckpointError
  state, forward, _ = fns
  batch = _batch(cfg)
  names = bundle.save_bundle(model, tmp_path / "b", max_shard_bytes=20_000)
  assert len(names) > 1 and (tmp_path / "b" / "model.safetensors.index.json").exists()
  loaded = bundle.load_bundle(tmp_path / "b")
  assert loaded.config == cfg
  graphdef2, state2 = nnx.split(loaded)
  a = dict(nnx.to_flat_state(state))
  for path, v in nnx.to_flat_state(state2):
    np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(a[path][...]))
    assert type(v) is type(a[path]), path  # LoRAParam stays LoRAParam
  np.testing.assert_array_equal(np.asarray(forward(state2, batch)[0]),
                                np.asarray(forward(state, batch)[0]))
  # A bundle whose config does not match its tensors is refused.
  doc = json.loads((tmp_path / "b" / bundle.CONFIG_NAME).read_text())
  doc["config"]["lora_rank"] = 4
  (tmp_path / "b" / bundle.CONFIG_NAME).write_text(json.dumps(doc))
  with pytest.raises(CheckpointError, match="lora_a has shape"):
    bundle.load_bundle(tmp_path / "b")
  with pytest.raises(CheckpointError, match="not found"):
    bundle.load_bundle(tmp_path)


def test_agr_sentences_from_the_models_face_prior(cfg, model):
  from emo_jax.models.face import agr_sentences as agr_from_priors
  batch = _batch(cfg)
  got = model.agr_sentences(batch, media=["image", "video", "video"])
  b, f = batch["frame_mask"].shape
  crops = batch["face_crops"].reshape((b * f,) + batch["face_crops"].shape[2:])
  priors = model.face_prior(model.face_inputs(crops)).reshape_frames(b, f)
  # Padding-frame crops are random here: they must be ignored by the frame average.
  assert got == agr_from_priors(priors, batch["frame_mask"], cfg.agr_template,
                                ["image", "video", "video"])
  assert got[0].startswith("The person in the image appears to be a ")
  # The evaluation scorer's AGR pass normalises uint8 crops as the model does, and takes
  # host-normalised float crops as they are.
  from emo_jax.train.evaluate import Scorer
  from input_pipeline import media
  scorer = Scorer(model, max_new_tokens=1, eos_id=2, pad_id=0)
  first = batch["face_crops"][:, 0]
  p0 = model.face_prior(model.face_inputs(first))
  want = tuple(np.asarray(x).argmax(-1) for x in (p0.age_logits, p0.gender_logits,
                                                  p0.race_logits))
  host = dict(batch, face_crops=np.stack([media.preprocess_face(x, x.shape[1])
                                          for x in batch["face_crops"]]))
  for got_agr in (scorer.agr(batch), scorer.agr(host)):
    for g, w in zip(got_agr, want):
      np.testing.assert_array_equal(g, w)
