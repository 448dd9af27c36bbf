"""Post-training: DPO loss (ln 2 at the reference, torch parity of loss and gradients, one
media encoding per pair), GRPO advantages and loss against numpy, rewards, preference data
(counted skips, ambiguity-aware pairs), LoRA switched off as the reference, micro-batching."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from emo_llama_testutil import cfg, model  # noqa: F401  (fixtures)
from emo_jax.models import lora as lora_lib
from emo_jax.models.emo_llama import EmoLlama, EmoLlamaConfig, dummy_batch
from emo_jax.posttrain import data as data_lib
from emo_jax.posttrain import dpo as dpo_lib
from emo_jax.posttrain import grpo as grpo_lib
from emo_jax.posttrain import logps as logps_lib
from emo_jax.posttrain import reference as ref_lib
from emo_jax.posttrain import rewards as rewards_lib
from emo_jax.train import state as state_lib
from emo_jax.train import step as step_lib
from input_pipeline.records import Record, SkipCounter

FRAMES = (1, 2, 3, 2)
F_MAX = 3


def _pair_batch(cfg, seed=0):
  """Media of 4 prompts; chosen = dummy_batch's answer, rejected = other answer tokens."""
  b = dummy_batch(cfg, FRAMES, num_frames=F_MAX, seed=seed)
  rng = np.random.default_rng(seed + 100)
  chosen = b["input_ids"]
  rejected = np.where(b["loss_mask"] > 0,
                      rng.integers(3, cfg.llm.vocab_size, size=chosen.shape), chosen)
  out = {k: b[k] for k in logps_lib.MEDIA_KEYS if k in b}
  out["seq_input_ids"] = np.stack([chosen, rejected], 1).astype(np.int32)
  out["seq_attention_mask"] = np.stack([b["attention_mask"]] * 2, 1)
  out["seq_loss_mask"] = np.stack([b["loss_mask"]] * 2, 1)
  out["pair_valid"] = np.ones((len(FRAMES),), np.int32)
  return out, b


def _row_batch(b, ids):
  return dict(b, input_ids=ids)


def _seq_logp_direct(model, b, ids):
  """Reference: the plain forward of one answer per row (media encoded per answer)."""
  logits = np.asarray(model(_row_batch(b, ids)), np.float64)[:, :-1]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  tgt = ids[:, 1:]
  w = b["loss_mask"][:, 1:]
  return (np.take_along_axis(logp, np.maximum(tgt, 0)[..., None], -1)[..., 0] * w).sum(-1)


def test_pair_logps_share_one_media_encoding_and_equal_separate_forwards(cfg, model):
  pb, b = _pair_batch(cfg)
  calls = []
  orig = EmoLlama.encode_frames

  def counting(self, batch):
    calls.append(np.asarray(batch["frames"]).shape[0])
    return orig(self, batch)
  EmoLlama.encode_frames = counting
  try:
    s, n, _ = logps_lib.sequence_logps(model, pb)
  finally:
    EmoLlama.encode_frames = orig
  assert calls == [len(FRAMES)]                   # once per pair, not per answer
  np.testing.assert_allclose(s[:, 0], _seq_logp_direct(model, b, pb["seq_input_ids"][:, 0]),
                             rtol=2e-5, atol=2e-4)
  np.testing.assert_allclose(s[:, 1], _seq_logp_direct(model, b, pb["seq_input_ids"][:, 1]),
                             rtol=2e-5, atol=2e-4)
  np.testing.assert_array_equal(n, b["loss_mask"][:, 1:].sum(-1)[:, None].repeat(2, 1))


