"""FERPlus in both distributed forms.

1. Pixel CSVs: `fer2013.csv` (`emotion,pixels,Usage`; 2,304 uint8 = 48x48 gray; Usage
   Training / PublicTest / PrivateTest) and `fer2013new.csv` (`Usage,Image name,neutral,
   happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF`). The two are paired
   by ROW POSITION, not by image name (names skip rows, 173 are empty = NF, 4 repeat).
2. Image folders `FER2013Train`, `FER2013Valid`, `FER2013Test`, each with a `label.csv` of
   lines `fer0032220.png,"(0, 0, 48, 48)",0,0,0,0,2,1,0,7,0,0` (name, box, 10 votes).

Label: the FERPlus majority vote (Microsoft's FERPlus reference rule): votes <= 1 count 0;
the label is the argmax over the 10 columns if its votes exceed half the remaining sum,
else 'unknown'; 'unknown' and 'NF' (not a face) are dropped by the protocol.
Splits: train = Training / FER2013Train, val = PublicTest / FER2013Valid,
test = PrivateTest / FER2013Test (the 3,573-image test set).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from input_pipeline import labels as labels_lib
from input_pipeline.datasets import _common
from input_pipeline.records import BadInputError, Record, SkipCounter

SPLITS = ("train", "val", "test")
_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
_FOLDER = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}
VOTE_COLUMNS = labels_lib.classes("ferplus") + ("unknown", "nf")


def majority_vote(votes: Sequence[float]) -> str:
  """FERPlus majority label of 10 vote counts: a class name, 'unknown' or 'nf'."""
  if len(votes) != len(VOTE_COLUMNS):
    raise ValueError(f"expected {len(VOTE_COLUMNS)} votes, got {len(votes)}")
  v = np.array([0.0 if x <= 1 else float(x) for x in votes])
  top = float(v.max())
  if top > 0.5 * float(v.sum()):
    return VOTE_COLUMNS[int(np.argmax(v))]
  return "unknown"


def _find(root: str, *names: str) -> str | None:
  for base in (root, os.path.join(root, "data")):
    p = os.path.join(base, *names)
    if os.path.exists(p):
      return p
  return None


def load(root: str, split: str | None = "train", fold: int | None = None, *,
         skips: SkipCounter, form: str = "auto", check_files: bool = True) -> list[Record]:
  """Records of one split ('train' | 'val' | 'test' | None for all).

  Args:
    form: 'csv' (fer2013.csv + fer2013new.csv), 'folders' (FER2013*/label.csv) or 'auto'
      (folders if present, else the CSVs).
  """
  del fold
  _common.check_split(split, SPLITS, "ferplus")
  has_folders = any(_find(root, f) for f in _FOLDER.values())
  if form == "auto":
    form = "folders" if has_folders else "csv"
  if form == "folders":
    return _load_folders(root, split, skips, check_files)
  if form == "csv":
    return _load_csv(root, split, skips)
  raise ValueError(f"ferplus: form must be 'auto', 'csv' or 'folders', got {form!r}")


def _vote_label(votes_raw: Sequence[str], where: str, skips: SkipCounter
                ) -> tuple[str | None, tuple[int, ...] | None]:
  try:
    votes = tuple(int(float(v)) for v in votes_raw)
    label = majority_vote(votes)
  except ValueError as e:
    skips.skip("malformed_row", where, str(e))
    return None, None
  if label in ("unknown", "nf"):
    skips.note(f"ferplus_{label}")
    return None, votes
  return label, votes


def _load_folders(root: str, split: str | None, skips: SkipCounter,
                  check_files: bool) -> list[Record]:
  records = []
  for sp in (SPLITS if split is None else (split,)):
    folder = _find(root, _FOLDER[sp])
    if folder is None:
      raise BadInputError("missing_file", root, f"FERPlus folder {_FOLDER[sp]} not found")
    label_path = os.path.join(folder, "label.csv")
    if not os.path.isfile(label_path):
      raise BadInputError("missing_file", label_path, "FERPlus label.csv not found")
    rows = _common.read_csv(label_path)
    for i, row in enumerate(rows):
      if not row or not any(c.strip() for c in row):
        continue
      where = f"{label_path}:{i + 1}"
      if len(row) != 2 + len(VOTE_COLUMNS):
        skips.skip("malformed_row", where, f"{len(row)} columns, expected {2 + len(VOTE_COLUMNS)}")
        continue
      label, votes = _vote_label(row[2:], where, skips)
      if label is None:
        continue
      path = _common.inside(folder, row[0].strip(), skips)
      if path is None or not _common.exists_or_skip(path, skips, check_files):
        continue
      records.append(Record(dataset="ferplus", split=sp, id=os.path.splitext(row[0].strip())[0],
                            media=path, media_type="image", label=label,
                            extra={"votes": votes, "box": row[1]}))
  return records


def _load_csv(root: str, split: str | None, skips: SkipCounter) -> list[Record]:
  old_path, new_path = _find(root, "fer2013.csv"), _find(root, "fer2013new.csv")
  if old_path is None or new_path is None:
    raise BadInputError("missing_file", root,
                        "FERPlus needs FER2013*/label.csv folders or fer2013.csv + fer2013new.csv")
  old = _common.read_csv(old_path)
  new = _common.read_csv(new_path)
  # Both files have a header row; detect rather than assume.
  if old and old[0] and old[0][0].strip().lower() == "emotion":
    old = old[1:]
  if new and new[0] and new[0][0].strip().lower() == "usage":
    new = new[1:]
  old = [r for r in old if any(c.strip() for c in r)]
  new = [r for r in new if any(c.strip() for c in r)]
  if len(old) != len(new):
    # Pairing is by position: a length mismatch would shift every label, so never guess.
    raise BadInputError("row_count_mismatch", new_path,
                        f"{len(new)} vote rows vs {len(old)} pixel rows in {old_path}")
  records = []
  for i, (o, n) in enumerate(zip(old, new)):
    where = f"{new_path}:row {i + 1}"
    if len(o) < 3 or len(n) != 2 + len(VOTE_COLUMNS):
      skips.skip("malformed_row", where, f"columns: pixels row {len(o)}, vote row {len(n)}")
      continue
    usage = o[2].strip()
    if usage not in _USAGE:
      skips.skip("malformed_row", where, f"unknown Usage {usage!r}")
      continue
    if n[0].strip() != usage:
      skips.skip("usage_mismatch", where, f"{usage!r} vs {n[0].strip()!r}")
      continue
    sp = _USAGE[usage]
    if split is not None and sp != split:
      continue
    if not n[1].strip():  # no image name: FERPlus marks the row not-a-face.
      skips.note("ferplus_nf")
      continue
    label, votes = _vote_label(n[2:], where, skips)
    if label is None:
      continue
    try:
      pixels = np.array([int(p) for p in o[1].split()], dtype=np.int64)
    except ValueError as e:
      skips.skip("malformed_row", where, f"pixels: {e}")
      continue
    if pixels.size != 48 * 48 or pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
      skips.skip("malformed_row", where, f"{pixels.size} pixels, expected 2304 uint8")
      continue
    records.append(Record(dataset="ferplus", split=sp, id=os.path.splitext(n[1].strip())[0],
                          media="", media_type="pixels", label=label,
                          pixels=pixels.astype(np.uint8).reshape(48, 48),
                          extra={"votes": votes, "row": i, "fer2013_emotion": o[0].strip()}))
  return records
