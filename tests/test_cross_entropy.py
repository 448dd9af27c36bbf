"""Chunked LM-head cross entropy (layers.linear_cross_entropy) against the full-logits loss
(torch.nn.functional.cross_entropy as the reference) and against the model's own logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from emo_jax.models.layers import linear_cross_entropy
from emo_jax.models.llama import LlamaConfig, LlamaForCausalLM
from emo_jax.models.lora import apply_lora


def _data(b=2, t=37, d=16, v=50, seed=0):
  rng = np.random.RandomState(seed)
  h = rng.randn(b, t, d).astype(np.float32)
  w = (0.5 * rng.randn(d, v)).astype(np.float32)
  targets = rng.randint(0, v, (b, t)).astype(np.int32)
  weights = (rng.rand(b, t) > 0.3).astype(np.float32)
  return h, w, targets, weights


def _torch_reference(h, w, targets, weights):
  th = torch.tensor(h, dtype=torch.float64, requires_grad=True)
  tw = torch.tensor(w, dtype=torch.float64, requires_grad=True)
  logits = th @ tw
  nll = torch.nn.functional.cross_entropy(logits.reshape(-1, w.shape[1]),
                                          torch.tensor(targets.reshape(-1), dtype=torch.long),
                                          reduction="none")
  loss = (nll * torch.tensor(weights.reshape(-1), dtype=torch.float64)).sum()
  loss.backward()
  correct = ((logits.argmax(-1).numpy() == targets) * weights).sum()
  return float(loss.detach()), float(correct), th.grad.numpy(), tw.grad.numpy()


@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_matches_torch_cross_entropy_values_and_gradients(layout, chunk):
  h, w, targets, weights = _data()
  ref_loss, ref_correct, ref_dh, ref_dw = _torch_reference(h, w, targets, weights)
  kernel = w if layout == "dv" else w.T

  def f(h, k):
    return linear_cross_entropy(h, k, jnp.asarray(targets), jnp.asarray(weights), chunk=chunk,
                                kernel_layout=layout)

  nll, correct = jax.jit(f)(h, kernel)
  np.testing.assert_allclose(float(nll), ref_loss, rtol=1e-5)
  assert float(correct) == ref_correct
  dh, dk = jax.jit(jax.grad(lambda h, k: 2.5 * f(h, k)[0], argnums=(0, 1)))(h, kernel)
  np.testing.assert_allclose(np.asarray(dh), 2.5 * ref_dh, atol=2e-5)
  dw = np.asarray(dk) if layout == "dv" else np.asarray(dk).T
  np.testing.assert_allclose(dw, 2.5 * ref_dw, atol=2e-5)


def test_frozen_kernel_gradient_in_h_only_and_weights_not_differentiable():
  h, w, targets, weights = _data(t=20)
  _, _, ref_dh, _ = _torch_reference(h, w, targets, weights)
  dh = jax.jit(jax.grad(lambda h: linear_cross_entropy(
    h, jnp.asarray(w), jnp.asarray(targets), jnp.asarray(weights), chunk=6)[0]))(h)
  np.testing.assert_allclose(np.asarray(dh), ref_dh, atol=2e-5)
  with pytest.raises(ValueError, match="weights"):
    jax.grad(lambda wt: linear_cross_entropy(jnp.asarray(h), jnp.asarray(w),
                                             jnp.asarray(targets), wt)[0])(jnp.asarray(weights))


@pytest.mark.parametrize("lora_head", [False, True])
def test_greedy_correct_counts_a_tie_for_the_maximum(lora_head):
  """Vocab ids 3 and 7 get identical logit columns, so every position ties between them; a
  target of either counts as correct (argmax would only credit 3), a target elsewhere never
  does, in the fused path and in the full-logits path of a LoRA-adapted head."""
  h, w, _, _ = _data(b=1, t=6, d=8, v=12, seed=4)
  h = np.abs(h)
  w[:, 3] = w[:, 7] = 10.0 * np.abs(w).max()  # h . w3 = h . w7 > |h . w_c| for every other c
  targets = np.array([[3, 7, 7, 3, 0, 11]], np.int32)
  weights = np.ones((1, 6), np.float32)
  if lora_head:
    cfg = LlamaConfig(vocab_size=12, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    model.lm_head.kernel[...] = jnp.asarray(w)
    apply_lora(model, rank=2, alpha=2, targets=("lm_head",), rngs=nnx.Rngs(1))  # B = 0
    _, correct = model.cross_entropy(jnp.asarray(h), jnp.asarray(targets), jnp.asarray(weights))
  else:
    _, correct = linear_cross_entropy(h, w, targets, weights, chunk=4)
  logits = h[0] @ w
  assert np.all(logits[:, 3] == logits[:, 7]) and np.all(logits.argmax(-1) == 3)
  assert float(correct) == 4.0


def test_bad_shapes_raise():
  h, w, targets, weights = _data()
  with pytest.raises(ValueError, match="hidden size"):
    linear_cross_entropy(h, w.T, targets, weights)  # [V, D] given as 'dv'
  with pytest.raises(ValueError, match="targets"):
    linear_cross_entropy(h, w, targets[:, :-1], weights)
  with pytest.raises(ValueError, match="chunk"):
    linear_cross_entropy(h, w, targets, weights, chunk=0)


@pytest.mark.parametrize("variant", ["untied", "tied", "lora_head"])
def test_model_cross_entropy_equals_full_logits(variant):
  cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    tie_word_embeddings=variant == "tied")
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  if variant == "lora_head":
    apply_lora(model, rank=4, alpha=8, targets=("lm_head",), rngs=nnx.Rngs(1))
    b = model.lm_head.lora_b
    b[...] = 0.1 * jax.random.normal(jax.random.key(3), b[...].shape)
  rng = np.random.RandomState(1)
  ids = jnp.asarray(rng.randint(0, 64, (3, 19)), jnp.int32)
  weights = jnp.asarray(rng.rand(3, 18) > 0.2, jnp.float32)

  def fused(m):
    h, _ = m.model(ids)
    return m.cross_entropy(h[:, :-1], ids[:, 1:], weights, chunk=5)

  def full(m):
    logits = m(ids)[:, :-1]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids[:, 1:, None], -1)[..., 0]
    correct = jnp.sum((jnp.argmax(logits, -1) == ids[:, 1:]) * weights)
    return jnp.sum(nll * weights), correct

  (a, ca), (b_, cb) = fused(model), full(model)
  np.testing.assert_allclose(float(a), float(b_), rtol=1e-5)
  assert float(ca) == float(cb)
  ga = nnx.grad(lambda m: fused(m)[0])(model)
  gb = nnx.grad(lambda m: full(m)[0])(model)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_causal_lm_ce_sum_equals_full_logits_token_ce_sum():
  from emo_jax.train import step as step_lib
  cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(2)
  ids = rng.randint(0, 64, (2, 15)).astype(np.int32)
  attn = np.ones_like(ids)
  attn[1, :4] = 0                       # left padding
  ids[1, :4] = -100                     # pad ids may be negative
  loss_mask = (rng.rand(2, 15) > 0.4).astype(np.int32) * attn
  ids, attn, loss_mask = map(jnp.asarray, (ids, attn, loss_mask))
  got = step_lib.causal_lm_ce_sum(model, ids, attn, loss_mask, chunk=4)
  want = step_lib.token_ce_sum(model(jnp.maximum(ids, 0), attention_mask=attn), ids, loss_mask)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  assert float(got[1]) == float(want[1]) > 0