@pytest.mark.parametrize("reference", ["copy", "lora_off"])
def test_dpo_loss_is_ln2_when_policy_equals_reference(cfg, model, reference):
  pb, _ = _pair_batch(cfg)
  params = nnx.state(model, nnx.Param)
  if reference == "lora_off":
    # Policy == reference: adapters at zero (what a fresh LoRA starts with).
    m = nnx.clone(model)
    for path, var in nnx.to_flat_state(nnx.state(m, nnx.LoRAParam)):
      if path[-1] == "lora_b":
        var.set_value(jnp.zeros(var.shape))
    params = nnx.state(m, nnx.Param)
  else:
    m = model
  trainable = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)) if reference == "copy" else nnx.Param
  ref = ref_lib.reference_params(nnx.state(m, trainable), reference)
  fn = dpo_lib.make_loss_fn(beta=0.1, label_smoothing=0.0, loss_type="sigmoid",
                            reference=reference)
  total, count, sums = jax.jit(fn)(m, pb, ref)
  assert float(count) == len(FRAMES)
  np.testing.assert_allclose(float(total) / float(count), np.log(2.0), rtol=0, atol=1e-6)
  np.testing.assert_allclose(float(sums["rewards/margins"]), 0.0, atol=1e-6)
  del params
  # The pure loss at equal log-probs is ln 2 to the last bit.
  lp = jnp.asarray([-3.5, -1.25], jnp.float32)
  losses, _ = dpo_lib.dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.1)
  np.testing.assert_array_equal(np.asarray(losses), np.float32(np.log(2.0)))


def test_lora_disabled_gives_the_base_model(cfg, model):
  b = dummy_batch(cfg, FRAMES, num_frames=F_MAX, seed=3)
  base = nnx.clone(model)
  for path, var in nnx.to_flat_state(nnx.state(base, nnx.LoRAParam)):
    if path[-1] == "lora_b":
      var.set_value(jnp.zeros(var.shape))
  with_lora = np.asarray(model(b))
  with lora_lib.disabled(model):
    off = np.asarray(model(b))
  np.testing.assert_allclose(off, np.asarray(base(b)), rtol=1e-5, atol=1e-5)
  assert np.abs(off - with_lora).max() > 1e-3           # the adapters mattered
  np.testing.assert_array_equal(np.asarray(model(b)), with_lora)   # back on after the block


class _IdentityHead:
  """An LLM whose hidden states are its logits (the DPO parity test feeds logits)."""

  @staticmethod
  def logits(h):
    return h.astype(jnp.float32)


def _torch_dpo(pol_logits, ref_logits, ids, mask, beta, ls, loss_type):
  """DPO / IPO written in torch from the logits of [B, 2, T, V] (chosen, rejected)."""
  def seq(logits):
    lp = torch.log_softmax(logits[:, :, :-1], -1)
    tok = torch.gather(lp, -1, ids[:, :, 1:, None])[..., 0]
    s = (tok * mask[:, :, 1:]).sum(-1)
    if loss_type == "ipo":
      s = s / mask[:, :, 1:].sum(-1)
    return s
  p, r = seq(pol_logits), seq(ref_logits)
  h = (p[:, 0] - p[:, 1]) - (r[:, 0] - r[:, 1])
  if loss_type == "sigmoid":
    losses = (-torch.nn.functional.logsigmoid(beta * h) * (1 - ls)
              - torch.nn.functional.logsigmoid(-beta * h) * ls)
  else:
    losses = (h - 1 / (2 * beta)) ** 2
  return losses.mean()


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_loss_and_gradients_equal_torch(loss_type, ls):
  rng = np.random.default_rng(0)
  b, t, v, beta = 3, 7, 11, 0.3
  pol = rng.normal(size=(b, 2, t, v)).astype(np.float32)
  ref = rng.normal(size=(b, 2, t, v)).astype(np.float32)
  ids = rng.integers(0, v, size=(b, 2, t)).astype(np.int64)
  mask = np.zeros((b, 2, t), np.float32)
  for i in range(b):
    mask[i, 0, 2 + i:] = 1
    mask[i, 1, 3:] = 1

  def jax_loss(pol_logits):
    def seq(logits):
      lp = logps_lib.token_logps(_IdentityHead, logits[:, :, :-1], jnp.asarray(ids[:, :, 1:]))
      s = (lp * mask[:, :, 1:]).sum(-1)
      return s / mask[:, :, 1:].sum(-1) if loss_type == "ipo" else s
    p, r = seq(pol_logits), seq(jnp.asarray(ref))
    losses, _ = dpo_lib.dpo_loss(p[:, 0], p[:, 1], r[:, 0], r[:, 1], beta=beta,
                                 label_smoothing=ls, loss_type=loss_type)
    return losses.mean()

  loss, grad = jax.value_and_grad(jax_loss)(jnp.asarray(pol))
  tp = torch.tensor(pol.astype(np.float64), requires_grad=True)
  tl = _torch_dpo(tp, torch.tensor(ref.astype(np.float64)), torch.tensor(ids),
                  torch.tensor(mask.astype(np.float64)), beta, ls, loss_type)
  tl.backward()
  np.testing.assert_allclose(float(loss), tl.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), tp.grad.numpy(), rtol=1e-4, atol=1e-7)
  assert np.abs(tp.grad.numpy()).max() > 1e-4


