"""VisionTransformer parity: CLIP mode vs transformers CLIPVisionModel, EVA mode vs a torch
reference of the LAVIS EVA block written here. fp32, max abs diff <= 1e-4, tiny configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPVisionConfig, CLIPVisionModel

from emo_jax.convert.eva import eva_config_from_state_dict, eva_from_state_dict
from emo_jax.convert.vision_hf import clip_vision_from_state_dict
from emo_jax.models.vit import VisionConfig, VisionTransformer, interpolate_pos_embed
from vision_testutil import TorchEva, max_diff

TOL = 1e-4


# ----------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip():
  hc = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, patch_size=4, image_size=16)
  torch.manual_seed(0)
  tm = CLIPVisionModel(hc).eval()
  # Non-trivial LayerNorm params (HF inits them to 1/0, which would hide a swapped name).
  with torch.no_grad():
    for name, p in tm.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  x = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
  with torch.no_grad():
    out = tm(torch.from_numpy(x).permute(0, 3, 1, 2), output_hidden_states=True)
  return hc, tm, sd, x, out


def test_clip_last_hidden_state_and_pooled_match_hf(clip):
  hc, _, sd, x, out = clip
  cfg = VisionConfig.from_hf_clip_dict(hc.to_dict())
  m = clip_vision_from_state_dict(sd, cfg)
  y = m(jnp.asarray(x))
  assert y.shape == tuple(out.last_hidden_state.shape) == (2, 17, 32)
  assert max_diff(y, out.last_hidden_state) <= TOL
  assert max_diff(m.pooled(y), out.pooler_output) <= TOL


@pytest.mark.parametrize("feature_layer,hf_index", [(-2, -2), (0, 0)])
def test_clip_intermediate_feature_layer_matches_hf_hidden_states(clip, feature_layer, hf_index):
  hc, _, sd, x, out = clip
  cfg = VisionConfig.from_hf_clip_dict(hc.to_dict(), feature_layer=feature_layer)
  m = clip_vision_from_state_dict(sd, cfg)
  # Only the blocks needed are built.
  assert len(m.encoder.layers) == cfg.num_used_layers < hc.num_hidden_layers
  assert max_diff(m(jnp.asarray(x)), out.hidden_states[hf_index]) <= TOL


def test_clip_interpolated_positions_match_hf(clip):
  hc, tm, sd, _, _ = clip
  cfg = VisionConfig.from_hf_clip_dict(hc.to_dict())
  m = clip_vision_from_state_dict(sd, cfg)
  x = np.random.RandomState(1).randn(1, 24, 20, 3).astype(np.float32)  # grid 6x5 vs native 4x4
  y = m(jnp.asarray(x))
  assert y.shape == (1, 1 + 6 * 5, 32)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x).permute(0, 3, 1, 2), interpolate_pos_encoding=True)
  assert max_diff(y, ref.last_hidden_state) <= TOL
  off = VisionConfig.from_hf_clip_dict(hc.to_dict(), interpolate_pos_encoding=False)
  with pytest.raises(ValueError, match="interpolate_pos_encoding"):
    clip_vision_from_state_dict(sd, off)(jnp.asarray(x))


def test_bicubic_helper_equals_torch_interpolate():
  rng = np.random.RandomState(2)
  pos = rng.randn(1 + 5 * 5, 3).astype(np.float32)
  for new in [(7, 7), (3, 4), (5, 5)]:
    got = interpolate_pos_embed(jnp.asarray(pos), new)
    grid = torch.from_numpy(pos[1:]).reshape(1, 5, 5, 3).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    assert got.shape == (1 + new[0] * new[1], 3)
    np.testing.assert_array_equal(np.asarray(got[0]), pos[0])
    assert max_diff(got[1:], ref) <= 1e-5


def test_scan_and_remat_equal_layer_loop_with_gradients(clip):
  hc, _, sd, x, out = clip
  loop = clip_vision_from_state_dict(sd, VisionConfig.from_hf_clip_dict(hc.to_dict()))
  scan = clip_vision_from_state_dict(
      sd, VisionConfig.from_hf_clip_dict(hc.to_dict(), scan_layers=True, remat=True))
  k = scan.encoder.layers.self_attn.q_proj.kernel
  assert k.shape == (3, 32, 32) and k.get_metadata()["out_sharding"][0] == "layers"
  assert max_diff(scan(jnp.asarray(x)), out.last_hidden_state) <= TOL

  def loss(model):
    return jnp.sum(model(jnp.asarray(x)) ** 2)

  g_loop = nnx.grad(loss)(loop)
  g_scan = nnx.grad(loss)(scan)
  gl = g_loop["encoder"]["layers"][1]["mlp"]["fc1"]["kernel"][...]
  gs = g_scan["encoder"]["layers"]["mlp"]["fc1"]["kernel"][...][1]
  assert float(jnp.max(jnp.abs(gl))) > 0
  assert max_diff(gl, gs) <= 1e-3 * float(jnp.max(jnp.abs(gl)))


def test_every_param_has_logical_axes_of_its_rank():
  cfg = VisionConfig(kind="eva", hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                     num_attention_heads=2, patch_size=4, image_size=8, hidden_act="gelu")
  m = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
  names = set()
  for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.get_value().ndim, path
    names.update(a for a in axes if a)
  assert {"vit_embed", "vit_mlp", "heads", "norm"} <= names
  # EVA: no k bias, patch conv with bias, no pre/post norm.
  assert not m.encoder.layers[0].self_attn.k_proj.use_bias
  assert m.embeddings.patch_embedding.use_bias
  assert not hasattr(m, "pre_layrnorm") and not hasattr(m, "post_layernorm")


def test_bad_inputs_raise_clear_errors():
  cfg = VisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                     num_attention_heads=2, patch_size=4, image_size=8)
  m = VisionTransformer(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="NHWC"):
    m(jnp.zeros((1, 3, 8, 8)))
  with pytest.raises(ValueError, match="multiple of patch"):
    m(jnp.zeros((1, 10, 8, 3)))
  with pytest.raises(ValueError, match="feature_layer"):
    VisionConfig(num_hidden_layers=2, feature_layer=3)
  with pytest.raises(ValueError, match="kind"):
    VisionConfig(kind="siglip")


# ----------------------------------------------------------------------------- EVA


def test_eva_matches_torch_reference_at_feature_layer():
  torch.manual_seed(1)
  ref = TorchEva().eval()
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  cfg = eva_config_from_state_dict(sd, num_attention_heads=4)  # default: all but the last block
  assert (cfg.kind, cfg.num_hidden_layers, cfg.num_used_layers, cfg.image_size) == ("eva", 3, 2, 16)
  m = eva_from_state_dict(sd, cfg)
  assert len(m.encoder.layers) == 2
  x = np.random.RandomState(3).randn(2, 16, 16, 3).astype(np.float32)
  with torch.no_grad():
    outs = ref(torch.from_numpy(x).permute(0, 3, 1, 2))
  y = m(jnp.asarray(x))
  assert y.shape == (2, 17, 32)
  assert max_diff(y, outs[1]) <= TOL
  # The bias layout matters: a k bias of zero, not v_bias shifted.
  assert float(jnp.abs(m.encoder.layers[0].self_attn.v_proj.bias[...]).max()) > 0
  assert jax.tree.leaves(m.encoder.layers[0].self_attn.k_proj)  # has a kernel, no bias
