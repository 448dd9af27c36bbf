"""Category instructions for any labelled dataset (so it trains without an instruction file).

Fact (FERID; docs/DATASETS.md): a category instruction asks
  "What is the facial expression of the person in the image? Choose one from the
   following options: {surprise, fear, ...}."
and the answer is the label word.

Our choices: 'video' replaces 'image' for clips and frame folders; the options are the
dataset's own class names (or a given `option_names` list, the label mapped onto it
through `labels.canonical` synonyms), listed in an order shuffled by the caller's
seeded generator (training) or in class-list order (`shuffle=False`, evaluation, so the
label index is the dataset's class id); the answer is the option word itself.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from input_pipeline import labels as labels_lib
from input_pipeline.records import BadInputError, Record

QUESTION_TEMPLATE = ("What is the facial expression of the person in the {media}? "
                     "Choose one from the following options: {{{options}}}.")
OPTIONS_RE = re.compile(r"\{([^{}]*)\}")


@dataclasses.dataclass(frozen=True)
class Instruction:
  """A conversation plus what evaluation needs: the options and the label's index."""
  conversations: tuple[dict[str, str], ...]
  options: tuple[str, ...]  # () for free-form conversations
  label_index: int  # index into `options`, -1 if none


def media_word(media_type: str) -> str:
  return "image" if media_type in ("image", "pixels") else "video"


def option_for_label(label: str, options: Sequence[str], *, path: str | None = None) -> int:
  """Index of `label` in `options`, directly or through the synonym table."""
  label = label.strip().lower()
  if label in options:
    return list(options).index(label)
  want = labels_lib.canonical(label)
  if want is not None:
    for i, name in enumerate(options):
      if labels_lib.canonical(name) == want:
        return i
  raise BadInputError("unknown_label", path, f"{label!r} is none of the options {tuple(options)}")