# ---------------------------------------------------------------------------------- GRPO


def _np_grpo(logp, old, ref, rewards, mask, g, beta, eps, eps_hi, loss_type, scale):
  """GRPO written out in numpy (TRL's formulas), float64."""
  r = rewards.reshape(-1, g)
  mean = r.mean(1, keepdims=True)
  std = np.sqrt(((r - mean) ** 2).sum(1, keepdims=True) / (g - 1))
  adv = (r - mean) / (std + 1e-4) if scale else (r - mean)
  adv = adv.reshape(-1)
  coef1 = np.exp(logp - old)
  coef2 = np.clip(coef1, 1 - eps, 1 + eps_hi)
  a = adv[:, None]
  loss = -np.minimum(coef1 * a, coef2 * a)
  kl = np.exp(ref - logp) - (ref - logp) - 1
  loss = loss + beta * kl
  if loss_type == "grpo":
    out = ((loss * mask).sum(1) / np.maximum(mask.sum(1), 1)).mean()
  elif loss_type == "bnpo":
    out = (loss * mask).sum() / mask.sum()
  else:
    out = (loss * mask).sum() / mask.size
  return adv, out


@pytest.mark.parametrize("loss_type,scale", [("grpo", True), ("bnpo", True), ("dr_grpo", False)])
def test_grpo_advantages_and_loss_equal_numpy(loss_type, scale):
  rng = np.random.default_rng(1)
  b, g, n = 3, 4, 6
  rewards = rng.integers(0, 2, size=b * g).astype(np.float64) + rng.normal(size=b * g) * 0.1
  logp = rng.normal(size=(b * g, n)) * 0.5 - 2
  old = logp + rng.normal(size=(b * g, n)) * 0.4    # ratios far enough from 1 to clip
  ref = logp + rng.normal(size=(b * g, n)) * 0.3
  comps = rng.integers(3, 50, size=(b * g, n))
  comps[0, 2] = comps[5, 0] = 2                      # EOS
  mask = grpo_lib.completion_mask(comps, 2)
  assert mask[0].tolist() == [1, 1, 1, 0, 0, 0] and mask[5].tolist() == [1, 0, 0, 0, 0, 0]
  want_adv, want = _np_grpo(logp, old, ref, rewards, mask, g, 0.04, 0.2, 0.28, loss_type, scale)
  adv = grpo_lib.group_advantages(rewards, g, scale_rewards=scale)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
  loss, parts = grpo_lib.per_token_loss(jnp.asarray(logp, jnp.float32),
                                        jnp.asarray(old, jnp.float32),
                                        jnp.asarray(ref, jnp.float32), jnp.asarray(adv),
                                        beta=0.04, epsilon=0.2, epsilon_high=0.28)
  total, weight = grpo_lib.reduce_loss(loss, jnp.asarray(mask), loss_type)
  np.testing.assert_allclose(float(total) / float(weight), want, rtol=2e-5)
  assert 0 < float((parts["clipped"] * mask).sum()) < mask.sum()    # clipping was exercised


