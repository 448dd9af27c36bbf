"""AUFormer head: shared-backbone forward, per-AU experts, frozen ViT in the train step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from emo_jax.models import au_former
from emo_jax.models.emo_llama import EmoLlama, EmoLlamaConfig, dummy_batch
from emo_jax.models.vit import VisionConfig, VisionTransformer
from emo_jax.train import au_loss
from emo_jax.train import step as step_lib
from emo_jax.train import optimizer as opt_lib
from emo_jax.train import state as state_lib

VIT = VisionConfig(kind="clip", hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                   num_attention_heads=2, patch_size=4, image_size=16, feature_layer=-2)


def _detector(zero_init_out=True, **kw):
  vit = VisionTransformer(VIT, rngs=nnx.Rngs(0))
  cfg = au_former.AUFormerConfig(num_aus=3, bottleneck=4, head_hidden=8,
                                 zero_init_out=zero_init_out, **kw)
  return au_former.AUDetector(vit, au_former.build_head(cfg, vit, rngs=nnx.Rngs(1)))


def _pixels(n=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 16, 16, 3)), jnp.float32)


def test_shared_forward_gives_the_vits_own_features():
  both = nnx.jit(lambda d, x: (d(x), d.vision_tower(x)))
  x = _pixels()
  out, plain = both(_detector(zero_init_out=False), x)
  np.testing.assert_allclose(out.features, plain, rtol=1e-6, atol=1e-6)
  assert out.logits.shape == (2, 3)
  assert out.deep_logits.shape == (2, 2, 3)     # feature_layer=-2: 2 of 3 blocks run
  # Zero-initialised expert outputs: the adapted stream starts as the frozen one.
  out, plain = both(_detector(zero_init_out=True, visual_tokens="adapted"), x)
  np.testing.assert_allclose(out.features, plain, rtol=1e-6, atol=1e-6)
  # Trained (non-zero) experts change the adapted stream, not the frozen features.
  out, plain = both(_detector(zero_init_out=False, visual_tokens="adapted"), x)
  assert not np.allclose(out.features, plain, atol=1e-4)


def test_each_au_expert_has_its_own_weights():
  cfg = au_former.AUFormerConfig(num_aus=3, bottleneck=4, zero_init_out=False)
  group = au_former.MoKEGroup(8, cfg, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 1 + 16, 8)), jnp.float32)
  call = nnx.jit(lambda g, x: g(x))
  y0 = call(group, x)
  assert y0.shape == x.shape and np.all(np.asarray(y0[:, :, 0]) == 0)   # CLS slot untouched
  k = group.conv_in.kernel[...]
  group.conv_in.kernel[...] = k.at[1].add(1.0)              # AU 1's own kernel
  y1 = call(group, x)
  changed = [not np.allclose(y0[a], y1[a]) for a in range(3)]
  assert changed == [False, True, False]
  # And AU 1's expert reads only AU 1's input.
  y2 = call(group, x.at[2].add(1.0))
  assert np.allclose(y2[0], y1[0]) and np.allclose(y2[1], y1[1]) and not np.allclose(y2[2], y1[2])


def _loss_fn(model, batch):
  out = model(batch["pixels"])
  return au_loss.deep_supervised_sum(out.logits, out.deep_logits, batch["aus"],
                                     batch["weights"], au_loss.AULossConfig())


def test_frozen_backbone_gets_no_update_and_no_optimizer_state(zero_init_out=False):
  det = _detector(zero_init_out=zero_init_out)
  graphdef, params, rngs, frozen = state_lib.split_model(det, au_former.trainable_filter)
  paths = [opt_lib.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert paths and all(p.startswith("au_head/") for p in paths)
  assert all(opt_lib.path_str(p).startswith("vision_tower/")
             for p, _ in jax.tree_util.tree_leaves_with_path(frozen))
  tx = optax.adam(1e-2)
  state = state_lib.create_train_state(params, rngs, tx)
  opt_paths = {opt_lib.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)}
  assert not any("vision_tower" in p for p in opt_paths)
  labels = jnp.asarray([[1, 0, -1], [0, 1, 1]], jnp.int8)
  batch = {"pixels": _pixels(), "aus": labels, "weights": jnp.ones(3)}
  grads = jax.jit(jax.grad(
      lambda p: _loss_fn(nnx.merge(graphdef, p, rngs, frozen), batch)[0]))(params)
  flat = {opt_lib.path_str(p): np.abs(np.asarray(g)).sum()
          for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  if not zero_init_out:   # every AU-head parameter receives gradient
    assert all(v > 0 for v in flat.values()), [k for k, v in flat.items() if v == 0]
  step = jax.jit(lambda s, f, b: step_lib.train_step(graphdef, tx, _loss_fn, s, f, b))
  vit_before = jax.tree.map(np.array, frozen)
  head_before = jax.tree.map(np.array, params)
  for _ in range(2):
    state, m = step(state, frozen, batch)
  assert np.isfinite(float(m["loss"])) and float(m["tokens"]) == 5
  jax.tree.map(np.testing.assert_array_equal, vit_before, jax.tree.map(np.array, frozen))
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(head_before),
                                                    jax.tree.leaves(state.params))]
  assert all(moved) if not zero_init_out else sum(moved) >= len(moved) // 2


def test_on_the_emo_llama_vision_tower_one_forward_gives_tokens_and_aus():
  cfg = EmoLlamaConfig.tiny()
  model = EmoLlama(cfg, rngs=nnx.Rngs(0))
  head = au_former.build_head(au_former.AUFormerConfig(num_aus=5, bottleneck=2, head_hidden=4),
                              model.vision_tower, rngs=nnx.Rngs(3))
  batch = dummy_batch(cfg, [1, 2], num_frames=2)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  f = nnx.jit(lambda m, h, b: (au_former.visual_tokens_and_aus(m, h, b), m.encode_frames(b)))
  (tokens, logits), want = f(model, head, batch)
  np.testing.assert_allclose(tokens, want, rtol=1e-5, atol=1e-5)
  assert logits.shape == (2, 2, 5)


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match="ca_softmax"):
    au_former.AUFormerConfig(ca_softmax="rows")
  with pytest.raises(ValueError, match="outside"):
    au_former.build_head(au_former.AUFormerConfig(layers=(7,)),
                         VisionTransformer(VIT, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
  out = nnx.jit(lambda d, x: d(x))(_detector(ca_softmax="channels", layers=(1,)), _pixels())
  assert out.deep_logits.shape == (1, 2, 3)


@pytest.mark.parametrize("dilation", [1, 3])
def test_im2col_equals_grouped_dilated_conv(dilation):
  rng = np.random.default_rng(dilation)
  a, b, o, g = 3, 2, 4, 6
  x = jnp.asarray(rng.normal(size=(2, g, g, a, b)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(a, 9 * b, o)), jnp.float32)   # taps (i, j) major, then b
  got = jnp.einsum("nhwak,ako->nhwao", au_former._taps(x, dilation), w)
  # The same as lax's grouped convolution: kernel [3, 3, b, a * o] (HWIO, group-major).
  k = w.reshape(a, 3, 3, b, o).transpose(1, 2, 3, 0, 4).reshape(3, 3, b, a * o)
  want = jax.lax.conv_general_dilated(
      x.reshape(2, g, g, a * b), k, (1, 1), "SAME", rhs_dilation=(dilation, dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=a,
      precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(got.reshape(2, g, g, a * o), want, rtol=1e-4, atol=1e-4)
