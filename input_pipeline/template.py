"""The `vicuna_v1` conversation template: prompt text, token ids, visual slots, loss mask.

The prompt is "{system} USER: {q1} ASSISTANT: {a1}</s>USER: ..." with BOS first and the
`<image>` placeholder at the front of the first user turn, as LLaVA / LLaMA-VID build it.
Ids are built chunk by chunk, so the loss mask is exact by construction (1 on each answer and
its EOS); the placeholder becomes `num_visual_slots` copies of IMAGE_TOKEN_ID (-200,
docs/INTERFACES.md "The batch"); the AGR sentence goes right after the placeholder line.
Truncation to `max_length` never cuts the visual slots: it drops whole rounds, then trims the
first question, then the first answer's tail; if the fixed parts alone do not fit it raises
ValueError (a config error, not a bad input). With `image_turns` > 1 each of the first
`image_turns` user turns gets its own placeholder and slots (LLaMA-VID's per-turn prompts;
a later turn without one gets it at its start or end, `image_position`), and turns beyond
are dropped and reported in `Tokenized.dropped_rounds`. Facts vs our choices:
docs/MODEL.md, "Conversation template".
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol, Sequence

import numpy as np

from input_pipeline.contract import IMAGE_TOKEN, IMAGE_TOKEN_ID
from input_pipeline.records import BadInputError


class TextTokenizer(Protocol):
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ...


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
  """A two-role chat template with separator style TWO (answers end with EOS)."""
  name: str
  system: str
  user: str
  assistant: str
  sep: str = " "


VICUNA_V1 = ConversationTemplate(
    name="vicuna_v1",
    system=("A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's "
            "questions."),
    user="USER",
    assistant="ASSISTANT",
)

TEMPLATES: dict[str, ConversationTemplate] = {VICUNA_V1.name: VICUNA_V1}


def get_template(name: str) -> ConversationTemplate:
  try:
    return TEMPLATES[name]
  except KeyError:
    raise KeyError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}") from None


@dataclasses.dataclass(frozen=True)
class Round:
  question: str
  answer: str | None  # None: the question awaits generation.


def parse_turns(turns: Sequence[Mapping[str, str]], *, path: str | None = None,
                per_turn_images: bool = False) -> list[Round]:
  """LLaVA `conversations` -> rounds; BadInputError('malformed_conversation') if invalid.

  Turns must alternate human, gpt, human, ... starting with human; a final human turn
  without answer is a generation prompt. Role names 'user'/'assistant' are accepted too.
  One '<image>' placeholder in the whole conversation, or (`per_turn_images`) at most one
  per user turn.
  """
  roles = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
  if not turns:
    raise BadInputError("malformed_conversation", path, "no turns")
  rounds: list[Round] = []
  for i, turn in enumerate(turns):
    if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
      raise BadInputError("malformed_conversation", path, f"turn {i} lacks 'from'/'value'")
    role = roles.get(str(turn["from"]).lower())
    want = "human" if i % 2 == 0 else "gpt"
    if role != want:
      raise BadInputError("malformed_conversation", path,
                          f"turn {i} is from {turn['from']!r}, expected {want}")
    if not isinstance(turn["value"], str):
      raise BadInputError("malformed_conversation", path, f"turn {i} value is not text")
    if role == "human":
      rounds.append(Round(turn["value"], None))
    else:
      rounds[-1] = Round(rounds[-1].question, turn["value"].strip())
  if per_turn_images:
    many = [i for i, r in enumerate(rounds) if r.question.count(IMAGE_TOKEN) > 1]
    if many:
      raise BadInputError("malformed_conversation", path,
                          f"user turn {many[0]} holds {rounds[many[0]].question.count(IMAGE_TOKEN)} "
                          f"{IMAGE_TOKEN} placeholders; one per turn is supported")
  else:
    n_images = sum(r.question.count(IMAGE_TOKEN) for r in rounds)
    if n_images > 1:
      raise BadInputError("malformed_conversation", path,
                          f"{n_images} {IMAGE_TOKEN} placeholders; one visual input is supported "
                          "(set image_turns > 1 for one per turn)")
  if any(r.answer is None for r in rounds[:-1]):
    raise BadInputError("malformed_conversation", path, "an unanswered turn before the last")
  return rounds


def _split_first_question(question: str, agr_sentence: str | None) -> str:
  """The first question without placeholder, with the AGR sentence in front."""
  text = question.replace(IMAGE_TOKEN, "").strip()
  if agr_sentence:
    text = f"{agr_sentence.strip()} {text}".strip()
  return text


def _later_question(question: str) -> str:
  return question.replace(IMAGE_TOKEN, "").strip()


def render_prompt(rounds: Sequence[Round], template: ConversationTemplate = VICUNA_V1,
                  *, agr_sentence: str | None = None,
                  image_positions: Sequence[str | None] | None = None) -> str:
  """The prompt as text, '<image>' and '</s>' spelled out (for reading and for tests).

  image_positions: per round 'start' | 'end' | None (no placeholder); default: the first
  round 'start', the others None (`Tokenized.image_positions` gives a tokenisation's).
  """
  t = template
  if image_positions is None:
    image_positions = ["start"] + [None] * (len(rounds) - 1)
  parts = []
  for i, (r, pos) in enumerate(zip(rounds, image_positions)):
    if i == 0:
      q = _split_first_question(r.question, agr_sentence)
      parts.append(f"{t.system}{t.sep}")
    else:
      q = _later_question(r.question) if pos else r.question.strip()
    if pos == "start":
      q = f"{IMAGE_TOKEN}\n{q}"
    elif pos == "end":
      q = f"{q}\n{IMAGE_TOKEN}"
    parts.append(f"{t.user}: {q}{t.sep}{t.assistant}:")
    if r.answer is not None:
      parts.append(f" {r.answer}</s>")
  return "".join(parts)


def qformer_text(question: str) -> str:
  """A user turn as the Q-Former's text: LLaMA-VID's guided prompt, the turn with every
  '<image>' and every newline removed (`value.replace('<image>', '').replace('\\n', '')`,
  `llamavid/train/train.py`); no AGR sentence."""
  return question.replace(IMAGE_TOKEN, "").replace("\n", "")


def image_layout(rounds: Sequence[Round], image_turns: int, image_position: str = "start",
                 rng: np.random.Generator | None = None) -> list[str | None]:
  """Per round where its placeholder goes: 'start' | 'end' | None.

  Round 0 always 'start'; with image_turns > 1 the rounds 1..image_turns-1 get one too: at
  the start if the turn carries '<image>', else at `image_position` ('random': start or end
  from `rng`, as LLaMA-VID draws it).
  """
  if image_position not in ("start", "end", "random"):
    raise ValueError(f"image_position must be 'start', 'end' or 'random', got {image_position!r}")
  out: list[str | None] = []
  for i, r in enumerate(rounds):
    if i == 0:
      out.append("start")
    elif i >= image_turns:
      out.append(None)
    elif IMAGE_TOKEN in r.question or image_position == "start":
      out.append("start")
    elif image_position == "end":
      out.append("end")
    else:
      if rng is None:
        raise ValueError("image_position='random' needs a seeded rng")
      out.append("start" if int(rng.integers(0, 2)) == 0 else "end")
  return out


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """One conversation as ids. Arrays are int32 [T]."""
  input_ids: np.ndarray
  loss_mask: np.ndarray
  image_start: int  # position of the first visual slot
  num_rounds: int  # rounds kept after truncation
  truncated: bool
  image_starts: tuple[int, ...] = ()  # first slot of each visual block, in order
  image_rounds: tuple[int, ...] = ()  # the (parsed) round index of each visual block
  image_positions: tuple[str | None, ...] = ()  # per kept round: 'start' | 'end' | None
  dropped_rounds: int = 0  # rounds beyond image_turns that were left out


# Segment kinds: which ones carry loss, and which may be trimmed.
_FIXED, _SLOTS, _QUESTION, _ANSWER = "fixed", "slots", "question", "answer"


def tokenize_conversation(
    turns: Sequence[Mapping[str, str]] | Sequence[Round],
    tokenizer: TextTokenizer,
    *,
    num_visual_slots: int,
    max_length: int,
    template: ConversationTemplate = VICUNA_V1,
    agr_sentence: str | None = None,
    path: str | None = None,
    image_turns: int = 1,
    image_position: str = "start",
    rng: np.random.Generator | None = None,
) -> Tokenized:
  """Ids and loss mask of a (multi-turn) conversation with its visual slots.

  Args:
    turns: LLaVA `conversations` (or parsed rounds). The first user turn gets the
      placeholder; a final unanswered user turn makes a generation prompt ending in
      "ASSISTANT:".
    tokenizer: a LlamaTokenizer (or anything with encode/bos_id/eos_id).
    num_visual_slots: slots per placeholder (F_max * tokens_per_frame).
    max_length: the longest allowed sequence, slots included.
    template: the conversation template.
    agr_sentence: optional age/gender/race sentence put into the first user turn.
    path: for error messages.
    image_turns: how many leading user turns get their own placeholder (LLaMA-VID: each);
      1 keeps one visual block in the first turn. With more, rounds beyond it are dropped.
    image_position: where a later turn without '<image>' gets it ('start' | 'end' |
      'random' with `rng`).
    rng: generator for image_position='random'.
  """
  if image_turns < 1:
    raise ValueError(f"image_turns must be >= 1, got {image_turns}")
  if turns and isinstance(turns[0], Round):
    rounds = list(turns)
  else:
    rounds = parse_turns(turns, path=path, per_turn_images=image_turns > 1)
  t = template
  enc = tokenizer.encode
  generation = rounds[-1].answer is None

  order = list(range(len(rounds)))  # parsed round index of each kept round
  dropped = 0
  if image_turns > 1 and len(rounds) > image_turns:
    dropped = len(rounds) - image_turns
    order = order[:image_turns - 1] + [order[-1]] if generation else order[:image_turns]
  kept = [rounds[i] for i in order]
  positions = image_layout(kept, image_turns, image_position, rng)

  # Per round: a list of [kind, ids] segments. Text is cut where LLaVA's
  # tokenizer_image_token cuts it ('<image>', '</s>') and at single spaces.
  per_round: list[list[list]] = []
  for i, (r, pos) in enumerate(zip(kept, positions)):
    segs: list[list] = []
    if i == 0:
      # Chunk before the placeholder: BOS + "{system} USER: " (ends in a '▁' token).
      segs.append([_FIXED, [tokenizer.bos_id] + enc(f"{t.system}{t.sep}{t.user}: ")])
      segs.append([_SLOTS, [IMAGE_TOKEN_ID] * num_visual_slots])
      segs.append([_QUESTION, enc("\n" + _split_first_question(r.question, agr_sentence))])
      segs.append([_FIXED, enc(f"{t.assistant}:")])
    elif pos == "start":  # "USER: <image>\n{q} ASSISTANT:"
      segs.append([_FIXED, enc(f"{t.user}: ")])
      segs.append([_SLOTS, [IMAGE_TOKEN_ID] * num_visual_slots])
      segs.append([_QUESTION, enc("\n" + _later_question(r.question))])
      segs.append([_FIXED, enc(f"{t.assistant}:")])
    elif pos == "end":  # "USER: {q}\n<image> ASSISTANT:"
      segs.append([_FIXED, enc(f"{t.user}:")])
      segs.append([_QUESTION, enc(_later_question(r.question) + "\n")])
      segs.append([_SLOTS, [IMAGE_TOKEN_ID] * num_visual_slots])
      segs.append([_FIXED, enc(f"{t.sep}{t.assistant}:")])
    else:
      segs.append([_FIXED, enc(f"{t.user}:")])
      segs.append([_QUESTION, enc(r.question.strip())])
      segs.append([_FIXED, enc(f"{t.assistant}:")])
    if r.answer is not None:
      segs.append([_ANSWER, enc(r.answer) + [tokenizer.eos_id]])
    per_round.append(segs)

  def total(rs):
    return sum(len(ids) for segs in rs for _, ids in segs)

  truncated = dropped > 0
  while total(per_round) > max_length and len(per_round) > (2 if generation else 1):
    k = len(per_round) - (2 if generation else 1)  # keep round 0 (and the asked round)
    del per_round[k], order[k], positions[k]
    truncated = True
  # Trim text of the first round: its question, then its answer (never slots).
  for kind in (_QUESTION, _ANSWER):
    excess = total(per_round) - max_length
    if excess <= 0:
      break
    for seg in per_round[0]:
      if seg[0] == kind and excess > 0:
        cut = min(excess, len(seg[1]))
        seg[1] = seg[1][:len(seg[1]) - cut]
        excess -= cut
        truncated = True
  if total(per_round) > max_length:
    raise ValueError(
        f"max_length={max_length} cannot hold the prompt's fixed text and "
        f"{num_visual_slots} visual slots ({total(per_round)} tokens after trimming)")

  ids: list[int] = []
  mask: list[int] = []
  starts: list[int] = []
  image_rounds: list[int] = []
  for r_index, segs in zip(order, per_round):
    for kind, seg_ids in segs:
      if kind == _SLOTS:
        starts.append(len(ids))
        image_rounds.append(r_index)
      ids.extend(seg_ids)
      mask.extend([1 if kind == _ANSWER else 0] * len(seg_ids))
  return Tokenized(
      input_ids=np.asarray(ids, np.int32),
      loss_mask=np.asarray(mask, np.int32),
      image_start=starts[0],
      num_rounds=len(per_round),
      truncated=truncated,
      image_starts=tuple(starts),
      image_rounds=tuple(image_rounds),
      image_positions=tuple(positions),
      dropped_rounds=dropped,
  )


def qformer_texts(turns: Sequence[Mapping[str, str]] | Sequence[Round],
                  tokenized: Tokenized) -> list[str]:
  """The Q-Former text of each visual block of `tokenized` (its round's question)."""
  rounds = list(turns) if turns and isinstance(turns[0], Round) else parse_turns(
      turns, per_turn_images=True)
  return [qformer_text(rounds[i].question) for i in tokenized.image_rounds]


def first_question(turns: Sequence[Mapping[str, str]] | Sequence[Round]) -> str:
  """The first user question without placeholder (for reading; the Q-Former's text is
  `qformer_text`)."""
  rounds = list(turns) if turns and isinstance(turns[0], Round) else parse_turns(turns)
  return _split_first_question(rounds[0].question, None)