def test_grpo_loss_fn_on_the_model_equals_numpy(cfg, model):
  """Fixed rollouts through the model: completion log-probs read at the right positions,
  one media encoding per prompt, and the loss of train.step's (sum, weight) as numpy's."""
  b0 = dummy_batch(cfg, (1, 3), num_frames=F_MAX, seed=5, answer_len=3)
  g, n, eos, pad = 3, 4, 2, 0
  prompt = data_lib.prompt_batch(b0, pad)
  rng = np.random.default_rng(2)
  comps = rng.integers(3, cfg.llm.vocab_size, size=(2 * g, n)).astype(np.int32)
  comps[1, 1] = eos
  rewards = rng.normal(size=2 * g)
  adv = grpo_lib.group_advantages(rewards, g)
  ub = grpo_lib.update_batch(prompt, comps, adv, g, eos, pad)
  p = prompt["input_ids"].shape[1]
  trainable = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  ref_params = ref_lib.reference_params(nnx.state(model, trainable), "copy")
  fn = grpo_lib.make_loss_fn(prompt_len=p, beta=0.1, epsilon=0.2, epsilon_high=None,
                             loss_type="bnpo", reference="copy")
  total, weight, sums = fn(model, ub, ref_params)
  # numpy: per-row full forward of prompt + completion (media encoded per row).
  seqs = ub["seq_input_ids"].reshape(2 * g, -1)
  am = ub["seq_attention_mask"].reshape(2 * g, -1)
  rows = {k: np.repeat(np.asarray(ub[k]), g, 0) for k in logps_lib.MEDIA_KEYS if k in ub}
  logits = np.asarray(model(dict(rows, input_ids=seqs, attention_mask=am)), np.float64)[:, :-1]
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  lp = np.take_along_axis(logits, np.maximum(seqs[:, 1:], 0)[..., None], -1)[..., 0] - lse
  lp = lp[:, p - 1:]
  mask = ub["completion_mask"].reshape(2 * g, n)
  _, want = _np_grpo(lp, lp, lp, rewards, mask, g, 0.1, 0.2, 0.2, "bnpo", True)
  np.testing.assert_allclose(float(total) / float(weight), want, rtol=1e-4, atol=1e-6)
  assert float(weight) == mask.sum() == float(sums["completion_tokens"])
  np.testing.assert_allclose(float(sums["kl_sum"]), 0.0, atol=1e-5)   # policy == reference


def test_train_step_with_reference_and_micro_batches(cfg, model):
  """DPO through train.step: accum_steps=2 gives the gradient of one full-batch step."""
  pb, _ = _pair_batch(cfg, seed=7)
  trainable = nnx.Any(nnx.LoRAParam, nnx.PathContains("mm_projector"))
  graphdef, params, rngs, frozen = state_lib.split_model(nnx.clone(model), trainable)
  ref = ref_lib.reference_params(params, "lora_off")
  import optax
  tx = optax.sgd(1.0)
  fn = dpo_lib.make_loss_fn(beta=0.5, label_smoothing=0.0, loss_type="sigmoid",
                            reference="lora_off")
  outs = []
  for accum in (1, 2):
    st = state_lib.create_train_state(params, rngs, tx)
    step = step_lib.jit_train_step(graphdef, tx, fn, accum_steps=accum, with_extra=True,
                                   donate=False)
    new, m = step(st, frozen, pb, ref)
    outs.append((new, m))
  (a, ma), (b, mb) = outs
  np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-5)
  for k in ("pairs", "rewards/accuracies", "logps/chosen"):
    np.testing.assert_allclose(float(ma["aux"][k]), float(mb["aux"][k]), rtol=1e-5)
  for x, y, p0 in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params),
                      jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
  moved = sum(float(jnp.abs(x - p0).max()) for x, p0 in zip(jax.tree.leaves(a.params),
                                                             jax.tree.leaves(params)))
  assert moved > 0


# ------------------------------------------------------------------------------- rewards


def test_rewards():
  opts = [("happiness", "sadness", "fear")] * 4
  comps = ["happiness", "<think>smile</think><answer>joy</answer>", "fear or sadness",
           "<think>x</think> sadness"]
  li = [0, 0, 1, 1]
  acc = rewards_lib.accuracy(None, comps, options=opts, label_index=li)
  assert acc == [1.0, 1.0, 0.0, 1.0]     # synonyms count; the first named option decides
  assert rewards_lib.format_reward(None, comps) == [0.0, 1.0, 0.0, 0.0]
  fn = rewards_lib.balanced_accuracy({"happiness": 30, "sadness": 10})
  out = fn(None, comps, options=opts, label_index=li,
           answer=["happiness", "happiness", "sadness", "sadness"])
  np.testing.assert_allclose(out, [40 / 60, 40 / 60, 0.0, 40 / 20])
  total, per = rewards_lib.total_rewards([rewards_lib.accuracy, rewards_lib.format_reward],
                                         [1.0, 0.5], None, comps, options=opts, label_index=li)
  np.testing.assert_allclose(total, [1.0, 1.5, 0.0, 1.0])
  assert set(per) == {"accuracy", "format_reward"}
  with pytest.raises(ValueError, match="unknown rewards"):
    rewards_lib.build(["nope"], class_counts={})


