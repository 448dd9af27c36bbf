"""LLaMA SentencePiece + BERT WordPiece tokenizers, the vicuna_v1 template, instructions."""
import pickle

import numpy as np
import pytest

from input_pipeline import instructions, labels, template, tokenizers
from input_pipeline.records import BadInputError, Record
from tokenizer_testutil import BERT_VOCAB, reference_ids_and_mask


def test_llama_tokenizer_ids_and_pickle(llama_tok):
  assert (llama_tok.bos_id, llama_tok.eos_id, llama_tok.unk_id) == (1, 2, 0)
  assert llama_tok.pad_id == 0  # no pad in the model -> unk
  text = "What is the facial expression? happy"
  ids = llama_tok.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
  assert llama_tok.decode(ids) == text
  # '</s>' typed in text stays text (no injected EOS).
  assert llama_tok.eos_id not in llama_tok.encode("a</s>b")
  clone = pickle.loads(pickle.dumps(llama_tok))
  assert clone.encode(text) == llama_tok.encode(text)


def _llamavid_bert(vocab_file, fast):
  """The Q-Former tokenizer as LLaMA-VID builds it (`init_bert`): bert uncased with
  truncation_side='left' and '[DEC]' added as a special (bos) token."""
  from transformers.models.bert import BertTokenizer, BertTokenizerLegacy

  if fast:
    vocab = {w: i for i, w in enumerate(open(vocab_file).read().splitlines())}
    ref = BertTokenizer(vocab=vocab, do_lower_case=True, truncation_side="left")
  else:
    ref = BertTokenizerLegacy(vocab_file=vocab_file, do_lower_case=True,
                              truncation_side="left")
  ref.add_special_tokens({"bos_token": "[DEC]"})
  return ref


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("text", [
    "What is the facial expression of the person in the image?",
    "Choose one from the following options: {Happy, SADNESS, surprised, fearful}.",
    "Café unknown  words, Ünknown!", "", "a [DEC] face [MASK] cafe"])
def test_bert_wordpiece_matches_transformers_left_truncation(bert_vocab, text, fast):
  ref = _llamavid_bert(bert_vocab, fast)
  ours = tokenizers.BertTokenizer(bert_vocab)
  assert ours.encode(text) == ref(text)["input_ids"]
  assert ours.dec_id == ref.convert_tokens_to_ids("[DEC]") == len(BERT_VOCAB)
  for length in (3, 8, 64):
    ids, mask = ours.encode_padded(text, length)
    # LLaMA-VID's call: padding='longest', truncation=True, max_length (256 upstream).
    want = ref([text], padding="longest", truncation=True, max_length=length)
    n = len(want["input_ids"][0])
    np.testing.assert_array_equal(ids[:n], want["input_ids"][0])
    np.testing.assert_array_equal(mask[:n], want["attention_mask"][0])
    assert (mask[n:] == 0).all() and (ids[n:] == ours.pad_id).all()
  assert ours.truncate([2, 5, 6, 7, 3], 4, "right") == [2, 5, 6, 3]
  assert pickle.loads(pickle.dumps(ours)).encode(text) == ours.encode(text)


def test_qformer_text_is_the_llamavid_guided_prompt(bert_vocab):
  """train.py: `value.replace('<image>', '').replace('\\n', '')`, then the tokenizer call of
  vlm_attention; a long category instruction keeps its options (left truncation)."""
  ref = _llamavid_bert(bert_vocab, fast=False)
  ours = tokenizers.BertTokenizer(bert_vocab)
  value = ("<image>\nWhat is the facial expression of the person in the image?\nChoose one "
           "from the following options: {happy, sad, surprise, fear}.")
  text = template.qformer_text(value)
  assert text == value.replace("<image>", "").replace("\n", "")
  assert "imageChoose" not in text and "image?Choose" in text  # newline removed, not a space
  for length in (6, 12):
    ids, mask = ours.encode_padded(text, length)
    want = ref([text], truncation=True, max_length=length)["input_ids"][0]
    np.testing.assert_array_equal(ids[:mask.sum()], want)
    assert ours.decode(ids).endswith("fear } .")  # the end survives, the start goes
    assert ids[mask.sum() - 1] == ours.sep_id and ids[0] == ours.cls_id

