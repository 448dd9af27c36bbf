"""Swin backbone parity against transformers `SwinModel` (torch CPU, fp32, random tiny config)."""
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from emo_jax.convert import facexformer as conv
from emo_jax.models import swin

# Four stages on maps 24/12/6/3 with a 3x3 window shifted by 1 (9-region shift masks):
# every map is a multiple of the window, so torchvision's padding rule and HF's window clamping
# agree; the last stage has window == map (no shift in either).
TINY = dict(image_size=96, patch_size=4, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
            window_size=3)


def _hf_model(cfg: dict, seed: int = 0) -> transformers.SwinModel:
  torch.manual_seed(seed)
  hf_cfg = transformers.SwinConfig(
      image_size=cfg["image_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
      depths=list(cfg["depths"]), num_heads=list(cfg["num_heads"]),
      window_size=cfg["window_size"], hidden_act="gelu", layer_norm_eps=1e-5)
  model = transformers.SwinModel(hf_cfg).eval()
  with torch.no_grad():  # random everything (HF zero-inits the bias tables and norms)
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  return model


def test_swin_matches_hf_swin_model():
  cfg = TINY
  hf = _hf_model(cfg)
  ours = nnx.eval_shape(lambda: swin.SwinTransformer(swin.SwinConfig(**cfg), rngs=nnx.Rngs(1)))
  conv.load_swin_from_hf(ours, hf.state_dict())
  graphdef, state = nnx.split(ours)

  @jax.jit
  def run(state, x):
    m = nnx.merge(graphdef, state)
    stages = m(x)
    return stages, m.pooled(stages[-1])

  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((2, cfg["image_size"], cfg["image_size"], 3)).astype(np.float32)
  with torch.no_grad():
    ref = hf(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True,
             output_hidden_states_before_downsampling=True)
  stages, pooled = run(state, pixels)
  # reshaped_hidden_states = (stem, stage_1 ... stage_n) before patch merging, [N, C, h, w].
  assert len(ref.reshaped_hidden_states) == len(cfg["depths"]) + 1
  for i, (got, want) in enumerate(zip(stages, ref.reshaped_hidden_states[1:])):
    want = want.permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape, i
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4, err_msg=f"stage {i}")
  np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(),
                             atol=1e-4, rtol=1e-4)


def test_torchvision_names_round_trip_hf_names():
  """HF -> torchvision renaming covers every HF weight, and the torchvision table every one of
  those; legacy HF names (`attention.self.query`, `intermediate.dense`, ...) map identically."""
  hf = _hf_model(TINY)
  sd = hf.state_dict()
  tv = conv.hf_swin_to_torchvision(sd)
  assert "features.3.1.attn.qkv.weight" in tv and "features.6.reduction.weight" in tv
  legacy = {}
  for k, v in sd.items():
    k = (k.replace("attention.q_proj", "attention.self.query")
         .replace("attention.k_proj", "attention.self.key")
         .replace("attention.v_proj", "attention.self.value")
         .replace("attention.o_proj", "attention.output.dense")
         .replace("attention.relative_position_bias.", "attention.self.")
         .replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense"))
    legacy[k] = v
  tv_legacy = conv.hf_swin_to_torchvision(legacy)
  assert sorted(tv) == sorted(tv_legacy)
  for k in tv:
    np.testing.assert_array_equal(tv[k], tv_legacy[k])
  # A stray key is an error, not a silent drop.
  with pytest.raises(KeyError):
    conv.hf_swin_to_torchvision({**sd, "embeddings.position_embeddings": torch.zeros(1)})


def test_shift_mask_and_bias_index():
  idx = swin.relative_position_index(3)
  assert idx.shape == (9, 9) and idx.min() == 0 and idx.max() == 24
  assert np.all(np.diag(idx) == 12)  # zero offset is the table centre
  mask = swin.shift_window_mask(6, 6, 3, (1, 1))
  assert mask.shape == (4, 9, 9)
  assert not mask[0].any()  # the top-left window holds one region only
  assert (mask[3] != 0).any() and np.array_equal(mask[3], mask[3].T)


def test_bad_input_shape_raises():
  ours = nnx.eval_shape(lambda: swin.SwinTransformer(swin.SwinConfig(**TINY), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="patch size"):
    ours(np.zeros((1, 97, 96, 3), np.float32))
  with pytest.raises(ValueError, match="expected pixels"):
    ours(np.zeros((1, 3, 96, 96), np.float32))
