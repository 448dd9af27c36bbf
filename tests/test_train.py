"""Train step: accumulation == whole batch, frozen groups hold no optimizer state,
per-group learning rates, and the (2, 2, 2)-mesh step == the single-device step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from emo_jax.train import optimizer as opt_lib
from emo_jax.train import state as state_lib
from emo_jax.train import step as step_lib


class TinyLM(nnx.Module):
  """Embedding -> 2 dense layers -> vocab; `frozen_proj` stands for a frozen tower."""

  def __init__(self, vocab=32, dim=16, *, rngs):
    self.embed_tokens = nnx.Embed(vocab, dim, rngs=rngs)
    self.frozen_proj = nnx.Linear(dim, dim, rngs=rngs)
    self.mlp = nnx.Linear(dim, dim, rngs=rngs)
    self.lm_head = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

  def __call__(self, ids):
    h = self.embed_tokens(jnp.maximum(ids, 0))
    h = jnp.tanh(self.frozen_proj(h))
    h = h + jnp.tanh(self.mlp(h))
    return self.lm_head(h)


def loss_fn(model, batch):
  return step_lib.token_ce_sum(model(batch["input_ids"]), batch["input_ids"],
                               batch["loss_mask"])


def trainable(path, var):
  return isinstance(var, nnx.Param) and "frozen_proj" not in "/".join(map(str, path))


def make_batch(b=8, t=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 32, size=(b, t)).astype(np.int32)
  mask = (rng.random((b, t)) < 0.6).astype(np.int32)   # uneven tokens per row
  return {"input_ids": ids, "loss_mask": mask}


OPT = dict(lr=1e-2, warmup_frac=0.0, weight_decay=0.01, grad_clip=1.0,
           groups=[("head", r"lm_head", 3e-2)])


def setup(seed=0):
  model = TinyLM(rngs=nnx.Rngs(seed))
  graphdef, params, rngs, frozen = state_lib.split_model(model, trainable)
  tx, _ = opt_lib.make_optimizer(OPT, 10, params)
  return graphdef, tx, state_lib.create_train_state(params, rngs, tx), frozen


def test_frozen_params_get_no_optimizer_state_and_stay_fixed():
  graphdef, tx, state, frozen = setup()
  n_opt = opt_lib.count_params(state.opt_state)
  n_train = opt_lib.count_params(state.params)
  # AdamW: mu + nu for each trainable leaf (+ scalar counts); nothing for frozen_proj.
  assert n_train > 0 and n_opt < 2 * n_train + 16
  assert "frozen_proj" not in str(jax.tree_util.tree_structure(state.opt_state))
  before = jax.tree.map(np.asarray, frozen)
  fn = step_lib.jit_train_step(graphdef, tx, loss_fn, donate=False)
  new, m = fn(state, frozen, make_batch())
  assert np.isfinite(float(m["loss"]))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, frozen))
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         state.params, new.params)
  assert all(jax.tree.leaves(changed))


def test_group_labels_and_learning_rates():
  graphdef, tx, state, frozen = setup()
  labels = opt_lib.group_labels(state.params, OPT["groups"])
  flat = {opt_lib.path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(labels)}
  assert flat["lm_head/kernel"] == "head" and flat["mlp/kernel"] == "default"
  _, scheds = opt_lib.make_optimizer(OPT, 10, state.params)
  assert float(scheds["head"](0)) == pytest.approx(3e-2)
  sched = opt_lib.warmup_cosine(1.0, 100, 0.03)
  assert float(sched(0)) == 0.0 and float(sched(3)) == pytest.approx(1.0)
  assert float(sched(100)) == pytest.approx(0.0, abs=1e-6)


def test_accumulation_equals_whole_batch():
  # Plain SGD, so the param change *is* the gradient (Adam's g/|g| would amplify fp32
  # rounding of near-zero gradients and hide what is compared).
  graphdef, _, state, frozen = setup()
  tx = optax.sgd(1.0)
  state = state_lib.create_train_state(state.params, state.rngs, tx)
  batch = make_batch(b=8)
  one = step_lib.jit_train_step(graphdef, tx, loss_fn, donate=False)
  four = step_lib.jit_train_step(graphdef, tx, loss_fn, accum_steps=4, donate=False)
  s1, m1 = one(state, frozen, batch)
  s4, m4 = four(state, frozen, batch)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  assert float(m1["tokens"]) == float(m4["tokens"]) == batch["loss_mask"][:, 1:].sum()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               s1.params, s4.params)
  # The step really moved the params (the comparison above is not vacuous).
  delta = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), state.params, s1.params)
  assert max(jax.tree.leaves(delta)) > 1e-3


def test_bf16_compute_close_to_fp32():
  graphdef, tx, state, frozen = setup()
  f32 = step_lib.jit_train_step(graphdef, tx, loss_fn, donate=False)
  bf16 = step_lib.jit_train_step(graphdef, tx, loss_fn, compute_dtype=jnp.bfloat16,
                                 donate=False)
  (s1, m1), (s2, m2) = f32(state, frozen, make_batch()), bf16(state, frozen, make_batch())
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=2e-2)
  # Master params stay fp32.
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s2.params))


def test_mesh_2x2x2_step_equals_single_device():
  from emo_jax import sharding as sharding_lib
  from emo_jax.models.llama import LlamaConfig, LlamaForCausalLM
  assert len(jax.devices()) >= 8, "conftest should give 8 fake CPU devices"
  cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))

  def llm_loss(m, b):
    return step_lib.token_ce_sum(m(b["input_ids"], attention_mask=b["attention_mask"]),
                                 b["input_ids"], b["loss_mask"])

  def not_embed(path, var):   # embeddings frozen, the rest trained
    return isinstance(var, nnx.Param) and "embed_tokens" not in "/".join(map(str, path))

  graphdef, params, rngs, frozen = state_lib.split_model(model, not_embed)
  tx, _ = opt_lib.make_optimizer(dict(lr=1e-2, warmup_frac=0.0), 10, params)
  state = state_lib.create_train_state(params, rngs, tx)
  b = make_batch(b=8, t=16)
  b["input_ids"] = b["input_ids"] * 2
  b["attention_mask"] = np.ones_like(b["input_ids"])
  b["attention_mask"][:, :3] = 0   # left padding
  ref_state, ref_m = step_lib.jit_train_step(graphdef, tx, llm_loss, accum_steps=2,
                                              donate=False)(state, frozen, b)

  mesh = sharding_lib.make_mesh((2, 2, 2))
  rules = sharding_lib.RULES_FSDP_TP
  s_sh, f_sh = sharding_lib.state_and_frozen_shardings(state, frozen, mesh, rules)
  d_sh = sharding_lib.batch_sharding(mesh)
  sstate = jax.device_put(state, s_sh)
  sfrozen = jax.device_put(frozen, f_sh)
  sb = jax.device_put(b, d_sh)
  # Some weight really is split over the mesh.
  specs = [x.sharding.spec for x in jax.tree.leaves(sstate.params)]
  assert any(any(a is not None for a in spec) for spec in specs)
  fn = step_lib.jit_train_step(graphdef, tx, llm_loss, state_shardings=s_sh,
                               frozen_shardings=f_sh, batch_sharding=d_sh, accum_steps=2)
  with sharding_lib.use_mesh_rules(mesh, rules):
    new_state, m = fn(sstate, sfrozen, sb)
  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5)
  np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=1e-4)
  # Adam's first update is ~lr * sign(g): near-zero gradients flip with fp32 reduction
  # order, so params are compared to 2% of one lr step (loss / grad norm above are tight).
  jax.tree.map(lambda a, r: np.testing.assert_allclose(np.asarray(a), np.asarray(r),
                                                       rtol=0, atol=2e-4),
               new_state.params, ref_state.params)
  out_specs = [x.sharding.spec for x in jax.tree.leaves(new_state.params)]
  assert out_specs == specs   # the step keeps the state's layout (donation-compatible)
