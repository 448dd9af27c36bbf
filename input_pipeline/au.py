"""Facial action units (FACS): names, the AU lists and subject folds of BP4D and DISFA,
per-fold class weights, and the AU sentence / AU-list parsing the LLM side uses.

Dataset facts (docs/ACTION_UNITS.md has the sources):
- BP4D: 12 AUs 1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24; 41 subjects in three
  subject-exclusive parts (the ME-GraphAU / JAA-Net / SACL lists).
- DISFA: 8 AUs 1, 2, 4, 6, 9, 12, 25, 26 for detection; 27 subjects in three parts.
- Fold k tests on part FOLD_TEST_PART[k] and trains on the other two (fold 1 tests part 3,
  as ME-GraphAU numbers its folds; some papers call part 1 "fold 1").
- Class weight of AU i: w_i = (1 / r_i) / sum_j (1 / r_j) * N_AU, r_i the positive rate of
  AU i among the coded frames of the *training* folds.

Label vectors: int8, 1 = present, 0 = absent, -1 = not coded (BP4D's 9, a missing DISFA
line). -1 is never turned into 0: losses and metrics leave those entries out.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

UNCODED = -1

# FACS names of the AUs the supported datasets and the synthetic faces use.
AU_NAMES: dict[int, str] = {
    1: "inner brow raiser", 2: "outer brow raiser", 4: "brow lowerer",
    5: "upper lid raiser", 6: "cheek raiser", 7: "lid tightener", 9: "nose wrinkler",
    10: "upper lip raiser", 12: "lip corner puller", 14: "dimpler",
    15: "lip corner depressor", 17: "chin raiser", 20: "lip stretcher",
    23: "lip tightener", 24: "lip pressor", 25: "lips part", 26: "jaw drop",
}

# The AUs each dataset's records carry, in vector order.
DATASET_AUS: dict[str, tuple[int, ...]] = {
    "bp4d": (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24),
    "disfa": (1, 2, 4, 6, 9, 12, 25, 26),
    # The procedural faces of input_pipeline.synthetic (the AUs it can draw).
    "synthetic_au": (1, 2, 4, 5, 6, 7, 9, 10, 12, 15, 20, 24, 25, 26),
}

# DISFA codes 12 AUs by intensity 0..5; detection uses 8 of them at intensity >= 2.
DISFA_CODED_AUS = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)
DISFA_OCCURRENCE_THRESHOLD = 2

BP4D_PARTS: tuple[tuple[str, ...], ...] = (
    ("F001", "M007", "F018", "F008", "F002", "M004", "F010", "F009", "M012", "M001", "F016",
     "M014", "F023", "M008"),
    ("M011", "F003", "M010", "M002", "F005", "F022", "M018", "M017", "F013", "M016", "F020",
     "F011", "M013", "M005"),
    ("F007", "F015", "F006", "F019", "M006", "M009", "F012", "M003", "F004", "F021", "F017",
     "M015", "F014"),
)
DISFA_PARTS: tuple[tuple[str, ...], ...] = (
    ("SN002", "SN010", "SN001", "SN026", "SN027", "SN032", "SN030", "SN009", "SN016"),
    ("SN013", "SN018", "SN011", "SN028", "SN012", "SN006", "SN031", "SN021", "SN024"),
    ("SN003", "SN029", "SN023", "SN025", "SN008", "SN005", "SN007", "SN017", "SN004"),
)
PARTS = {"bp4d": BP4D_PARTS, "disfa": DISFA_PARTS}
NUM_FOLDS = 3
FOLD_TEST_PART = {1: 3, 2: 2, 3: 1}   # 1-based part numbers

AU_TEMPLATE = "Active facial action units: {aus}."
NO_AU_TEXT = "none"


def dataset_aus(dataset: str) -> tuple[int, ...]:
  try:
    return DATASET_AUS[dataset]
  except KeyError:
    raise KeyError(f"no AU list for dataset {dataset!r}; known: {sorted(DATASET_AUS)}") from None


def fold_subjects(dataset: str, fold: int, split: str) -> tuple[str, ...]:
  """Subjects of `split` ('train' | 'test') of fold 1..3 of 'bp4d' or 'disfa'."""
  if fold not in FOLD_TEST_PART:
    raise ValueError(f"{dataset}: fold must be in 1..{NUM_FOLDS}, got {fold}")
  parts = PARTS[dataset]
  test = FOLD_TEST_PART[fold] - 1
  if split == "test":
    return parts[test]
  if split == "train":
    return tuple(s for i, p in enumerate(parts) if i != test for s in p)
  raise ValueError(f"{dataset}: split must be 'train' or 'test', got {split!r}")


def subject_fold_of(dataset: str, subject: str) -> int | None:
  """The fold whose *test* set holds `subject` (None if in no part)."""
  for fold, part in FOLD_TEST_PART.items():
    if subject in PARTS[dataset][part - 1]:
      return fold
  return None


def label_matrix(records: Iterable) -> np.ndarray:
  """int8 [N, K] of the records' `aus` vectors (all of one AU list)."""
  rows = [r.aus for r in records]
  if not rows:
    raise ValueError("no records")
  if any(r is None for r in rows):
    raise ValueError("a record has no AU labels (aus=None)")
  return np.asarray(rows, np.int8)


