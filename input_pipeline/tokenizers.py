"""The two text tokenizers of the model: LLaMA SentencePiece and the Q-Former's BERT WordPiece.

- `LlamaTokenizer` reads the `tokenizer.model` SentencePiece file that LLaMA / Vicuna /
  LLaMA-VID checkpoints ship. Facts (LLaMA release): ids unk=0, bos=1, eos=2, no pad id;
  the model adds a dummy-prefix '▁' to every encoded string and keeps extra whitespace.
  Our choices: `encode` never adds BOS/EOS unless asked (the template adds them where
  the LLaMA tokenizer would); special-token spellings such as '</s>' inside text are
  encoded as plain text, never as control ids (user text cannot inject an EOS);
  padding uses the unk id when the model has no pad id (as LLaVA does).
- `BertTokenizer` reads a BERT `vocab.txt` with the `tokenizers` library: BERT's basic
  normaliser (lower case, accent stripping, Chinese-char splitting), WordPiece with
  '##' continuations, `[CLS] ... [SEP]` (bert-base-uncased, as InstructBLIP and LLaMA-VID
  use). LLaMA-VID builds it with `truncation_side="left"` and `[DEC]` added as a special token
  (id = len(vocab.txt), the Q-Former's 30523rd row) and calls it with `truncation=True,
  max_length=256` (`llamavid/model/llamavid_arch.py`, `init_bert` / `vlm_attention`): a long
  text loses its beginning, [CLS] and [SEP] stay. We do the same (`truncation_side`).

Both tokenizers pickle (grain worker processes receive them by value).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from input_pipeline import paths


class LlamaTokenizer:
  """SentencePiece tokenizer from a LLaMA `tokenizer.model` file."""

  def __init__(self, model_file: str | os.PathLike | None = None, *,
               model_proto: bytes | None = None):
    if (model_file is None) == (model_proto is None):
      raise ValueError("give exactly one of model_file or model_proto")
    if model_proto is None:   # a local path or a cloud URL (gs://...)
      model_proto = paths.read_bytes(model_file)
    self._proto = model_proto
    self._load()

  def _load(self) -> None:
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(self._proto)

  def __getstate__(self):
    return {"proto": self._proto}

  def __setstate__(self, state):
    self._proto = state["proto"]
    self._load()

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def pad_id(self) -> int:
    """The model's pad id, else the unk id (LLaMA has none; LLaVA pads with unk)."""
    pad = self._sp.pad_id()
    return pad if pad >= 0 else self.unk_id

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Ids of `text` (SentencePiece adds the dummy-prefix '▁' itself)."""
    ids = list(self._sp.EncodeAsIds(text))
    if add_bos:
      ids.insert(0, self.bos_id)
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def encode_with_offsets(self, text: str) -> list[tuple[int, int, int]]:
    """(id, char_begin, char_end) per token of `text`, from SentencePiece's own (byte) spans."""
    proto = self._sp.Encode(text, return_type="proto")
    raw = text.encode("utf-8")

    def char(byte_offset: int) -> int:
      return len(raw[:byte_offset].decode("utf-8", errors="ignore"))

    return [(p.id, char(p.begin), char(p.end)) for p in proto.pieces]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; negative ids (visual slots) and control ids are dropped."""
    keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    return self._sp.DecodeIds(keep)

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))


class BertTokenizer:
  """BERT WordPiece (uncased) from a `vocab.txt`, `[CLS] text [SEP]`."""

  def __init__(self, vocab_file: str | os.PathLike, *, lowercase: bool = True):
    self._vocab_text = paths.read_text(vocab_file)
    self._lowercase = lowercase
    self._build()

  def _build(self) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top

    vocab = {}
    for line in self._vocab_text.splitlines():
      token = line.rstrip("\n")
      if token and token not in vocab:
        vocab[token] = len(vocab)
    for special in ("[UNK]", "[CLS]", "[SEP]", "[PAD]"):
      if special not in vocab:
        raise ValueError(f"vocab.txt lacks the special token {special}")
    # LLaMA-VID / LAVIS add '[DEC]' as a special token after the vocabulary.
    self._dec_id = vocab.get("[DEC]", len(vocab))
    self._vocab = vocab
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None,
        lowercase=self._lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
                            if t in vocab])
    if "[DEC]" not in vocab:
      tok.add_special_tokens(["[DEC]"])  # takes the next id, len(vocab)
    self._tok = tok

  def __getstate__(self):
    return {"vocab_text": self._vocab_text, "lowercase": self._lowercase}

  def __setstate__(self, state):
    self._vocab_text = state["vocab_text"]
    self._lowercase = state["lowercase"]
    self._build()

  @property
  def vocab_size(self) -> int:
    return len(self._vocab)

  @property
  def pad_id(self) -> int:
    return self._vocab["[PAD]"]

  @property
  def dec_id(self) -> int:
    return self._dec_id

  @property
  def cls_id(self) -> int:
    return self._vocab["[CLS]"]

  @property
  def sep_id(self) -> int:
    return self._vocab["[SEP]"]

  def encode(self, text: str, *, max_length: int | None = None,
             truncation_side: str = "left") -> list[int]:
    """`[CLS] wordpieces [SEP]`; longer than `max_length` -> `truncate(ids, max_length)`."""
    ids = self._tok.encode(text).ids
    if max_length is not None:
      ids = self.truncate(ids, max_length, truncation_side)
    return ids

  def truncate(self, ids: Sequence[int], max_length: int, side: str = "left") -> list[int]:
    """`[CLS] ... [SEP]` ids cut to `max_length`, keeping [CLS] and [SEP]: 'left' drops the
    text's first wordpieces (LLaMA-VID, transformers' truncation_side='left'), 'right' its
    last ones."""
    ids = list(ids)
    if len(ids) <= max_length:
      return ids
    if max_length < 2:
      raise ValueError(f"max_length {max_length} cannot hold [CLS] and [SEP]")
    keep = max_length - 2
    body = ids[1:-1]
    if side == "left":
      body = body[len(body) - keep:] if keep else []
    elif side == "right":
      body = body[:keep]
    else:
      raise ValueError(f"truncation side must be 'left' or 'right', got {side!r}")
    return [ids[0]] + body + [ids[-1]]

  def pad(self, ids: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [length], mask int32 [length]), right-padded with [PAD]."""
    if len(ids) > length:
      raise ValueError(f"{len(ids)} ids do not fit length {length}; truncate first")
    out = np.full((length,), self.pad_id, np.int32)
    mask = np.zeros((length,), np.int32)
    out[:len(ids)] = ids
    mask[:len(ids)] = 1
    return out, mask

  def encode_padded(self, text: str, length: int, *, truncation_side: str = "left"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [length], mask int32 [length]): `encode` cut to `length`, right-padded."""
    return self.pad(self.encode(text, max_length=length, truncation_side=truncation_side),
                    length)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
