"""Tiny tokenizers for the tests: a LLaMA-style SentencePiece BPE model trained on FER
words and a small BERT WordPiece vocab (the session fixtures in conftest.py use them)."""
import random

from input_pipeline import template

_WORDS = ("the a person face image video what is facial expression of in choose one from "
          "following options happy sad angry surprise fear disgust neutral contempt happiness "
          "sadness anger anxiety chat between curious user and artificial intelligence "
          "assistant gives helpful detailed polite answers to questions looks smiling brows "
          "raised mouth open eyes wide she he they USER ASSISTANT").split()


def train_sentencepiece(path, seed=0, vocab_size=400):
  """A tiny LLaMA-style BPE model (unk 0, bos 1, eos 2, no pad, byte fallback)."""
  import sentencepiece as spm

  rng = random.Random(seed)
  lines = [template.VICUNA_V1.system] * 5
  for _ in range(500):
    n = rng.randint(3, 14)
    lines.append(" ".join(rng.choice(_WORDS) for _ in range(n)) + rng.choice(".?,:!"))
  prefix = str(path / "tokenizer")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size,
      model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=True, split_digits=True, character_coverage=1.0, minloglevel=2)
  return prefix + ".model"


BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "the", "facial",
              "expression", "of", "person", "in", "image", "video", "?", ".", ",", "{", "}",
              ":", "choose", "one", "from", "following", "options", "happy", "sad", "##ness",
              "surprise", "##d", "fear", "##ful", "a", "face", "cafe", "un", "##known"]


def write_bert_vocab(directory) -> str:
  """Writes BERT_VOCAB to <directory>/vocab.txt; returns its path."""
  path = directory / "vocab.txt"
  path.write_text("\n".join(BERT_VOCAB) + "\n")
  return str(path)


def reference_ids_and_mask(tok, prompt, answers, num_slots):
  """Tokenises the rendered prompt in its '<image>' / '</s>' chunks with SentencePiece's own
  character offsets; a token is an answer token iff its span lies inside ' {answer}'."""
  spans = []  # answer char spans [space before answer, end of answer)
  pos = 0
  for a in answers:
    s = prompt.index(f" {a}</s>", pos)
    spans.append((s, s + 1 + len(a)))
    pos = s + 1 + len(a)
  ids, mask = [tok.bos_id], [0]
  offset = 0
  for i, image_chunk in enumerate(prompt.split(template.IMAGE_TOKEN)):
    if i:
      ids += [template.IMAGE_TOKEN_ID] * num_slots
      mask += [0] * num_slots
      offset += len(template.IMAGE_TOKEN)
    for j, chunk in enumerate(image_chunk.split("</s>")):
      if j:
        ids.append(tok.eos_id)
        mask.append(1)
        offset += len("</s>")
      if chunk:
        for tid, b, e in tok.encode_with_offsets(chunk):
          ids.append(tid)
          mask.append(int(any(s <= offset + b and offset + e <= t for s, t in spans)))
      offset += len(chunk)
  return ids, mask