def category_instruction(
    label: str,
    options: Sequence[str],
    *,
    media_type: str = "image",
    rng: np.random.Generator | None = None,
    shuffle: bool = True,
    question_template: str = QUESTION_TEMPLATE,
    path: str | None = None,
) -> Instruction:
  """A one-round category instruction for `label` among `options`.

  Args:
    label: the sample's class name (any synonym of an option is accepted).
    options: the class names to offer, in class-list order.
    media_type: a Record media type ('image' | 'pixels' -> "image", else "video").
    rng: generator for the option order (required when shuffle=True).
    shuffle: shuffle the option order (training) or keep class-list order (eval).
    question_template: str.format template with {media} and {options}.
    path: for error messages.
  """
  options = tuple(o.strip().lower() for o in options)
  idx = option_for_label(label, options, path=path)
  order = np.arange(len(options))
  if shuffle:
    if rng is None:
      raise ValueError("shuffle=True needs a seeded rng")
    order = rng.permutation(len(options))
  shown = tuple(options[i] for i in order)
  answer = options[idx]
  question = question_template.format(media=media_word(media_type), options=", ".join(shown))
  conv = ({"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer})
  return Instruction(conversations=conv, options=shown, label_index=shown.index(answer))


# ---------------------------------------------------------------- action-unit questions
# Our wording (AU-answering FER MLLMs publish no fixed prompts): the AU list question, the
# AU-grounded "why" question, and yes/no judgement questions about an AU or an emotion.

AU_LIST_QUESTION = "Which facial action units are active in the {media}?"
AU_REASON_QUESTION = "Why does this person look {emotion}?"
AU_REASON_ANSWER = "The person looks {emotion} because of {aus}."
AU_JUDGE_QUESTION = "Is {au} active in the {media}? Answer yes or no."
EMOTION_JUDGE_QUESTION = ("Is the facial expression of the person in the {media} {emotion}? "
                          "Answer yes or no.")
OPEN_EMOTION_QUESTION = "How does the person in the {media} feel? Answer with one word."

# Adjectives for "look {emotion}" (class words are nouns in most datasets).
_ADJECTIVE = {"happiness": "happy", "sadness": "sad", "anger": "angry", "surprise": "surprised",
              "fear": "afraid", "disgust": "disgusted", "neutral": "neutral",
              "contempt": "contemptuous"}


def emotion_adjective(label: str) -> str:
  return _ADJECTIVE.get(labels_lib.canonical(label) or label, label)


def _turns(question: str, answer: str | None) -> tuple[dict[str, str], ...]:
  conv = [{"from": "human", "value": f"<image>\n{question}"}]
  if answer is not None:
    conv.append({"from": "gpt", "value": answer})
  return tuple(conv)


def au_list_instruction(active: Sequence[int], *, media_type: str = "image",
                        with_answer: bool = True) -> Instruction:
  """"Which facial action units are active ...?" -> "AU6 (cheek raiser), AU12 (...)"."""
  from input_pipeline import au as au_lib
  q = AU_LIST_QUESTION.format(media=media_word(media_type))
  return Instruction(_turns(q, au_lib.au_list_text(active) if with_answer else None), (), -1)


def au_reason_instruction(emotion: str, active: Sequence[int], *,
                          media_type: str = "image") -> Instruction:
  """"Why does this person look happy?" -> an answer naming the active AUs."""
  from input_pipeline import au as au_lib
  adj = emotion_adjective(emotion)
  a = AU_REASON_ANSWER.format(emotion=adj, aus=au_lib.au_list_text(active))
  return Instruction(_turns(AU_REASON_QUESTION.format(emotion=adj), a), (), -1)


def judgement_instruction(question: str, truth: bool | None) -> Instruction:
  """A yes/no question; options ('yes', 'no') and the label index (-1: no answer)."""
  answer = None if truth is None else ("yes" if truth else "no")
  return Instruction(_turns(question, answer), ("yes", "no"),
                     -1 if truth is None else (0 if truth else 1))


def parse_yes_no(text: str) -> int:
  """0 for yes, 1 for no (the first of the two words the answer says), -1 if neither."""
  for w in labels_lib.words(text):
    if w in ("yes", "yeah", "yep", "true"):
      return 0
    if w in ("no", "not", "nope", "false"):
      return 1
  return -1


def parse_options(question: str) -> tuple[str, ...]:
  """The options listed in braces in a FERID category question, lower case ('()' if none)."""
  found = OPTIONS_RE.findall(question)
  if not found:
    return ()
  return tuple(o.strip().lower() for o in found[-1].split(",") if o.strip())


def instruction_for_record(
    record: Record,
    *,
    rng: np.random.Generator | None = None,
    shuffle: bool = True,
    option_names: Sequence[str] | None = None,
    question_template: str = QUESTION_TEMPLATE,
) -> Instruction:
  """The record's own conversation (FERID) or a generated category instruction.

  For a given conversation, the options are parsed from its first question's braces and
  the label index is that of the first answer among them (-1 if it names none).
  """
  path = record.media if isinstance(record.media, str) else record.id
  if record.conversations:
    conv = tuple(dict(t) for t in record.conversations)
    options = parse_options(conv[0].get("value", "")) if conv else ()
    label_index = -1
    if options and len(conv) > 1:
      words = labels_lib.words(conv[1].get("value", ""))
      for w in words:
        try:
          label_index = option_for_label(w, options)
          break
        except BadInputError:
          continue
    return Instruction(conv, options, label_index)
  if record.label is None and record.aus is not None:
    from input_pipeline import au as au_lib
    active = au_lib.active_aus(record.aus, au_lib.dataset_aus(record.dataset))
    return au_list_instruction(active, media_type=record.media_type)
  if record.label is None:
    raise BadInputError("no_label_or_conversation", path, "cannot build an instruction")
  options = tuple(option_names) if option_names else labels_lib.classes(record.dataset)
  return category_instruction(record.label, options, media_type=record.media_type, rng=rng,
                              shuffle=shuffle, question_template=question_template, path=path)