# ---------------------------------------------------------------------------------- data


def test_bad_preference_records_are_counted_skips(tmp_path):
  root = tmp_path / "root"
  (root / "img").mkdir(parents=True)
  (root / "img" / "a.jpg").write_bytes(b"x")
  good = {"media": "img/a.jpg", "prompt": "How does she feel?", "chosen": "happiness",
          "rejected": "hard to tell"}
  lines = [good,
           dict(good, media="img/missing.jpg"),
           dict(good, chosen="  "),
           dict(good, rejected="happiness"),
           dict(good, media="../outside.jpg"),
           {"media": "img/a.jpg", "prompt": "q"}]
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(json.dumps(d) for d in lines) + "\n{not json\n")
  skips = SkipCounter()
  pairs = data_lib.read_pairs(str(path), str(root), skips)
  assert len(pairs) == 1 and pairs[0].chosen == "happiness"
  assert pairs[0].record.media == str(root / "img" / "a.jpg")
  assert skips.counts == {"missing_media": 1, "empty_chosen": 1, "chosen_equals_rejected": 1,
                          "path_escapes_root": 1, "missing_field": 1, "bad_json": 1}
  with pytest.raises(Exception, match="missing_media"):
    data_lib.read_pairs(str(path), str(root), SkipCounter(strict=True))


def test_ambiguity_pairs_and_pair_examples(tmp_path):
  from input_pipeline import synthetic
  from emo_jax.train import assets
  from input_pipeline import pipeline as pipeline_lib
  from emo_jax.train import task as task_lib
  made = assets.ensure_default_data(str(tmp_path), num_images=14, num_clips=0, seed=0,
                                    image_size=32)
  toks = task_lib.tokenizers(made)
  recs = [Record("synthetic", "train", f"r{i}", "", "image", label=c)
          for i, c in enumerate(synthetic.CLASSES)]
  pairs = data_lib.ambiguity_pairs(recs, pairs_per_record=3, seed=1)
  assert len(pairs) == 3 * len(recs)
  kinds = {"near_miss": 0, "several": 0, "hedge": 0}
  for p in pairs:
    assert p.chosen == p.record.label and p.rejected != p.chosen
    assert "{" in p.prompt and p.record.label in p.prompt
    if p.rejected in data_lib.HEDGES:
      kinds["hedge"] += 1
    elif " or " in p.rejected:
      kinds["several"] += 1
      assert p.record.label in p.rejected.split(" or ")
    else:
      kinds["near_miss"] += 1
      assert p.rejected in data_lib.NEAR_MISS[p.record.label]
  assert all(v > 0 for v in kinds.values()), kinds
  # Round trip through JSONL, then one pair -> one example with shared prompt tokens.
  data_recs = task_lib.load_split({"name": "synthetic", "kind": "image"}, str(tmp_path),
                                  SkipCounter(), "train")
  real = data_lib.ambiguity_pairs(data_recs[:4], seed=0)
  path = str(tmp_path / "p.jsonl")
  assert data_lib.write_pairs(real, path, str(tmp_path)) == 4
  back = data_lib.read_pairs(path, str(tmp_path), SkipCounter(strict=True))
  assert [(p.chosen, p.rejected, p.record.media) for p in back] == \
      [(p.chosen, p.rejected, p.record.media) for p in real]
  cfg = EmoLlamaConfig.tiny()
  pcfg = pipeline_lib.PipelineConfig(global_batch_size=2, num_frames=1,
                                     tokens_per_frame=cfg.tokens_per_frame, max_length=160,
                                     bucket_lengths=(160,), qformer_max_length=24,
                                     image_size=cfg.vision.image_size,
                                     face_size=cfg.tiny_face_prior.image_size)
  ex = data_lib.PairBuilder(pcfg, *toks, strict=True)(back[0], np.random.default_rng(0))
  ids, lm = ex["seq_input_ids"], ex["seq_loss_mask"]
  start = int(np.argmax(lm[0] > 0))
  assert start == int(np.argmax(lm[1] > 0))
  np.testing.assert_array_equal(ids[0, :start], ids[1, :start])          # one prompt
  tok = toks[0]
  for row, ans in ((0, back[0].chosen), (1, back[0].rejected)):
    got = [int(x) for x, m in zip(ids[row], lm[row]) if m]
    assert got == tok.encode(ans) + [tok.eos_id]
  batch = data_lib.PairCollate((160,), tok.pad_id)([ex, ex])
  assert batch["seq_input_ids"].shape == (2, 2, 160) and batch["frames"].shape[0] == 2


