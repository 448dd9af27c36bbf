"""LoRA: wrapping by regex, zero-init B, merge, dropout, and a LoRA-only AdamW train step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from emo_jax.models.llama import LlamaConfig, LlamaForCausalLM
from emo_jax.models.lora import (LoRALinear, apply_lora, lora_modules, merge_lora,
                                 trainable_filter)
from llama_testutil import make_lora_train_step

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


def _randomize_b(model, seed=0):
  key = jax.random.key(seed)
  for _, m in lora_modules(model):
    key, sub = jax.random.split(key)
    m.lora_b.set_value(0.05 * jax.random.normal(sub, m.lora_b[...].shape))


def test_apply_lora_defaults_targets_and_zero_init():
  model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 7)))
  before = model(ids)
  paths = apply_lora(model, rank=4, alpha=8, rngs=nnx.Rngs(1))
  assert len(paths) == 7 * CFG.num_hidden_layers
  assert "model.layers.1.mlp.down_proj" in paths and "lm_head" not in paths
  m = model.model.layers[0].self_attn.q_proj
  assert isinstance(m, LoRALinear) and m.scale == 2.0
  assert isinstance(m.lora_a, nnx.LoRAParam) and m.lora_a[...].shape == (32, 4)
  assert m.lora_b[...].shape == (4, 32) and not np.any(np.asarray(m.lora_b[...]))
  assert m.lora_a.get_metadata()["out_sharding"] == ("embed", "lora_rank")
  assert m.lora_b.get_metadata()["out_sharding"] == ("lora_rank", "heads")
  np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(before))


def test_regex_targets_and_typos():
  model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
  paths = apply_lora(model, rank=2, alpha=2, targets=[r"model\.layers\.0\.self_attn\.[qv]_proj"])
  assert paths == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
  with pytest.raises(ValueError, match="no nnx.Linear"):
    apply_lora(LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)), rank=2, alpha=2, targets=["qproj"])


@pytest.mark.parametrize("scan", [False, True])
def test_merge_matches_unmerged(scan):
  model = LlamaForCausalLM(CFG.replace(scan_layers=scan), rngs=nnx.Rngs(0))
  apply_lora(model, rank=4, alpha=16, rngs=nnx.Rngs(1))
  _randomize_b(model)
  ids = jnp.asarray(np.random.RandomState(1).randint(0, 64, (2, 7)))
  base_out = None
  lora_out = np.asarray(model(ids))
  merge_lora(model)
  assert not lora_modules(model)
  assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  assert isinstance(model.model.layers.self_attn.q_proj if scan
                    else model.model.layers[0].self_attn.q_proj, nnx.Linear)
  np.testing.assert_allclose(np.asarray(model(ids)), lora_out, atol=1e-5, rtol=0)
  del base_out


def test_dropout_only_in_train_mode():
  model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
  apply_lora(model, rank=4, alpha=8, dropout=0.5, targets=["q_proj", "v_proj"],
             rngs=nnx.Rngs(1))
  _randomize_b(model)
  ids = jnp.asarray(np.random.RandomState(2).randint(0, 64, (1, 5)))
  train_a, train_b = np.asarray(model(ids)), np.asarray(model(ids))
  assert not np.allclose(train_a, train_b)
  model.eval()
  np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model(ids)))
  # Scanned layers: dropout streams are threaded through the scan; jitted training works.
  scanned = LlamaForCausalLM(CFG.replace(scan_layers=True), rngs=nnx.Rngs(0))
  apply_lora(scanned, rank=4, alpha=8, dropout=0.5, targets=["q_proj", "v_proj"],
             rngs=nnx.Rngs(1))
  _randomize_b(scanned)
  fwd = nnx.jit(lambda m, x: m(x))
  a, b = np.asarray(fwd(scanned, ids)), np.asarray(fwd(scanned, ids))
  assert not np.allclose(a, b)
  scanned.eval()
  np.testing.assert_array_equal(np.asarray(fwd(scanned, ids)), np.asarray(fwd(scanned, ids)))


def test_train_step_updates_only_lora():
  model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
  apply_lora(model, rank=4, alpha=8, rngs=nnx.Rngs(1))
  graphdef, trainable, frozen = nnx.split(model, trainable_filter(), ...)
  assert all(isinstance(v, nnx.LoRAParam) for _, v in trainable.flat_state())
  n_lora = len(trainable.flat_state())
  assert n_lora == 2 * 7 * CFG.num_hidden_layers
  tx = optax.adamw(1e-2, weight_decay=0.01)
  opt_state = tx.init(trainable)
  # Frozen weights get no optimizer state: adam holds mu and nu for the LoRA leaves only.
  assert len(jax.tree.leaves(opt_state)) == 2 * n_lora + 1
  rng = np.random.RandomState(3)
  batch = {"input_ids": jnp.asarray(rng.randint(0, 64, (2, 8)), jnp.int32),
           "attention_mask": jnp.asarray([[1] * 8, [0, 0] + [1] * 6], jnp.int32),
           "loss_mask": jnp.asarray([[0] * 4 + [1] * 4, [0] * 5 + [1] * 3], jnp.int32)}
  step = jax.jit(make_lora_train_step(graphdef, tx))
  frozen_before = jax.tree.map(np.array, frozen)
  lora_before = jax.tree.map(np.array, trainable)
  new_tr, opt_state, loss1 = step(trainable, frozen, opt_state, batch)
  new_tr, opt_state, loss2 = step(new_tr, frozen, opt_state, batch)
  assert np.isfinite(loss1) and loss2 < loss1
  changed = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(lora_before), jax.tree.leaves(new_tr))]
  assert all(changed)
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_trainable_filter_patterns():
  model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
  apply_lora(model, rank=2, alpha=2, targets=["q_proj"], rngs=nnx.Rngs(1))
  filt = trainable_filter({"lora": True, "patterns": [r"^model\.norm\."]})
  paths = {".".join(map(str, p)) for p, _ in nnx.state(model, filt).flat_state()}
  assert "model.norm.weight" in paths
  assert "model.layers.0.self_attn.q_proj.lora_a" in paths
  assert "model.layers.0.self_attn.q_proj.kernel" not in paths
  only_norm = trainable_filter([r"norm"], lora=False)
  assert all("norm" in ".".join(map(str, p))
             for p, _ in nnx.state(model, only_norm).flat_state())


def test_low_rank_update_custom_gradient_matches_autodiff():
  """The hand-written backward of (x a) b equals plain autodiff for a [B, T, in] input."""
  from emo_jax.models.lora import low_rank_update
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (3, 7, 12))
  a = jax.random.normal(k[1], (12, 4))
  b = jax.random.normal(k[2], (4, 9))
  g = jax.random.normal(k[3], (3, 7, 9))

  def plain(x, a, b):
    return jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x, a), b)

  np.testing.assert_allclose(np.asarray(low_rank_update(x, a, b)), np.asarray(plain(x, a, b)),
                             rtol=1e-5, atol=1e-5)
  got = jax.grad(lambda *p: jnp.sum(low_rank_update(*p) * g), argnums=(0, 1, 2))(x, a, b)
  want = jax.grad(lambda *p: jnp.sum(plain(*p) * g), argnums=(0, 1, 2))(x, a, b)
  for u, w in zip(got, want):
    assert u.shape == w.shape
    np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=1e-4, atol=1e-4)
