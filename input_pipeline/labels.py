"""Class lists of each dataset (the release's id order) and the emotion vocabulary.

Class names are lower case, spelled as each dataset spells them. `canonical()` maps any
of them (and common synonyms) to one vocabulary, so answers and labels compare across
datasets: happy/happiness/joy -> happiness, angry/anger -> anger, ...
"""
from __future__ import annotations

import re

# Index i is the class with (0-based) id i in the release; see docs/DATASETS.md.
CLASSES: dict[str, tuple[str, ...]] = {
    # RAF-DB basic: ids 1..7 in the label file.
    "rafdb": ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"),
    # AffectNet expression 0..7 (8 none, 9 uncertain, 10 non-face are dropped).
    "affectnet": ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"),
    "affectnet7": ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger"),
    # FERPlus vote columns.
    "ferplus": ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"),
    # DFEW ids 1..7.
    "dfew": ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"),
    "ferv39k": ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"),
    "mafw": ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise",
             "contempt", "anxiety", "helplessness", "disappointment"),
    # The procedural data of input_pipeline.synthetic (RAF-DB layout and ids).
    "synthetic": ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"),
}

# Surface form -> canonical emotion word.
SYNONYMS: dict[str, str] = {
    "happy": "happiness", "happiness": "happiness", "joy": "happiness", "joyful": "happiness",
    "smiling": "happiness", "glad": "happiness", "pleased": "happiness", "cheerful": "happiness",
    "sad": "sadness", "sadness": "sadness", "unhappy": "sadness", "sorrow": "sadness",
    "sorrowful": "sadness", "upset": "sadness",
    "angry": "anger", "anger": "anger", "mad": "anger", "furious": "anger", "rage": "anger",
    "annoyed": "anger",
    "surprise": "surprise", "surprised": "surprise", "astonished": "surprise",
    "amazed": "surprise", "shocked": "surprise",
    "fear": "fear", "afraid": "fear", "scared": "fear", "fearful": "fear", "frightened": "fear",
    "terrified": "fear",
    "disgust": "disgust", "disgusted": "disgust", "revulsion": "disgust",
    "neutral": "neutral", "calm": "neutral", "expressionless": "neutral",
    "contempt": "contempt", "contemptuous": "contempt", "scorn": "contempt",
    "anxiety": "anxiety", "anxious": "anxiety", "nervous": "anxiety", "worried": "anxiety",
    "helplessness": "helplessness", "helpless": "helplessness",
    "disappointment": "disappointment", "disappointed": "disappointment",
}

_WORD = re.compile(r"[a-z]+")


def canonical(word: str) -> str | None:
  """The canonical emotion for a surface word, or None if it names no emotion."""
  return SYNONYMS.get(word.strip().lower())


def classes(dataset: str) -> tuple[str, ...]:
  try:
    return CLASSES[dataset]
  except KeyError:
    raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(CLASSES)}") from None


def label_index(dataset: str, label: str) -> int:
  """Index of `label` in the dataset's class list (accepts synonyms); KeyError if none."""
  names = classes(dataset)
  label = label.strip().lower()
  if label in names:
    return names.index(label)
  want = canonical(label)
  for i, name in enumerate(names):
    if want is not None and canonical(name) == want:
      return i
  raise KeyError(f"label {label!r} is not a class of {dataset}: {names}")


def words(text: str) -> list[str]:
  """Lower-case alphabetic words of `text` (punctuation stripped)."""
  return _WORD.findall(text.lower())
