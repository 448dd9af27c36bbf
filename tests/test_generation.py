"""KV-cache generation: greedy parity with HF generate on a left-padded batch, sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from emo_jax.convert import hf
from emo_jax.models import generation
from emo_jax.models.generation import GreedyConfig, SamplingConfig, filter_logits, generate
from llama_testutil import left_padded_batch, make_hf


def test_greedy_matches_hf_generate_on_padded_batch(tmp_path):
  ref = make_hf(tmp_path, num_key_value_heads=2, max_position_embeddings=128)
  model = hf.load_llama(tmp_path)
  ids, mask = left_padded_batch(np.random.RandomState(0), [9, 5, 2], 9, 96)
  n = 32
  with torch.no_grad():
    want = ref.generate(torch.as_tensor(ids, dtype=torch.long),
                        attention_mask=torch.as_tensor(mask), max_new_tokens=n, do_sample=False,
                        eos_token_id=2, pad_token_id=0).numpy()[:, ids.shape[1]:]
  cache_before = generation._jitted(jax.default_backend())._cache_size()
  got = np.asarray(generate(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                            max_new_tokens=n, eos_token_id=2, pad_token_id=0))
  assert got.shape == (3, n) and got.dtype == np.int32
  # HF stops once every row has emitted EOS; our output is pad-filled to n.
  np.testing.assert_array_equal(got[:, :want.shape[1]], want)
  assert np.all(got[:, want.shape[1]:] == 0)
  # Same tokens from the embedding prefix; a second batch of equal shapes does not recompile.
  emb = model.model.embed_tokens(jnp.asarray(ids))
  got_emb = generate(model, inputs_embeds=emb, attention_mask=jnp.asarray(mask),
                     max_new_tokens=n, eos_token_id=2, pad_token_id=0)
  np.testing.assert_array_equal(np.asarray(got_emb), got)
  size = generation._jitted(jax.default_backend())._cache_size()
  generate(model, jnp.asarray(ids[::-1].copy()), attention_mask=jnp.asarray(mask[::-1].copy()),
           max_new_tokens=n, eos_token_id=2, pad_token_id=0)
  assert generation._jitted(jax.default_backend())._cache_size() == size == cache_before + 2


def test_eos_stops_row_and_pads(tmp_path):
  make_hf(tmp_path)
  model = hf.load_llama(tmp_path)
  ids = jnp.asarray(np.random.RandomState(1).randint(3, 96, (2, 4)), jnp.int32)
  free = np.asarray(generate(model, ids, max_new_tokens=6, eos_token_id=None, pad_token_id=0))
  eos = int(free[0, 1])  # make row 0's second token the EOS
  out = np.asarray(generate(model, ids, max_new_tokens=6, eos_token_id=[eos], pad_token_id=95))
  np.testing.assert_array_equal(out[0, :2], free[0, :2])
  assert np.all(out[0, 2:] == 95)
  stop = list(free[1]).index(eos) if eos in free[1] else 6
  np.testing.assert_array_equal(out[1, :stop + 1], free[1, :stop + 1])


def test_filter_logits_top_k_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  neg = np.finfo(np.float32).min
  k2 = np.asarray(filter_logits(logits, SamplingConfig(top_k=2)))
  assert np.all(k2[0, 2:] == neg) and np.all(k2[0, :2] > neg)
  p = np.asarray(filter_logits(logits, SamplingConfig(top_p=0.7)))  # 0.5 + 0.3 >= 0.7
  assert np.all(p[0, :2] > neg) and np.all(p[0, 2:] == neg)
  p1 = np.asarray(filter_logits(logits[:, ::-1], SamplingConfig(top_p=0.4)))
  assert np.sum(p1 > neg) == 1 and p1[0, 3] > neg
  t = np.asarray(filter_logits(logits, SamplingConfig(temperature=2.0)))
  np.testing.assert_allclose(t, np.asarray(logits) / 2, rtol=1e-6)


def test_sampling_respects_top_k_and_is_seeded(tmp_path):
  make_hf(tmp_path)
  model = hf.load_llama(tmp_path)
  ids = jnp.asarray(np.random.RandomState(2).randint(3, 96, (2, 4)), jnp.int32)
  greedy = np.asarray(generate(model, ids, max_new_tokens=5, sampling=GreedyConfig()))
  top1 = generate(model, ids, max_new_tokens=5, sampling=SamplingConfig(top_k=1),
                  rng=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(top1), greedy)
  cfg = SamplingConfig(temperature=1.5, top_k=20, top_p=0.9)
  a = generate(model, ids, max_new_tokens=5, sampling=cfg, rng=jax.random.key(1))
  b = generate(model, ids, max_new_tokens=5, sampling=cfg, rng=jax.random.key(1))
  c = generate(model, ids, max_new_tokens=5, sampling=cfg, rng=jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_row_sampling_mixes_greedy_sampled_and_budgets(tmp_path):
  """One program for a batch of rows with their own settings: greedy rows equal
  GreedyConfig, a near-zero nucleus equals greedy, budgets pad after the row's last token,
  and sampled rows with the same settings and key equal SamplingConfig's."""
  from emo_jax.models.generation import RowSampling
  make_hf(tmp_path)
  model = hf.load_llama(tmp_path)
  ids = jnp.asarray(np.random.RandomState(3).randint(3, 96, (4, 5)), jnp.int32)
  n = 6
  greedy = np.asarray(generate(model, ids, max_new_tokens=n, eos_token_id=None, pad_token_id=0))
  rows = RowSampling(temperature=np.asarray([0.0, 0.8, 0.0, 1.5], np.float32),
                     top_p=np.asarray([1.0, 1e-6, 1.0, 1.0], np.float32),
                     max_new_tokens=np.asarray([n, n, 3, n], np.int32))
  got = np.asarray(generate(model, ids, max_new_tokens=n, eos_token_id=None, pad_token_id=0,
                            rows=rows, rng=jax.random.key(5)))
  np.testing.assert_array_equal(got[0], greedy[0])
  np.testing.assert_array_equal(got[1], greedy[1])          # nucleus of one token
  np.testing.assert_array_equal(got[2, :3], greedy[2, :3])  # budget of 3, then padding
  assert np.all(got[2, 3:] == 0)
  # All rows at temperature 1.5, top-p 1: the same draws as SamplingConfig with that key.
  same = RowSampling(temperature=np.full(4, 1.5, np.float32), top_p=np.ones(4, np.float32),
                     max_new_tokens=np.full(4, n, np.int32))
  a = generate(model, ids, max_new_tokens=n, eos_token_id=None, pad_token_id=0, rows=same,
               rng=jax.random.key(7))
  b = generate(model, ids, max_new_tokens=n, eos_token_id=None, pad_token_id=0,
               sampling=SamplingConfig(temperature=1.5), rng=jax.random.key(7))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), greedy)
