"""LLaMA decoder parity with transformers' LlamaForCausalLM (fp32, torch CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax.convert import hf
from emo_jax.models.llama import LlamaConfig, LlamaForCausalLM
from llama_testutil import hf_logits, left_padded_batch, make_hf

TOL = 1e-4

CASES = {
  "mha": {},
  "gqa_bias": dict(num_key_value_heads=2, attention_bias=True),
  "mqa": dict(num_key_value_heads=1, head_dim=16),
  "llama3": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=8)),
  "linear": dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
  "dynamic": dict(max_position_embeddings=8, rope_scaling=dict(rope_type="dynamic", factor=2.0)),
  "tied": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
  ref = make_hf(tmp_path, **CASES[case])
  # attention_chunk=5 also exercises the blockwise causal path with a ragged last block.
  model = hf.load_llama(tmp_path, dtype=jnp.float32, attention_chunk=5)
  ids = np.random.RandomState(1).randint(0, 96, (2, 12))
  out = model(jnp.asarray(ids, jnp.int32))
  assert out.shape == (2, 12, 96) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), hf_logits(ref, ids), atol=TOL, rtol=0)
  if case == "tied":
    assert model.lm_head is None


def test_padded_batch_with_mask(tmp_path):
  ref = make_hf(tmp_path, num_key_value_heads=2)
  model = hf.load_llama(tmp_path, attention_chunk=0)
  ids, mask = left_padded_batch(np.random.RandomState(2), [10, 6, 3], 10, 96)
  out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  # HF's forward numbers left-padded rows from the first slot; generate() uses
  # cumsum(mask) - 1, our default. Give HF those positions explicitly.
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  want = hf_logits(ref, ids, mask, pos)
  valid = mask.astype(bool)
  np.testing.assert_allclose(out[valid], want[valid], atol=TOL, rtol=0)
  # Right padding: positions agree with HF's defaults; compare without explicit positions.
  rids, rmask = ids[:, ::-1].copy(), mask[:, ::-1].copy()
  rout = np.asarray(model(jnp.asarray(rids), attention_mask=jnp.asarray(rmask)))
  np.testing.assert_allclose(rout[rmask.astype(bool)],
                             hf_logits(ref, rids, rmask)[rmask.astype(bool)], atol=TOL, rtol=0)
  chunked = hf.load_llama(tmp_path, attention_chunk=4)
  np.testing.assert_allclose(np.asarray(chunked(jnp.asarray(ids), attention_mask=jnp.asarray(
    mask)))[valid], out[valid], atol=1e-5, rtol=0)
  # Each padded row equals the same prompt run alone, unpadded.
  alone = np.asarray(model(jnp.asarray(ids[2:, -3:])))
  np.testing.assert_allclose(out[2, -3:], alone[0], atol=1e-5, rtol=0)


def test_inputs_embeds_scan_remat_and_cache_agree(tmp_path):
  ref = make_hf(tmp_path, num_key_value_heads=2)
  ids = np.random.RandomState(3).randint(0, 96, (2, 9))
  want = hf_logits(ref, ids)
  model = hf.load_llama(tmp_path, remat_policy="dots")
  emb = model.model.embed_tokens(jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(model(inputs_embeds=emb)), want, atol=TOL, rtol=0)
  scanned = hf.load_llama(tmp_path, scan_layers=True, remat_policy="full")
  assert scanned.model.layers.self_attn.q_proj.kernel[...].shape == (2, 32, 32)
  grad_fn = jax.jit(jax.grad(lambda m, x: jnp.sum(m(x) ** 2)))
  assert np.all(np.isfinite(jax.tree.leaves(grad_fn(scanned, jnp.asarray(ids)))[0]))
  for m in (model, scanned):
    np.testing.assert_allclose(np.asarray(m(jnp.asarray(ids))), want, atol=TOL, rtol=0)
    cache = m.init_cache(2, 16)
    call = jax.jit(lambda m, x, c: m(x, cache=c))  # one compile for the prefill, one per step
    logits, cache = call(m, jnp.asarray(ids[:, :6]), cache)
    steps = [logits]
    for t in range(6, 9):
      logits, cache = call(m, jnp.asarray(ids[:, t:t + 1]), cache)
      steps.append(logits)
    assert int(cache["index"]) == 9
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], 1), want,
                               atol=TOL, rtol=0)


def test_config_reads_legacy_and_v5_rope_keys():
  legacy = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2, rope_theta=5e5,
                rope_scaling={"type": "linear", "factor": 16.0})
  cfg = LlamaConfig.from_hf_dict(legacy)
  assert cfg.rope_theta == 5e5 and dict(cfg.rope_scaling) == {"rope_type": "linear",
                                                               "factor": 16.0}
  assert cfg.num_key_value_heads == 2 and cfg.head_dim == 4
  v5 = dict(legacy, rope_scaling=None, rope_theta=None,
            rope_parameters={"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192})
  cfg = LlamaConfig.from_hf_dict(v5)
  assert cfg.rope_theta == 1e6 and cfg.rope_scaling["rope_type"] == "llama3"
  default = LlamaConfig.from_hf_dict(dict(legacy, rope_scaling=None, rope_theta=None,
                                          rope_parameters={"rope_type": "default",
                                                           "rope_theta": 1234.0}))
  assert default.rope_theta == 1234.0 and default.rope_scaling is None
  assert LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
  with pytest.raises(ValueError, match="not a LLaMA config"):
    LlamaConfig.from_hf_dict({"model_type": "bert", "hidden_size": 8})
  with pytest.raises(ValueError, match="unsupported rope"):
    LlamaConfig.from_hf_dict(dict(legacy, rope_scaling={"type": "yarn2", "factor": 2.0}))


def test_weights_carry_logical_axes():
  model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       scan_layers=True), rngs=nnx.Rngs(0))
  names = {".".join(map(str, p)): v.get_metadata().get("out_sharding")
           for p, v in nnx.state(model, nnx.Param).flat_state()}
  assert names["model.embed_tokens.embedding"] == ("vocab", "embed")
  assert names["model.layers.self_attn.q_proj.kernel"] == ("layers", "embed", "heads")
  assert names["model.layers.mlp.down_proj.kernel"] == ("layers", "mlp", "embed")
  assert names["lm_head.kernel"] == ("embed", "vocab")
  assert all(v is not None for v in names.values())


def test_bad_inputs_raise():
  model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                       num_hidden_layers=1, num_attention_heads=2),
                           rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="exactly one"):
    model()
  with pytest.raises(ValueError, match="attention_mask shape"):
    model(jnp.zeros((2, 3), jnp.int32), attention_mask=jnp.ones((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="multiple"):
    LlamaConfig(num_attention_heads=4, num_key_value_heads=3)


def test_bf16_compute_with_fp32_params(tmp_path):
  ref = make_hf(tmp_path, num_key_value_heads=2)
  ids = np.random.RandomState(4).randint(0, 96, (2, 8))
  model = hf.load_llama(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  assert model.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32
  logits, hidden = model(jnp.asarray(ids), return_hidden=True)
  assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  err = np.abs(np.asarray(logits) - hf_logits(ref, ids)).max()
  assert 0 < err < 5e-2


def test_blockwise_attention_gradients_match_all_keys():
  """LoRA gradients through the blockwise causal attention (heads-major blocks, ragged last
  block, GQA, left and right padding) equal those through attention over all keys."""
  from emo_jax.models.lora import apply_lora, trainable_filter
  rng = np.random.RandomState(4)
  ids = jnp.asarray(rng.randint(0, 96, (3, 40)), jnp.int32)
  mask = np.ones((3, 40), np.int32)
  mask[1, 29:] = 0  # right padding
  mask[2, :7] = 0   # left padding
  mask = jnp.asarray(mask)
  # Only real next-token pairs count (a pad slot's output is meaningless by contract).
  weights = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)

  def lora_grads(chunk):
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_chunk=chunk)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, rank=4, alpha=8, rngs=nnx.Rngs(1))
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(), ...)
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)  # B != 0: every factor gets a grad

    def loss(tr):
      m = nnx.merge(graphdef, tr, frozen)
      h, _ = m.model(ids, attention_mask=mask)
      return m.cross_entropy(h[:, :-1], ids[:, 1:], weights)[0]
    return jax.tree.leaves(jax.grad(loss)(trainable))

  full = lora_grads(0)
  for chunk in (16, 7):
    for g_full, g_block in zip(full, lora_grads(chunk)):
      scale = float(np.max(np.abs(g_full)))
      assert scale > 0
      # fp32 summation order alone gives up to ~2e-5 of the leaf's scale here.
      np.testing.assert_allclose(np.asarray(g_block), np.asarray(g_full), atol=1e-4 * scale,
                                 rtol=0)