CONV = [
    {"from": "human", "value": "What is the facial expression of the person in the image? <image>"},
    {"from": "gpt", "value": "happy, she looks happy."},
    {"from": "human", "value": "Why?"},
    {"from": "gpt", "value": "mouth open and brows raised"},
    {"from": "human", "value": "choose one: sad, anger"},
    {"from": "gpt", "value": "sadness"},
]


@pytest.mark.parametrize("agr", [None, "She looks about 20 to 29 years old."])
def test_loss_mask_exactly_on_answers_multiturn(llama_tok, agr):
  slots = 6
  out = template.tokenize_conversation(CONV, llama_tok, num_visual_slots=slots,
                                       max_length=1000, agr_sentence=agr)
  rounds = template.parse_turns(CONV)
  prompt = template.render_prompt(rounds, agr_sentence=agr)
  assert prompt.startswith(template.VICUNA_V1.system + " USER: <image>\n")
  assert prompt.count("</s>") == 3 and prompt.endswith("ASSISTANT: sadness</s>")
  ref_ids, ref_mask = reference_ids_and_mask(llama_tok, prompt, [r.answer for r in rounds], slots)
  np.testing.assert_array_equal(out.input_ids, ref_ids)  # token by token
  np.testing.assert_array_equal(out.loss_mask, ref_mask)
  assert not out.truncated and out.num_rounds == 3
  ids, mask = out.input_ids, out.loss_mask
  assert list(ids[out.image_start:out.image_start + slots]) == [template.IMAGE_TOKEN_ID] * slots
  assert (ids == template.IMAGE_TOKEN_ID).sum() == slots
  # The masked runs decode to the answers, each ending in EOS.
  runs, cur = [], []
  for t, m in zip(ids, mask):
    if m:
      cur.append(int(t))
    elif cur:
      runs.append(cur)
      cur = []
  if cur:
    runs.append(cur)
  assert [r[-1] for r in runs] == [llama_tok.eos_id] * 3
  assert [llama_tok.decode(r[:-1]) for r in runs] == [r.answer for r in rounds]
  if agr:
    text = llama_tok.decode(ids[out.image_start + slots:])
    assert text.startswith("\n" + agr + " What is")


def test_generation_prompt_ends_with_assistant(llama_tok):
  out = template.tokenize_conversation(CONV[:3], llama_tok, num_visual_slots=2, max_length=999)
  assert llama_tok.decode(out.input_ids).endswith("USER: Why? ASSISTANT:")
  ref_ids, _ = reference_ids_and_mask(llama_tok, template.render_prompt(
      template.parse_turns(CONV[:3])), ["happy, she looks happy."], 2)
  np.testing.assert_array_equal(out.input_ids, ref_ids)
  assert out.loss_mask[-5:].sum() == 0


def test_truncation_drops_later_rounds_and_keeps_slots(llama_tok):
  slots = 40
  full = template.tokenize_conversation(CONV, llama_tok, num_visual_slots=slots, max_length=10**4)
  one = template.tokenize_conversation(CONV[:2], llama_tok, num_visual_slots=slots,
                                       max_length=10**4)
  # Just too short for all three rounds -> the later rounds go, the first stays whole.
  out = template.tokenize_conversation(CONV, llama_tok, num_visual_slots=slots,
                                       max_length=len(full.input_ids) - 1)
  assert out.truncated and out.num_rounds == 2 and len(out.input_ids) <= len(full.input_ids) - 1
  np.testing.assert_array_equal(out.input_ids[:len(one.input_ids)], one.input_ids)
  # Shorter than one round: the question text is trimmed, slots and the answer stay.
  n_answer = int(one.loss_mask.sum())
  out = template.tokenize_conversation(CONV, llama_tok, num_visual_slots=slots,
                                       max_length=len(one.input_ids) - 3)
  assert len(out.input_ids) == len(one.input_ids) - 3 and out.num_rounds == 1
  assert (out.input_ids == template.IMAGE_TOKEN_ID).sum() == slots
  assert out.loss_mask.sum() == n_answer and out.input_ids[-1] == llama_tok.eos_id
  np.testing.assert_array_equal(out.input_ids[:out.image_start + slots],
                                one.input_ids[:one.image_start + slots])
  # Impossible: fixed text + slots exceed max_length -> a clear error, never cut slots.
  with pytest.raises(ValueError, match="visual slots"):
    template.tokenize_conversation(CONV, llama_tok, num_visual_slots=slots, max_length=slots)