def test_prompt_batch_left_pads_the_prompt_before_the_answer():
  ids = np.array([[1, 5, 6, 7, 8, 2, 0, 0], [1, 5, 9, 8, 2, 0, 0, 0]], np.int32)
  am = (ids > 0).astype(np.int32)
  lm = np.array([[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]], np.int32)
  out = data_lib.prompt_batch({"input_ids": ids, "attention_mask": am, "loss_mask": lm,
                               "label": np.array([0, 1])}, pad_id=0)
  np.testing.assert_array_equal(out["input_ids"], [[0, 0, 0, 0, 1, 5, 6, 7],
                                                   [0, 0, 0, 0, 0, 1, 5, 9]])
  np.testing.assert_array_equal(out["attention_mask"], (out["input_ids"] > 0).astype(int))
  assert "loss_mask" not in out and out["label"].tolist() == [0, 1]


@pytest.mark.parametrize("override, field", [
    ({"dpo.beta": 0.0}, "dpo.beta"), ({"dpo.rpo_alpha": -1.0}, "dpo.rpo_alpha"),
    ({"dpo.loss_type": "hinge"}, "dpo.loss_type"), ({"dpo.lr_scale": 0.0}, "dpo.lr_scale"),
    ({"dpo.label_smoothing": 0.7}, "dpo.label_smoothing"),
    ({"grpo.num_generations": 1}, "grpo.num_generations"),
    ({"grpo.temperature": 0.0}, "grpo.temperature"), ({"grpo.top_p": 1.5}, "grpo.top_p"),
    ({"grpo.loss_type": "ppo"}, "grpo.loss_type"), ({"grpo.reference": "other"}, "grpo.reference"),
    ({"grpo.batch_size": 0}, "grpo.batch_size")])
def test_nonsense_post_training_settings_name_the_field(override, field):
  from configs import posttrain
  from emo_jax.train import validate
  from emo_jax.train.errors import ConfigError
  cfg = posttrain.get_config("test")
  for mode in ("dpo", "grpo"):
    validate.validate(cfg, mode)
  (key, value), = override.items()
  section, name = key.split(".")
  cfg[section][name] = value
  with pytest.raises(ConfigError, match=f"config.{field}"):
    validate.validate(cfg, section)


def test_rpo_alpha_adds_the_chosen_answers_mean_nll(cfg, model):
  """rpo_alpha: each pair's loss gains alpha x the chosen answer's mean token NLL (the
  sequence log-probs are checked against separate forwards in the pair-logps test)."""
  pb, _ = _pair_batch(cfg)
  ref = ref_lib.reference_params(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))),
                                 "copy")
  kw = dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", reference="copy")
  plain, count, _ = jax.jit(dpo_lib.make_loss_fn(**kw))(model, pb, ref)
  alpha = 0.7
  total, count2, sums = jax.jit(dpo_lib.make_loss_fn(rpo_alpha=alpha, **kw))(model, pb, ref)
  assert float(count) == float(count2) == len(FRAMES)
  s, n, _ = logps_lib.sequence_logps(model, pb)
  valid = np.asarray(pb["pair_valid"], np.float64)
  nll = -np.asarray(s, np.float64)[:, 0] / np.maximum(np.asarray(n, np.float64)[:, 0], 1.0)
  np.testing.assert_allclose(float(total) - float(plain), alpha * float((nll * valid).sum()),
                             rtol=1e-4)
  np.testing.assert_allclose(float(sums["nll/chosen"]), float((nll * valid).sum()), rtol=1e-4)
  assert float((nll * valid).sum()) > 0
