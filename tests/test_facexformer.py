"""FaceXFormer: conversion from the release's key layout + a torch reference forward pass.

The test writes a tiny state dict with the exact key names of the released checkpoint
(torchvision Swin under `backbone.0/1`, neck, `pe_layer`, `face_decoder.*`), converts it, and
compares our outputs with a torch reference: the backbone is transformers' `SwinModel` with the
same weights (torchvision is not installable beside this torch), neck / two-way decoder / heads
are written below with torch.nn.functional after the released code.
"""
import math
import os

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx

from emo_jax.convert import facexformer as conv
from emo_jax.models import face as face_lib
from emo_jax.models import facexformer as fx
from emo_jax.models import pixels
from emo_jax.models.face_prior import FacePriors
from emo_jax.jobs import precompute_priors as pp
from input_pipeline.prior_store import PriorStore

CFG = fx.tiny_config(segmentation=True)
BATCH = 3


# ---------------------------------------------------------------------------------------
# A state dict in the released layout.


def release_state_dict(cfg: fx.FaceXFormerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
  g = torch.Generator().manual_seed(seed)
  sd: dict[str, torch.Tensor] = {}

  def rand(name, *shape, scale=0.2):
    sd[name] = torch.randn(*shape, generator=g) * scale

  def norm(name, dim):
    sd[name + ".weight"] = 1.0 + 0.1 * torch.randn(dim, generator=g)
    sd[name + ".bias"] = 0.1 * torch.randn(dim, generator=g)

  def lin(name, dout, din, bias=True):
    rand(name + ".weight", dout, din, scale=1.0 / math.sqrt(din))
    if bias:
      rand(name + ".bias", dout, scale=0.1)

  s = cfg.swin
  ws = s.window_size
  rand("backbone.0.0.0.weight", s.embed_dim, 3, s.patch_size, s.patch_size)
  rand("backbone.0.0.0.bias", s.embed_dim)
  norm("backbone.0.0.2", s.embed_dim)
  coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
  rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
  rpi = (rel[..., 0] * (2 * ws - 1) + rel[..., 1]).flatten()  # torchvision's buffer, int64
  for i, (depth, heads) in enumerate(zip(s.depths, s.num_heads)):
    dim = s.stage_dims[i]
    for j in range(depth):
      b = f"backbone.0.{2 * i + 1}.{j}."
      norm(b + "norm1", dim)
      lin(b + "attn.qkv", 3 * dim, dim)
      lin(b + "attn.proj", dim, dim)
      rand(b + "attn.relative_position_bias_table", (2 * ws - 1) ** 2, heads, scale=0.5)
      sd[b + "attn.relative_position_index"] = rpi.clone()
      norm(b + "norm2", dim)
      lin(b + "mlp.0", 4 * dim, dim)
      lin(b + "mlp.3", dim, 4 * dim)
    if i < len(s.depths) - 1:
      lin(f"backbone.0.{2 * i + 2}.reduction", 2 * dim, 4 * dim, bias=False)
      norm(f"backbone.0.{2 * i + 2}.norm", 4 * dim)
  norm("backbone.1", s.num_features)
  d, m = cfg.decoder_dim, cfg.decoder_mlp_dim
  for i, c in enumerate(s.stage_dims):
    lin(f"linear_c.{i}.proj", d, c)
  rand("linear_fuse.weight", d, 4 * d, 1, 1, scale=1.0 / math.sqrt(4 * d))
  rand("pe_layer.positional_encoding_gaussian_matrix", 2, d // 2, scale=1.0)
  fd = "face_decoder."
  for name in fx.TASK_NAMES:
    rand(f"{fd}{name}_token.weight", 1, d, scale=1.0)
  rand(fd + "mask_tokens.weight", cfg.num_mask_tokens, d, scale=1.0)

  def attn(name, inner):
    for p in ("q_proj", "k_proj", "v_proj"):
      lin(f"{name}.{p}", inner, d)
    lin(f"{name}.out_proj", d, inner)

  half = d // cfg.attention_downsample_rate
  for layer in range(cfg.decoder_depth):
    b = f"{fd}transformer.layers.{layer}."
    attn(b + "self_attn", d)
    attn(b + "cross_attn_token_to_image", half)
    attn(b + "cross_attn_image_to_token", half)
    for k in range(1, 5):
      norm(f"{b}norm{k}", d)
    lin(b + "mlp.lin1", m, d)
    lin(b + "mlp.lin2", d, m)
  attn(fd + "transformer.final_attn_token_to_image", half)
  norm(fd + "transformer.norm_final_attn", d)
  for name, out in fx.TASKS:
    for k, (o, i) in enumerate(((d, d), (d, d), (out, d))):
      lin(f"{fd}{name}_prediction_head.layers.{k}", o, i)
  rand(fd + "output_upscaling.0.weight", d, d // 4, 2, 2)
  rand(fd + "output_upscaling.0.bias", d // 4)
  norm(fd + "output_upscaling.1", d // 4)
  rand(fd + "output_upscaling.3.weight", d // 4, d // 8, 2, 2)
  rand(fd + "output_upscaling.3.bias", d // 8)
  for k, (o, i) in enumerate(((d, d), (d, d), (d // 8, d))):
    lin(f"{fd}output_hypernetwork_mlps.layers.{k}", o, i)
  return sd


# ---------------------------------------------------------------------------------------
# Torch reference (after network/models/facexformer.py and SAM's transformer.py).


def hf_backbone(cfg: fx.FaceXFormerConfig, sd) -> transformers.SwinModel:
  s = cfg.swin
  model = transformers.SwinModel(transformers.SwinConfig(
      image_size=s.image_size, patch_size=s.patch_size, embed_dim=s.embed_dim,
      depths=list(s.depths), num_heads=list(s.num_heads), window_size=s.window_size,
      hidden_act="gelu", layer_norm_eps=1e-5)).eval()
  hf = {"embeddings.patch_embeddings.projection.weight": sd["backbone.0.0.0.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["backbone.0.0.0.bias"],
        "embeddings.norm.weight": sd["backbone.0.0.2.weight"],
        "embeddings.norm.bias": sd["backbone.0.0.2.bias"],
        "layernorm.weight": sd["backbone.1.weight"], "layernorm.bias": sd["backbone.1.bias"]}
  for i, depth in enumerate(s.depths):
    for j in range(depth):
      t, h = f"backbone.0.{2 * i + 1}.{j}.", f"encoder.layers.{i}.blocks.{j}."
      for kind in ("weight", "bias"):
        q, k, v = sd[t + "attn.qkv." + kind].chunk(3, dim=0)
        hf.update({h + "attention.q_proj." + kind: q, h + "attention.k_proj." + kind: k,
                   h + "attention.v_proj." + kind: v,
                   h + "attention.o_proj." + kind: sd[t + "attn.proj." + kind],
                   h + "layernorm_before." + kind: sd[t + "norm1." + kind],
                   h + "layernorm_after." + kind: sd[t + "norm2." + kind],
                   h + "mlp.fc1." + kind: sd[t + "mlp.0." + kind],
                   h + "mlp.fc2." + kind: sd[t + "mlp.3." + kind]})
      hf[h + "attention.relative_position_bias.relative_position_bias_table"] = \
          sd[t + "attn.relative_position_bias_table"]
    if i < len(s.depths) - 1:
      t, h = f"backbone.0.{2 * i + 2}.", f"encoder.layers.{i}.downsample."
      hf[h + "reduction.weight"] = sd[t + "reduction.weight"]
      hf[h + "norm.weight"], hf[h + "norm.bias"] = sd[t + "norm.weight"], sd[t + "norm.bias"]
  missing, unexpected = model.load_state_dict(hf, strict=False)
  assert not unexpected and all("relative_position_index" in k for k in missing), (missing,
                                                                                    unexpected)
  return model


def ref_linear(sd, name, x):
  return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def ref_ln(sd, name, x, eps=1e-5):
  return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def ref_attention(sd, name, q, k, v, heads):
  q, k, v = (ref_linear(sd, f"{name}.{p}_proj", t) for p, t in zip("qkv", (q, k, v)))
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
  q, k, v = split(q), split(k), split(v)
  attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
  out = (attn @ v).transpose(1, 2).flatten(2)
  return ref_linear(sd, name + ".out_proj", out)


def ref_mlp(sd, name, x, n=3):
  for k in range(n):
    x = ref_linear(sd, f"{name}.layers.{k}", x)
    x = F.relu(x) if k < n - 1 else x
  return x


def reference_forward(cfg, sd, pixels_nhwc: np.ndarray) -> dict[str, torch.Tensor]:
  sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
  with torch.no_grad():
    feats = hf_backbone(cfg, sd)(torch.from_numpy(pixels_nhwc).permute(0, 3, 1, 2),
                                 output_hidden_states=True,
                                 output_hidden_states_before_downsampling=True
                                 ).reshaped_hidden_states[1:]
    b, _, h, w = feats[0].shape
    states = []
    for i, f in enumerate(feats):
      hh, ww = f.shape[2:]
      x = ref_linear(sd, f"linear_c.{i}.proj", f.flatten(2).transpose(1, 2))
      x = x.permute(0, 2, 1).reshape(b, -1, hh, ww)
      states.append(F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False))
    fused = F.conv2d(torch.cat(states[::-1], dim=1), sd["linear_fuse.weight"])
    gmat = sd["pe_layer.positional_encoding_gaussian_matrix"]
    grid = torch.ones(h, w)
    y, x = (grid.cumsum(0) - 0.5) / h, (grid.cumsum(1) - 0.5) / w
    c = 2 * math.pi * ((2 * torch.stack([x, y], -1) - 1) @ gmat)
    pe = torch.cat([torch.sin(c), torch.cos(c)], -1).permute(2, 0, 1)[None]  # 1 C h w
    fd = "face_decoder."
    tokens = torch.cat([sd[f"{fd}{n}_token.weight"] for n in fx.TASK_NAMES]
                       + [sd[fd + "mask_tokens.weight"]], 0)[None].expand(b, -1, -1)
    keys = fused.flatten(2).permute(0, 2, 1)
    key_pe = pe.flatten(2).permute(0, 2, 1)
    queries, heads = tokens, cfg.decoder_heads
    for layer in range(cfg.decoder_depth):
      p = f"{fd}transformer.layers.{layer}."
      if layer == 0:
        queries = ref_attention(sd, p + "self_attn", queries, queries, queries, heads)
      else:
        q = queries + tokens
        queries = queries + ref_attention(sd, p + "self_attn", q, q, queries, heads)
      queries = ref_ln(sd, p + "norm1", queries)
      q, k = queries + tokens, keys + key_pe
      queries = ref_ln(sd, p + "norm2", queries + ref_attention(
          sd, p + "cross_attn_token_to_image", q, k, keys, heads))
      mlp = ref_linear(sd, p + "mlp.lin2", F.relu(ref_linear(sd, p + "mlp.lin1", queries)))
      queries = ref_ln(sd, p + "norm3", queries + mlp)
      q, k = queries + tokens, keys + key_pe
      keys = ref_ln(sd, p + "norm4", keys + ref_attention(
          sd, p + "cross_attn_image_to_token", k, q, queries, heads))
    attn = ref_attention(sd, fd + "transformer.final_attn_token_to_image", queries + tokens,
                         keys + key_pe, keys, heads)
    hs = ref_ln(sd, fd + "transformer.norm_final_attn", queries + attn)
    out = {"fused": fused, "tokens": hs}
    for i, name in enumerate(fx.TASK_NAMES):
      out[name] = ref_mlp(sd, f"{fd}{name}_prediction_head", hs[:, i])
    src = keys.transpose(1, 2).reshape(b, -1, h, w)
    out["decoded"] = src
    up = F.conv_transpose2d(src, sd[fd + "output_upscaling.0.weight"],
                            sd[fd + "output_upscaling.0.bias"], stride=2)
    u = up.permute(0, 2, 3, 1)
    up = F.gelu(ref_ln(sd, fd + "output_upscaling.1", u, eps=1e-6).permute(0, 3, 1, 2))
    up = F.gelu(F.conv_transpose2d(up, sd[fd + "output_upscaling.3.weight"],
                                   sd[fd + "output_upscaling.3.bias"], stride=2))
    hyper = ref_mlp(sd, fd + "output_hypernetwork_mlps", hs[:, len(fx.TASKS):])
    bb, cc, hh, ww = up.shape
    out["segmentation"] = (hyper @ up.view(bb, cc, hh * ww)).view(bb, -1, hh, ww)
  return out


# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
  sd = release_state_dict(CFG)
  model = fx.abstract_model(CFG)
  skipped = conv.load_facexformer_state(model, sd)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, crops):
    m = nnx.merge(graphdef, state)
    out = m.forward(crops)
    return out, m.priors(out)

  rng = np.random.default_rng(0)
  crops = rng.standard_normal((BATCH, 64, 64, 3)).astype(np.float32)
  return dict(sd=sd, model=model, skipped=skipped, run=lambda x: run(state, x), crops=crops,
              rng=rng)


def test_converted_forward_matches_torch_reference(setup):
  assert setup["skipped"] == []  # segmentation head present: every key is used
  out, priors = setup["run"](setup["crops"])
  ref = reference_forward(CFG, setup["sd"], setup["crops"])
  to_nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(out["fused"]), to_nhwc(ref["fused"]), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(out["decoded"]), to_nhwc(ref["decoded"]), atol=1e-4,
                             rtol=1e-4)
  np.testing.assert_allclose(np.asarray(out["tokens"]), ref["tokens"].numpy(), atol=1e-4,
                             rtol=1e-4)
  for name, size in fx.TASKS:
    assert out[name].shape == (BATCH, size)
    np.testing.assert_allclose(np.asarray(out[name]), ref[name].numpy(), atol=1e-4, rtol=1e-4,
                               err_msg=name)
  assert out["segmentation"].shape == (BATCH, CFG.num_mask_tokens, 64, 64)
  np.testing.assert_allclose(np.asarray(out["segmentation"]), ref["segmentation"].numpy(),
                             atol=1e-4, rtol=1e-4)

  # Priors (our feature choices) against torch's own pooling / grid_sample.
  assert isinstance(priors, FacePriors)
  n, cf = BATCH, CFG.feature_dim
  assert priors.global_feats.shape == (n, CFG.num_global, cf) == (n, 5, cf)
  assert priors.local_feats.shape == (n, CFG.num_local, cf) == (n, 69, cf)
  assert priors.landmarks.shape == (n, 68, 2)
  lm = torch.clamp((ref["landmarks"].reshape(n, 68, 2) + 1) / 2, 0, 1)
  np.testing.assert_allclose(np.asarray(priors.landmarks), lm.numpy(), atol=1e-5)
  glob = torch.cat([F.adaptive_avg_pool2d(ref["fused"], 2).flatten(2).transpose(1, 2),
                    ref["fused"].mean((2, 3))[:, None]], 1)
  np.testing.assert_allclose(np.asarray(priors.global_feats), glob.numpy(), atol=1e-4, rtol=1e-4)
  sampled = F.grid_sample(ref["fused"], (lm * 2 - 1)[:, :, None], mode="bilinear",
                          padding_mode="border", align_corners=False)[..., 0].transpose(1, 2)
  local = torch.cat([ref["tokens"][:, :1], sampled], 1)
  np.testing.assert_allclose(np.asarray(priors.local_feats), local.numpy(), atol=1e-4, rtol=1e-4)
  for field, name in (("age_logits", "age"), ("gender_logits", "gender"), ("race_logits", "race")):
    np.testing.assert_allclose(np.asarray(getattr(priors, field)), ref[name].numpy(), atol=1e-4,
                               rtol=1e-4)


def test_outputs_invariant_to_batch_composition(setup):
  crops = setup["crops"]
  other = setup["rng"].standard_normal(crops.shape).astype(np.float32)
  mixed = np.concatenate([crops[:1], other[1:]])  # same first crop, different neighbours
  _, a = setup["run"](crops)
  _, b = setup["run"](mixed)
  _, c = setup["run"](crops[::-1].copy())
  for field in ("global_feats", "local_feats", "landmarks", "age_logits", "race_logits"):
    x, y, z = (np.asarray(getattr(p, field)) for p in (a, b, c))
    np.testing.assert_allclose(x[0], y[0], atol=1e-5, err_msg=field)
    np.testing.assert_allclose(x, z[::-1], atol=1e-5, err_msg=field)
    assert not np.allclose(x[1], y[1])  # the other rows did change


def test_precomputed_priors_equal_online(setup, tmp_path):
  runner = pp.PriorRunner(setup["model"], batch_size=BATCH)
  rng = setup["rng"]
  # Variable frame counts (2 + 1 + 3 + 1 = 7 frames: the last call is zero-padded).
  items = [(f"rec{i}", rng.integers(0, 256, (f, 64, 64, 3), dtype=np.uint8))
           for i, f in enumerate((2, 1, 3, 1))]
  pp.precompute_priors(runner, items, str(tmp_path), num_shards=2)
  store = PriorStore(str(tmp_path))
  assert len(store) == 4 and sorted(store.ids()) == [r for r, _ in items]
  for rid, crops in items:
    got = store[rid]
    # Normalised under jit, as the runner and the model do (eager rounding can differ by an
    # ulp, which the network amplifies to ~1e-5).
    x = np.asarray(jax.jit(pixels.normalize_face)(crops))
    x = np.concatenate([x, np.zeros((BATCH - len(x),) + x.shape[1:], np.float32)])
    _, online = setup["run"](x)  # padded to the compiled batch (rows are independent)
    online = jax.tree.map(lambda a: np.asarray(a)[:len(crops)], online)
    want = {"face_global": online.global_feats, "face_local": online.local_feats,
            "landmarks": online.landmarks, "age_logits": online.age_logits,
            "gender_logits": online.gender_logits, "race_logits": online.race_logits}
    for k, v in want.items():
      assert got[k].shape == v.shape, k
      np.testing.assert_allclose(got[k], np.asarray(v), atol=1e-5, err_msg=f"{rid} {k}")
    idx = face_lib.agr_indices(np.asarray(online.age_logits)[None],
                               np.asarray(online.gender_logits)[None],
                               np.asarray(online.race_logits)[None])[0]
    sentence = face_lib.agr_sentence(*idx)
    assert got["agr_labels"]["age"] in sentence and got["agr_labels"]["race"] in sentence
    if rid == "rec2":  # the preprocess hook gives the same arrays and the AGR sentence
      hooked = pp.make_priors_fn(runner, face_lib.AGR_TEMPLATE)(crops, None)
      for k in want:
        np.testing.assert_allclose(hooked[k], got[k], atol=1e-6, err_msg=k)
      assert hooked["agr_sentence"] == face_lib.agr_sentence(*idx, face_lib.AGR_TEMPLATE)
  with pytest.raises(KeyError, match="nope"):
    store["nope"]
  with pytest.raises(ValueError, match="duplicate"):
    pp.precompute_priors(runner, items[:1] * 2, str(tmp_path / "dup"))


def test_converter_rejects_bad_checkpoints(setup, tmp_path):
  sd = setup["sd"]
  model = fx.abstract_model(CFG)
  with pytest.raises(KeyError, match="not in the checkpoint"):
    conv.load_facexformer_state(model, {k: v for k, v in sd.items() if "norm_final" not in k})
  with pytest.raises(KeyError, match="no place"):
    conv.load_facexformer_state(model, {**sd, "face_decoder.extra.weight": torch.zeros(1)})
  bad = dict(sd)
  bad["linear_fuse.weight"] = torch.zeros(3, 3, 1, 1)
  with pytest.raises(ValueError, match="shape"):
    conv.load_facexformer_state(model, bad)
  # Without the segmentation head its keys are skipped and reported, nothing else.
  no_seg = fx.abstract_model(fx.tiny_config())
  skipped = conv.load_facexformer_state(no_seg, sd)
  assert skipped and all("output_" in k for k in skipped)
  # File formats: pickles need the explicit opt-in; safetensors load without it.
  pt = tmp_path / "model.pt"
  torch.save({"state_dict_backbone": sd, "epoch": 3}, pt)
  with pytest.raises(ValueError, match="allow_pickle"):
    conv.read_checkpoint(pt)
  loaded = conv.read_checkpoint(pt, allow_pickle=True)
  assert sorted(loaded) == sorted(sd)
  from safetensors.torch import save_file
  st = tmp_path / "model.safetensors"
  save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
  m2 = conv.load_facexformer(st, CFG)
  np.testing.assert_array_equal(np.asarray(m2.face_decoder.mask_tokens[...]),
                                sd["face_decoder.mask_tokens.weight"].numpy())
  np.testing.assert_array_equal(
      np.asarray(m2.backbone.stages[1].blocks[1].attn.qkv.kernel[...]),
      sd["backbone.0.3.1.attn.qkv.weight"].numpy().T)