def test_generation_prompt_truncation_keeps_the_asked_round(llama_tok):
  conv = CONV[:5]
  full = template.tokenize_conversation(conv, llama_tok, num_visual_slots=3, max_length=10**4)
  out = template.tokenize_conversation(conv, llama_tok, num_visual_slots=3,
                                       max_length=len(full.input_ids) - 1)
  assert out.num_rounds == 2
  assert llama_tok.decode(out.input_ids).endswith("choose one: sad, anger ASSISTANT:")


@pytest.mark.parametrize("bad", [
    [], [{"from": "gpt", "value": "x"}], [{"from": "human"}],
    [{"from": "human", "value": "<image> a"}, {"from": "human", "value": "b"}],
    [{"from": "human", "value": "<image> a <image>"}, {"from": "gpt", "value": "b"}],
])
def test_malformed_conversations_raise_bad_input(llama_tok, bad):
  with pytest.raises(BadInputError, match="malformed_conversation"):
    template.tokenize_conversation(bad, llama_tok, num_visual_slots=1, max_length=100)


def test_category_instruction_options_shuffled_per_seed():
  classes = labels.classes("rafdb")
  orders = set()
  for seed in range(6):
    a = instructions.category_instruction("happiness", classes,
                                          rng=np.random.default_rng(seed))
    b = instructions.category_instruction("happiness", classes,
                                          rng=np.random.default_rng(seed))
    assert a == b  # deterministic per seed
    assert sorted(a.options) == sorted(classes)  # all options, each once
    q = a.conversations[0]["value"]
    assert q.startswith("<image>\nWhat is the facial expression of the person in the image? "
                        "Choose one from the following options: {")
    assert instructions.parse_options(q) == a.options
    assert a.conversations[1]["value"] == "happiness" == a.options[a.label_index]
    orders.add(a.options)
  assert len(orders) > 1  # the seed changes the order


def test_category_instruction_synonyms_video_and_eval_order():
  # DFEW names 'happy'; a label given as a synonym maps onto the dataset's word.
  inst = instructions.category_instruction("joy", labels.classes("dfew"), media_type="video",
                                           shuffle=False)
  assert inst.options == labels.classes("dfew") and inst.label_index == 0
  assert "in the video?" in inst.conversations[0]["value"]
  assert inst.conversations[1]["value"] == "happy"
  with pytest.raises(BadInputError, match="unknown_label"):
    instructions.category_instruction("bored", labels.classes("dfew"), shuffle=False)


def test_instruction_for_record_generated_and_given():
  rec = Record(dataset="mafw", split="train", id="1", media="x.mp4", media_type="video",
               label="helplessness")
  inst = instructions.instruction_for_record(rec, rng=np.random.default_rng(1))
  assert sorted(inst.options) == sorted(labels.classes("mafw"))
  assert inst.options[inst.label_index] == "helplessness"
  # Another dataset's option words: the label maps through synonyms.
  rec = Record(dataset="dfew", split="train", id="2", media="x.mp4", media_type="video",
               label="angry")
  inst = instructions.instruction_for_record(rec, shuffle=False,
                                             option_names=labels.classes("rafdb"))
  assert inst.conversations[1]["value"] == "anger"
  ferid = Record(dataset="ferid", split="train", id="3", media="a.jpg", media_type="image",
                 conversations=({"from": "human", "value": "<image>\nWhich? {sad, happy}"},
                                {"from": "gpt", "value": "Happy."}))
  inst = instructions.instruction_for_record(ferid)
  assert inst.options == ("sad", "happy") and inst.label_index == 1
