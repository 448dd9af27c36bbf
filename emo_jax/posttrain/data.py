"""Post-training data: preference pairs (DPO) and prompt batches (GRPO).

Preference JSONL, one pair per line, TRL's field names plus the media:

  {"media": "Image/aligned/train_00001_aligned.jpg",   # under the data root
   "media_type": "image",                              # optional: image | video (by suffix)
   "prompt": "What is the facial expression ...? Choose one from ...: {...}.",
   "chosen": "happiness", "rejected": "happiness or surprise, it is hard to tell",
   "id": "train_00001", "label": "happiness"}          # optional

`read_pairs` counts (never drops silently) a line that is not JSON or lacks a field
('bad_json', 'missing_field'), a media path outside the root or missing
('path_escapes_root', 'missing_media'), an empty chosen answer ('empty_chosen') and a pair
whose chosen and rejected answers are equal ('chosen_equals_rejected').

`ambiguity_pairs` makes ambiguity-aware pairs from any labelled FER dataset (the recipe of
docs/POST_TRAINING.md): chosen = the specific answer (the label word, followed by the
record's reason where the data has one), rejected = a hedge ("it is hard to tell"), several
emotions at once, or a near-miss class.

A pair becomes one example (`PairBuilder`): the media and prompt once, the chosen and the
rejected token sequences as `seq_*` [2, T] (same prompt tokens, different answers), so the
model encodes the media once per pair (logps.py).

GRPO prompts come from the SFT pipeline's batches (`prompt_batch`): each example's prompt is
its tokens before the answer, left-padded, with the options and label for the rewards.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from input_pipeline import instructions as instructions_lib
from input_pipeline import labels as labels_lib
from input_pipeline import pipeline as pipeline_lib
from input_pipeline.records import BadInputError, Record, SkipCounter, check_inside_root

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


@dataclasses.dataclass(frozen=True)
class Pair:
  """A preference pair over one media record."""
  record: Record          # media (+ label when known)
  prompt: str             # the user question (an '<image>' placeholder is added if absent)
  chosen: str
  rejected: str


# ------------------------------------------------------------------------------- reading


def _media_type(path: str, given: str | None) -> str:
  if given:
    if given not in ("image", "video"):
      raise BadInputError("bad_media_type", path, f"media_type {given!r} (image | video)")
    return given
  return "video" if path.lower().endswith(VIDEO_SUFFIXES) else "image"


def parse_pair(d: Mapping[str, Any], root: str, *, where: str = "") -> Pair:
  """One JSON object -> Pair; raises BadInputError with the skip reason."""
  for k in ("media", "prompt", "chosen", "rejected"):
    if k not in d or not isinstance(d[k], str):
      raise BadInputError("missing_field", where, f"no text field {k!r}")
  if not d["chosen"].strip():
    raise BadInputError("empty_chosen", where, "the chosen answer is empty")
  if not d["rejected"].strip():
    raise BadInputError("empty_rejected", where, "the rejected answer is empty")
  if d["chosen"].strip() == d["rejected"].strip():
    raise BadInputError("chosen_equals_rejected", where, repr(d["chosen"]))
  full = check_inside_root(root, d["media"])
  if not os.path.isfile(full):
    raise BadInputError("missing_media", d["media"], f"no file under {root}")
  mtype = _media_type(full, d.get("media_type"))
  rec = Record(dataset=str(d.get("dataset", "pairs")), split="train",
               id=str(d.get("id", d["media"])), media=full, media_type=mtype,
               label=d.get("label"))
  return Pair(rec, d["prompt"], d["chosen"].strip(), d["rejected"].strip())


def read_pairs(path: str, root: str, skips: SkipCounter) -> list[Pair]:
  """Pairs of a preference JSONL file; bad lines are counted skips (strict: an error)."""
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{n}"
      try:
        try:
          d = json.loads(line)
        except json.JSONDecodeError as e:
          raise BadInputError("bad_json", where, str(e)) from None
        if not isinstance(d, dict):
          raise BadInputError("bad_json", where, "not a JSON object")
        out.append(parse_pair(d, root, where=where))
      except BadInputError as e:
        if skips.strict:
          raise
        skips.skip(e.reason, e.path or where, e.detail)
  return out


def write_pairs(pairs: Iterable[Pair], path: str, root: str) -> int:
  """Writes pairs as preference JSONL (media relative to `root`). Returns the count."""
  n = 0
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    for p in pairs:
      media = p.record.media
      if not isinstance(media, str):
        raise ValueError(f"record {p.record.id}: only single-file media can be written")
      f.write(json.dumps({"media": os.path.relpath(media, root),
                          "media_type": "image" if p.record.media_type == "image" else "video",
                          "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                          "id": p.record.id, "label": p.record.label}) + "\n")
      n += 1
  os.replace(path + ".tmp", path)
  return n


# ------------------------------------------------------------------- ambiguity-aware pairs

# Near-miss classes: the expressions FER models and annotators confuse most (shared facial
# actions: raised brows and open eyes in fear / surprise, lowered brows and raised upper lip
# in anger / disgust / contempt, low-intensity sadness read as neutral).
NEAR_MISS = {
  "surprise": ("fear", "happiness"), "fear": ("surprise", "sadness"),
  "disgust": ("anger", "contempt"), "anger": ("disgust", "contempt"),
  "contempt": ("disgust", "neutral"), "happiness": ("surprise", "neutral"),
  "sadness": ("neutral", "fear"), "neutral": ("sadness", "contempt"),
  "anxiety": ("fear", "sadness"), "helplessness": ("sadness", "anxiety"),
  "disappointment": ("sadness", "contempt"),
}
HEDGES = ("it is hard to tell.", "i cannot tell which emotion this is.",
          "the expression is ambiguous.", "it could be any of them.")
REJECTED_KINDS = ("near_miss", "several", "hedge")


def _others(label: str, options: Sequence[str]) -> list[str]:
  return [o for o in options if o != label]


def _near_miss(label: str, options: Sequence[str], rng: np.random.Generator) -> str:
  want = NEAR_MISS.get(labels_lib.canonical(label) or label, ())
  cands = [o for o in options if (labels_lib.canonical(o) or o) in want and o != label]
  return str(rng.choice(cands or _others(label, options)))


def rejected_answer(kind: str, label: str, options: Sequence[str],
                    rng: np.random.Generator) -> str:
  """A rejected answer of `kind` for a sample of class `label` among `options`."""
  if kind == "near_miss":
    return _near_miss(label, options, rng)
  if kind == "several":
    other = _near_miss(label, options, rng)
    pair = [label, other] if rng.random() < 0.5 else [other, label]
    return f"{pair[0]} or {pair[1]}"
  if kind == "hedge":
    return str(rng.choice(HEDGES))
  raise ValueError(f"unknown rejected kind {kind!r}; known: {REJECTED_KINDS}")


def ambiguity_pairs(records: Sequence[Record], *, kinds: Sequence[str] = REJECTED_KINDS,
                    pairs_per_record: int = 1, seed: int = 0,
                    reason_field: str = "reason") -> list[Pair]:
  """Ambiguity-aware pairs from labelled records (ADPO-style): per record and pair, a
  category question with shuffled options, chosen = the label word (plus the record's
  `extra[reason_field]` when present), rejected = one of `kinds` (drawn uniformly)."""
  kinds = tuple(kinds)
  for k in kinds:
    if k not in REJECTED_KINDS:
      raise ValueError(f"unknown rejected kind {k!r}; known: {REJECTED_KINDS}")
  rng = np.random.default_rng(seed)
  out = []
  for rec in records:
    if rec.label is None:
      continue
    for _ in range(pairs_per_record):
      inst = instructions_lib.instruction_for_record(rec, rng=rng, shuffle=True)
      label = inst.options[inst.label_index]
      question = inst.conversations[0]["value"]
      chosen = label
      reason = (rec.extra or {}).get(reason_field)
      if reason:
        chosen = f"{label}. {str(reason).strip()}"
      rejected = rejected_answer(kinds[int(rng.integers(len(kinds)))], label, inst.options,
                                 rng)
      out.append(Pair(rec, question, chosen, rejected))
  return out


# ------------------------------------------------------------------------ pair examples


class PairBuilder(pipeline_lib.ExampleBuilder):
  """Pair -> one example: media keys once, `seq_input_ids` / `seq_attention_mask` /
  `seq_loss_mask` [2, T] (chosen, rejected; T = the longer, right-padded)."""

  def build(self, element: Pair, rng: np.random.Generator) -> dict:
    prompt = element.prompt if "<image>" in element.prompt else f"<image>\n{element.prompt}"
    conv = ({"from": "human", "value": prompt}, {"from": "gpt", "value": element.chosen})
    ex = super().build(dataclasses.replace(element.record, conversations=conv), rng)
    ids, lm, am = ex.pop("input_ids"), ex.pop("loss_mask"), ex.pop("attention_mask")
    ex.pop("label")
    start = int(np.argmax(lm > 0))   # first answer token: the prompt is shared
    rej = np.asarray(self.tokenizer.encode(element.rejected) + [self.tokenizer.eos_id], np.int32)
    rej = rej[:max(self.config.max_length - start, 0)]
    if len(rej) == 0:
      raise BadInputError("too_long", str(element.record.media), "no room for the rejected "
                          f"answer within max_length={self.config.max_length}")
    r_ids = np.concatenate([ids[:start], rej])
    r_am = np.concatenate([am[:start], np.ones_like(rej)])
    r_lm = np.concatenate([np.zeros(start, np.int32), np.ones_like(rej)])
    t = max(len(ids), len(r_ids))
    pad = lambda x, v: np.concatenate([x, np.full(t - len(x), v, np.int32)])  # noqa: E731
    ex["seq_input_ids"] = np.stack([pad(ids, self.tokenizer.pad_id),
                                    pad(r_ids, self.tokenizer.pad_id)])
    ex["seq_attention_mask"] = np.stack([pad(am, 0), pad(r_am, 0)])
    ex["seq_loss_mask"] = np.stack([pad(lm, 0), pad(r_lm, 0)])
    return ex


class PairCollate:
  """Pair examples -> a batch: sequences padded to a bucket length, [B, 2, L]."""

  def __init__(self, bucket_lengths: Sequence[int], pad_id: int):
    self.bucket_lengths = tuple(bucket_lengths)
    self.pad_id = pad_id

  def __call__(self, examples: Sequence[dict]) -> dict:
    length = pipeline_lib.bucket_length(max(e["seq_input_ids"].shape[1] for e in examples),
                                        self.bucket_lengths)
    pads = pipeline_lib.sequence_pad_values(self.pad_id)
    batch = {}
    for key in ("seq_input_ids", "seq_attention_mask", "seq_loss_mask"):
      arr = np.full((len(examples), 2, length), pads[key], np.int32)
      for i, e in enumerate(examples):
        arr[i, :, :e[key].shape[1]] = e[key]
      batch[key] = arr
    for key in examples[0]:
      if key not in batch:
        batch[key] = np.stack([e[key] for e in examples])
    batch["qformer_ids"] = batch["qformer_ids"].astype(np.int32)
    batch["qformer_mask"] = batch["qformer_mask"].astype(np.int32)
    batch["pair_valid"] = np.ones((len(examples),), np.int32)
    return batch


def pair_iterator(pairs: Sequence[Pair], pcfg: pipeline_lib.PipelineConfig, tokenizer,
                  qformer_tokenizer, skips: SkipCounter):
  """A checkpointable grain iterator of pair batches (shuffled, repeated, skips counted)."""
  builder = PairBuilder(pcfg, tokenizer, qformer_tokenizer, strict=skips.strict)
  return pipeline_lib.make_iterator(pairs, pcfg, tokenizer, qformer_tokenizer, skips=skips,
                                    builder=builder,
                                    batch_fn=PairCollate(pcfg.bucket_lengths, tokenizer.pad_id))


# ------------------------------------------------------------------------ GRPO prompts


def prompt_batch(batch: Mapping[str, np.ndarray], pad_id: int) -> dict:
  """An SFT batch (right-padded prompt + answer) -> the prompts alone, left-padded to the
  same length (the generation layout), media keys unchanged."""
  ids = np.asarray(batch["input_ids"])
  am = np.asarray(batch["attention_mask"])
  lm = np.asarray(batch["loss_mask"])
  b, t = ids.shape
  if not (lm > 0).any(axis=1).all():
    raise ValueError("every example needs an answer (loss_mask) to mark its prompt's end")
  starts = np.argmax(lm > 0, axis=1)
  out_ids = np.full((b, t), pad_id, np.int32)
  out_am = np.zeros((b, t), np.int32)
  for i, s in enumerate(starts):
    out_ids[i, t - s:] = ids[i, :s]
    out_am[i, t - s:] = am[i, :s]
  out = {k: np.asarray(v) for k, v in batch.items()
         if k not in ("input_ids", "attention_mask", "loss_mask")}
  out["input_ids"], out["attention_mask"] = out_ids, out_am
  return out


def prompt_fields(prompt: Mapping[str, np.ndarray], tokenizer) -> dict[str, list]:
  """Per prompt: its text ('prompts'), options, label index and label word, read back from
  the tokens (the category question lists the options in braces)."""
  texts, options, answers = [], [], []
  labels = np.asarray(prompt["label"])
  for row, li in zip(np.asarray(prompt["input_ids"]), labels):
    text = tokenizer.decode([int(x) for x in row if x > 0 and x != tokenizer.pad_id])
    opts = instructions_lib.parse_options(text)
    if not opts or not 0 <= int(li) < len(opts):
      raise ValueError(f"cannot read the options / label of the prompt {text!r}")
    texts.append(text)
    options.append(opts)
    answers.append(opts[int(li)])
  return {"prompts": texts, "options": options, "label_index": [int(x) for x in labels],
          "answer": answers}
