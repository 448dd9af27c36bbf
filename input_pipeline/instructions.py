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
  if record.label is None:
    raise BadInputError("no_label_or_conversation", path, "cannot build an instruction")
  options = tuple(option_names) if option_names else labels_lib.classes(record.dataset)
  return category_instruction(record.label, options, media_type=record.media_type, rng=rng,
                              shuffle=shuffle, question_template=question_template, path=path)
