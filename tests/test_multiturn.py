"""Multi-turn conversations as LLaMA-VID trains them: one `<image>` per user turn, each turn's
own question guiding that turn's Q-Former, visual tokens per placeholder, loss on every answer.

A 3-turn conversation about a 2-frame clip (padded to 3 frames) through the pipeline and a
tiny EmoLlama."""
import dataclasses

import numpy as np
import pytest
from flax import nnx

from emo_jax.models.emo_llama import EmoLlama, EmoLlamaConfig
from input_pipeline import pipeline, template, tokenizers
from input_pipeline.records import Record, SkipCounter
from tokenizer_testutil import BERT_VOCAB, reference_ids_and_mask, train_sentencepiece

QUESTIONS = ("<image>\nWhat is the facial expression of the person in the video?",
             "Why?", "Is she sad?")
ANSWERS = ("happy", "mouth open and brows raised", "no, she looks happy")
F, TURNS, TQ = 3, 3, 16


def conversation(questions=QUESTIONS):
  conv = []
  for q, a in zip(questions, ANSWERS):
    conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  return tuple(conv)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("mt")
  (d / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
  llama = tokenizers.LlamaTokenizer(train_sentencepiece(d))
  bert = tokenizers.BertTokenizer(str(d / "vocab.txt"))
  rng = np.random.default_rng(0)
  clip = rng.integers(0, 255, (2, 20, 20, 3), dtype=np.uint8)  # a 2-frame clip, decoded
  base = EmoLlamaConfig.tiny(lora_rank=0, trainable=("qformer", "projectors", "face"))
  cfg = base.replace(llm=dataclasses.replace(base.llm, vocab_size=llama.vocab_size),
                     face=dataclasses.replace(base.face, query_mode="qformer"))
  model = EmoLlama(cfg, rngs=nnx.Rngs(0))
  pcfg = pipeline.PipelineConfig(
      global_batch_size=1, num_frames=F, tokens_per_frame=cfg.tokens_per_frame,
      max_length=512, bucket_lengths=(512,), qformer_max_length=TQ,
      image_size=cfg.vision.image_size, face_size=cfg.tiny_face_prior.image_size,
      image_turns=TURNS, image_position="start", shuffle=False)
  return dict(llama=llama, bert=bert, clip=clip, model=model, pcfg=pcfg)


def element(setup, questions=QUESTIONS):
  """A pre-extracted element (input_pipeline.preprocess): the record and its 2 frames."""
  rec = Record("ferid", "train", "clip", ("f0.png", "f1.png"), "frames",
               conversations=conversation(questions))
  return {"record": rec, "frames": setup["clip"]}


def build(setup, questions=QUESTIONS, **pcfg_kw):
  pcfg = dataclasses.replace(setup["pcfg"], **pcfg_kw)
  builder = pipeline.ExampleBuilder(pcfg, setup["llama"], setup["bert"], strict=True)
  ex = builder(element(setup, questions), np.random.default_rng(0))
  return pipeline.collate([ex], bucket_lengths=pcfg.bucket_lengths,
                          pad_id=setup["llama"].pad_id), ex


_encode = nnx.jit(lambda m, b: m.encode_frames(b))


def visual(setup, batch):
  keys = ("frames", "frame_mask", "qformer_ids", "qformer_mask", "face_crops")
  return np.asarray(_encode(setup["model"], {k: batch[k] for k in keys}))


def test_loss_mask_covers_exactly_the_three_answers(setup):
  batch, ex = build(setup)
  llama, tpf = setup["llama"], setup["model"].config.tokens_per_frame
  ids, mask = batch["input_ids"][0], batch["loss_mask"][0]
  slots = F * tpf
  # One block of F * tokens_per_frame slots per user turn, three in all.
  pos = np.flatnonzero(ids == template.IMAGE_TOKEN_ID)
  assert len(pos) == TURNS * slots
  starts = pos[::slots]
  assert all(np.array_equal(pos[i * slots:(i + 1) * slots], starts[i] + np.arange(slots))
             for i in range(TURNS))
  # Token by token the ids and mask of the rendered prompt, cut at '<image>' and '</s>'.
  rounds = template.parse_turns(conversation(), per_turn_images=True)
  prompt = template.render_prompt(rounds, image_positions=["start"] * TURNS)
  assert prompt.count("<image>") == TURNS and "USER: <image>\nWhy? ASSISTANT:" in prompt
  ref_ids, ref_mask = reference_ids_and_mask(llama, prompt, ANSWERS, slots)
  n = len(ref_ids)
  np.testing.assert_array_equal(ids[:n], ref_ids)
  np.testing.assert_array_equal(mask[:n], ref_mask)
  assert not mask[n:].any()
  runs = np.split(np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
  assert [llama.decode(ids[r[:-1]]) for r in runs] == list(ANSWERS)
  assert all(ids[r[-1]] == llama.eos_id for r in runs)
  # The padding frame's slots are masked out in every block.
  att = batch["attention_mask"][0]
  for s in starts:
    np.testing.assert_array_equal(att[s:s + slots], np.arange(slots) < 2 * tpf)
  # One Q-Former text per turn: that turn's question, placeholder and newlines removed.
  assert batch["qformer_ids"].shape == batch["qformer_mask"].shape == (1, TURNS, TQ)
  for t, q in enumerate(QUESTIONS):
    want, _ = setup["bert"].encode_padded(template.qformer_text(q), TQ)
    np.testing.assert_array_equal(batch["qformer_ids"][0, t], want)
  # The model trains on it.
  loss, aux = nnx.jit(lambda m, b: m.loss(b))(setup["model"], batch)
  assert np.isfinite(float(loss)) and int(aux["num_tokens"]) == int(mask[1:].sum())


def test_each_turn_is_guided_by_its_own_question(setup):
  batch, _ = build(setup)
  tpf = setup["model"].config.tokens_per_frame
  block = F * tpf
  base = visual(setup, batch).reshape(1, TURNS, block, -1)[0]
  for t in range(TURNS):
    # Only turn t's question changes -> only block t's tokens change.
    qs = list(QUESTIONS)
    qs[t] = qs[t] + " the face"
    other = visual(setup, build(setup, tuple(qs))[0]).reshape(TURNS, block, -1)
    for u in range(TURNS):
      real = slice(0, 2 * tpf)  # the padding frame's tokens are never used
      if u == t:
        assert np.abs(other[u, real] - base[u, real]).max() > 1e-4, (t, u)
      else:
        np.testing.assert_array_equal(other[u], base[u], err_msg=f"{t} {u}")
    # Block t is what a single-turn batch with turn t's text gives (the same computation).
    single = dict(batch, qformer_ids=batch["qformer_ids"][:, t],
                  qformer_mask=batch["qformer_mask"][:, t])
    np.testing.assert_allclose(visual(setup, single)[0], base[t], atol=1e-5, rtol=1e-5)
  # The model puts block t at the t-th run of slots.
  embeds, _ = nnx.jit(lambda m, b: m.embed_multimodal(b))(setup["model"], batch)
  pos = np.flatnonzero(batch["input_ids"][0] == template.IMAGE_TOKEN_ID)
  got = np.asarray(embeds)[0, pos].reshape(TURNS, block, -1)
  np.testing.assert_allclose(got[:, :2 * tpf], base[:, :2 * tpf], atol=1e-6)
  assert not got[:, 2 * tpf:].any()  # padding frame: zero embedding


def test_turns_beyond_image_turns_are_dropped_and_counted(setup):
  skips = SkipCounter()
  pcfg = dataclasses.replace(setup["pcfg"], image_turns=2, image_position="end",
                             global_batch_size=1, num_epochs=1)
  batch = next(pipeline.make_iterator([element(setup)], pcfg, setup["llama"], setup["bert"], skips=skips,
                                      process_index=0, process_count=1))
  assert skips.truncations == {"conversation_turns_dropped": 1}
  assert batch["qformer_ids"].shape == (1, 2, TQ)
  llama = setup["llama"]
  ids = batch["input_ids"][0]
  text = llama.decode(ids)
  assert ANSWERS[2] not in text and ANSWERS[1] in text
  # The second turn had no '<image>': it goes at the turn's end with image_position='end'.
  slots = F * setup["model"].config.tokens_per_frame
  pos = np.flatnonzero(ids == template.IMAGE_TOKEN_ID)
  assert len(pos) == 2 * slots
  assert llama.decode(ids[pos[slots - 1] + 1:pos[slots]]).rstrip().endswith("Why?")


@pytest.mark.parametrize("position", ["end", "random"])
def test_placeholder_at_a_turns_end_tokenises_as_the_rendered_prompt(setup, position):
  """LLaMA-VID adds '<image>' to a later turn without one at its start or end (at random);
  the ids are those of the rendered prompt cut at '<image>' / '</s>' either way."""
  llama = setup["llama"]
  seen = set()
  for seed in range(4):
    out = template.tokenize_conversation(
        conversation(), llama, num_visual_slots=3, max_length=10**4, image_turns=TURNS,
        image_position=position, rng=np.random.default_rng(seed))
    rounds = template.parse_turns(conversation(), per_turn_images=True)
    prompt = template.render_prompt(rounds, image_positions=out.image_positions)
    ref_ids, ref_mask = reference_ids_and_mask(llama, prompt, ANSWERS, 3)
    np.testing.assert_array_equal(out.input_ids, ref_ids)
    np.testing.assert_array_equal(out.loss_mask, ref_mask)
    assert out.image_positions[0] == "start" and len(out.image_starts) == TURNS
    seen.add(out.image_positions)
  if position == "end":
    assert seen == {("start", "end", "end")}
    assert "USER: Why?\n<image> ASSISTANT:" in prompt
  else:
    assert len(seen) > 1  # the generator picks
