"""AU detection metric as the literature computes it, and the all-positive baseline.

Per test fold: the prediction of AU i on a frame is `probability >= 0.5` (equivalently
`logit >= 0`); true / false positives and false negatives are summed over *all* frames of
the fold (pooled, not averaged per subject or batch); F1_i = 2 P R / (P + R) with P, R
from those counts; the fold's score is the mean of F1_i over the AUs. Frames whose label
of AU i is uncoded (-1) are left out of AU i's counts. The three folds' means are
reported beside their mean. An AU with no positive and no predicted positive has F1 0
(ME-GraphAU's eps formula and sklearn's `zero_division=0` agree on that).
Sources: ME-GraphAU `utils.py` (statistics, update_statistics_list, calc_f1_score),
JAA-Net `util.py` (AU_detection_evalv1); see docs/ACTION_UNITS.md.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

THRESHOLD = 0.5


@dataclasses.dataclass
class AUCounts:
  """Pooled per-AU counts over the frames of one fold."""
  tp: np.ndarray
  fp: np.ndarray
  fn: np.ndarray
  positives: np.ndarray   # coded positive labels per AU
  coded: np.ndarray       # coded labels per AU

  def __add__(self, other: "AUCounts") -> "AUCounts":
    return AUCounts(*(getattr(self, f.name) + getattr(other, f.name)
                      for f in dataclasses.fields(self)))


def predictions(scores: np.ndarray, *, from_logits: bool = False,
                threshold: float = THRESHOLD) -> np.ndarray:
  """0/1 predictions: probability >= threshold (logits: sigmoid(logit) >= threshold)."""
  scores = np.asarray(scores, np.float64)
  if from_logits:
    scores = 1.0 / (1.0 + np.exp(-scores))
  return (scores >= threshold).astype(np.int8)


def counts(pred: np.ndarray, labels: np.ndarray) -> AUCounts:
  """Counts of 0/1 predictions [N, K] against labels [N, K] (1, 0, or -1 = uncoded)."""
  pred = np.asarray(pred)
  labels = np.asarray(labels)
  if pred.shape != labels.shape:
    raise ValueError(f"predictions {pred.shape} and labels {labels.shape} differ")
  bad = ~np.isin(labels, (-1, 0, 1))
  if bad.any():
    raise ValueError(f"labels must be 1, 0 or -1 (uncoded), got {np.unique(labels[bad])}")
  coded = labels >= 0
  p = (pred == 1) & coded
  y = (labels == 1)
  return AUCounts(tp=(p & y).sum(0), fp=(p & ~y & coded).sum(0), fn=(~p & y).sum(0),
                  positives=y.sum(0), coded=coded.sum(0))


def f1_per_au(c: AUCounts) -> np.ndarray:
  tp, fp, fn = (np.asarray(x, np.float64) for x in (c.tp, c.fp, c.fn))
  denom = 2 * tp + fp + fn
  return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def fold_scores(c: AUCounts, aus: Sequence[int]) -> dict:
  f1 = f1_per_au(c)
  return {"mean_f1": float(f1.mean()), "f1": {f"AU{a}": float(v) for a, v in zip(aus, f1)},
          "frames": int(c.coded.max()) if len(c.coded) else 0,
          "positive_rate": {f"AU{a}": float(p / max(n, 1))
                            for a, p, n in zip(aus, c.positives, c.coded)}}


def all_positive_f1(c: AUCounts) -> np.ndarray:
  """F1 per AU of predicting every AU present on every frame: 2 r / (1 + r)."""
  pos, coded = np.asarray(c.positives, np.float64), np.asarray(c.coded, np.float64)
  return np.where(coded > 0, 2 * pos / np.maximum(pos + coded, 1), 0.0)


def report(folds: Mapping[int, AUCounts], aus: Sequence[int]) -> dict:
  """{'folds': {k: fold scores + all-positive baseline}, 'mean_f1' (mean over the folds'
  means), 'mean_f1_per_au' (mean over folds), 'all_positive_mean_f1'}."""
  if not folds:
    raise ValueError("no folds to report")
  out = {"aus": [f"AU{a}" for a in aus], "folds": {}}
  means, per_au, base = [], [], []
  for k, c in sorted(folds.items()):
    s = fold_scores(c, aus)
    b = all_positive_f1(c)
    s["all_positive_mean_f1"] = float(b.mean())
    out["folds"][str(k)] = s
    means.append(s["mean_f1"])
    per_au.append(f1_per_au(c))
    base.append(b.mean())
  out["mean_f1"] = float(np.mean(means))
  out["mean_f1_per_au"] = {f"AU{a}": float(v) for a, v in zip(aus, np.mean(per_au, 0))}
  out["all_positive_mean_f1"] = float(np.mean(base))
  return out


def markdown(rep: Mapping, title: str = "Action units") -> str:
  """Per-fold table (F1 per AU, mean) with the mean over folds and the baseline."""
  aus = rep["aus"]
  lines = [f"### {title}", "",
           "| fold | " + " | ".join(aus) + " | mean F1 | all-positive |",
           "|---|" + "---|" * (len(aus) + 2)]
  for k, s in rep["folds"].items():
    lines.append(f"| {k} | " + " | ".join(f"{100 * s['f1'][a]:.1f}" for a in aus)
                 + f" | **{100 * s['mean_f1']:.1f}** | {100 * s['all_positive_mean_f1']:.1f} |")
  lines.append("| mean | " + " | ".join(f"{100 * rep['mean_f1_per_au'][a]:.1f}" for a in aus)
               + f" | **{100 * rep['mean_f1']:.1f}** | {100 * rep['all_positive_mean_f1']:.1f} |")
  return "\n".join(lines) + "\n"