def positive_rates(labels: np.ndarray) -> np.ndarray:
  """Positive rate per AU over its coded entries (uncoded -1 left out); float64 [K]."""
  labels = np.asarray(labels)
  coded = labels >= 0
  n = coded.sum(0)
  if np.any(n == 0):
    raise ValueError(f"AU columns {np.flatnonzero(n == 0).tolist()} have no coded frame")
  return (labels == 1).sum(0) / n


def class_weights(labels: np.ndarray) -> np.ndarray:
  """w_i = (1/r_i) / sum_j (1/r_j) * K from the training labels [N, K] (-1 = uncoded).

  An AU with no positive frame would get an infinite weight; its rate is floored at one
  positive among its coded frames (our choice; the reference scripts divide by zero).
  """
  labels = np.asarray(labels)
  rates = positive_rates(labels)
  floor = 1.0 / (labels >= 0).sum(0)
  inv = 1.0 / np.maximum(rates, floor)
  return inv / inv.sum() * labels.shape[1]


def au_label(au: int) -> str:
  return f"AU{au}"


def au_sentence(active: Sequence[int], template: str = AU_TEMPLATE, *,
                with_names: bool = True) -> str:
  """The AU prompt sentence, e.g. 'Active facial action units: AU6 (cheek raiser), AU12
  (lip corner puller).' (template field {aus}; 'none' if no AU is active)."""
  return template.format(aus=au_list_text(active, with_names=with_names))


def au_list_text(active: Sequence[int], *, with_names: bool = True) -> str:
  if not active:
    return NO_AU_TEXT
  parts = []
  for a in sorted(active):
    name = AU_NAMES.get(a)
    parts.append(f"{au_label(a)} ({name})" if with_names and name else au_label(a))
  return ", ".join(parts)


_AU_RE = re.compile(r"\bau\s*0*(\d{1,2})\b", re.IGNORECASE)


def parse_au_list(text: str, allowed: Sequence[int] | None = None) -> tuple[int, ...]:
  """AU numbers an answer names ('AU6', 'au 12', 'AU06'; FACS names such as 'cheek
  raiser' too), sorted, restricted to `allowed` when given."""
  found = {int(m) for m in _AU_RE.findall(text)}
  low = " ".join(text.lower().split())
  for au, name in AU_NAMES.items():
    if name in low:
      found.add(au)
  if allowed is not None:
    found &= set(allowed)
  return tuple(sorted(found))


def active_aus(vector: Sequence[int], aus: Sequence[int]) -> tuple[int, ...]:
  """AU numbers whose entry in a label / prediction vector is 1."""
  return tuple(a for a, v in zip(aus, vector) if int(v) == 1)


def vector_from_aus(active: Iterable[int], aus: Sequence[int]) -> np.ndarray:
  s = set(active)
  return np.asarray([1 if a in s else 0 for a in aus], np.int8)
