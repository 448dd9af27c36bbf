"""FER metrics: answer -> class parsing, confusion matrices, UAR / WAR, group breakdowns.

Paper facts (docs/MODEL.md, "Evaluation"): WAR is the accuracy (weighted average recall), UAR the
unweighted mean of the per-class recalls; DFEW and MAFW report the mean over 5 folds.
Our choices: a free-text answer maps to a class by lower-casing, stripping punctuation,
mapping synonyms through `input_pipeline.labels.canonical` and taking the *first* word
that names one of the options; an answer that names none is "unparsed" and counts as
wrong (it has its own column in the confusion matrix, so it is never dropped silently).
Classes with no test sample are left out of the UAR mean (their recall is undefined).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from input_pipeline import labels as labels_lib

UNPARSED = -1


def parse_answer(text: str, options: Sequence[str]) -> int:
  """Index of the first option that `text` names, or UNPARSED (-1).

  `options` are class words (any dataset's spelling). A word of the answer matches an
  option if it is the option itself or a synonym of it (happy / joy -> happiness).
  """
  canon = [labels_lib.canonical(o) or o.strip().lower() for o in options]
  lowered = [o.strip().lower() for o in options]
  for word in labels_lib.words(text):
    if word in lowered:
      return lowered.index(word)
    c = labels_lib.canonical(word)
    if c is not None and c in canon:
      return canon.index(c)
  return UNPARSED


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int],
                     num_classes: int) -> np.ndarray:
  """int64 [C, C + 1]: rows true class, columns predicted class; the last column counts
  unparsed / out-of-range predictions (always wrong)."""
  y_true = np.asarray(y_true, np.int64).reshape(-1)
  y_pred = np.asarray(y_pred, np.int64).reshape(-1)
  if y_true.shape != y_pred.shape:
    raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in length")
  if y_true.size and (y_true.min() < 0 or y_true.max() >= num_classes):
    raise ValueError(f"true labels must be in [0, {num_classes}), got "
                     f"[{y_true.min()}, {y_true.max()}]")
  pred = np.where((y_pred < 0) | (y_pred >= num_classes), num_classes, y_pred)
  cm = np.zeros((num_classes, num_classes + 1), np.int64)
  np.add.at(cm, (y_true, pred), 1)
  return cm


def war(cm: np.ndarray) -> float:
  """Weighted average recall = accuracy."""
  total = cm.sum()
  return float(np.trace(cm[:, :cm.shape[0]]) / total) if total else float("nan")


def per_class_recall(cm: np.ndarray) -> np.ndarray:
  """Recall of each class (NaN for classes without samples)."""
  support = cm.sum(axis=1).astype(np.float64)
  diag = np.diag(cm[:, :cm.shape[0]]).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(support > 0, diag / np.maximum(support, 1), np.nan)


def uar(cm: np.ndarray) -> float:
  """Unweighted average recall over the classes that have samples."""
  r = per_class_recall(cm)
  r = r[~np.isnan(r)]
  return float(r.mean()) if r.size else float("nan")


@dataclasses.dataclass
class Scores:
  """UAR / WAR of one evaluation, with its confusion matrix."""
  uar: float
  war: float
  num_samples: int
  num_unparsed: int
  confusion: np.ndarray
  classes: tuple[str, ...]

  def to_json(self) -> dict:
    return {
        "uar": self.uar, "war": self.war, "num_samples": self.num_samples,
        "num_unparsed": self.num_unparsed, "classes": list(self.classes),
        "confusion": self.confusion.tolist(),
        "per_class_recall": {c: (None if np.isnan(r) else float(r))
                             for c, r in zip(self.classes, per_class_recall(self.confusion))},
    }


def score(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> Scores:
  cm = confusion_matrix(y_true, y_pred, len(classes))
  return Scores(uar=uar(cm), war=war(cm), num_samples=int(cm.sum()),
                num_unparsed=int(cm[:, -1].sum()), confusion=cm, classes=tuple(classes))


def mean_over_folds(fold_scores: Sequence[Scores]) -> dict:
  """DFEW / MAFW protocol: UAR and WAR averaged over folds (each fold weighs the same)."""
  if not fold_scores:
    raise ValueError("no folds to average")
  return {
      "uar": float(np.mean([s.uar for s in fold_scores])),
      "war": float(np.mean([s.war for s in fold_scores])),
      "uar_std": float(np.std([s.uar for s in fold_scores])),
      "war_std": float(np.std([s.war for s in fold_scores])),
      "num_folds": len(fold_scores),
  }


def group_breakdown(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str],
                    groups: Mapping[str, Sequence[str]]) -> dict[str, dict[str, dict]]:
  """UAR / WAR per value of each grouping (e.g. {'age': [...], 'gender': [...]}).

  Returns {group_name: {group_value: {'uar', 'war', 'num_samples'}}}.
  """
  y_true = np.asarray(y_true)
  y_pred = np.asarray(y_pred)
  out: dict[str, dict[str, dict]] = {}
  for name, values in groups.items():
    values = np.asarray(values, dtype=object)
    if values.shape[0] != y_true.shape[0]:
      raise ValueError(f"group {name!r} has {values.shape[0]} values for {y_true.shape[0]} samples")
    out[name] = {}
    for v in sorted(set(values.tolist()), key=str):
      sel = values == v
      s = score(y_true[sel], y_pred[sel], classes)
      out[name][str(v)] = {"uar": s.uar, "war": s.war, "num_samples": s.num_samples}
  return out
