"""AffectNet (manually annotated) as distributed.

```
<root>/Manually_Annotated_file_lists/training.csv, validation.csv
<root>/Manually_Annotated/Manually_Annotated_Images/<subDirectory_filePath>
```
Columns `subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,
expression,valence,arousal`; landmarks are 136 numbers joined by ';' (x, y interleaved).
expression 0..7 = neutral, happy, sad, surprise, fear, disgust, anger, contempt; 8 none,
9 uncertain, 10 non-face are dropped by the protocol (AffectNet-7 drops 7 too). There is
no public test set: 'val' (alias 'test') is validation.csv. Whether a CSV has a header row
differs between copies, so it is detected (release facts: docs/DATASETS.md).
"""
from __future__ import annotations

import os

from input_pipeline import labels as labels_lib
from input_pipeline.datasets import _common
from input_pipeline.records import Record, SkipCounter

SPLITS = ("train", "val", "test")
_CSV = {"train": "training.csv", "val": "validation.csv", "test": "validation.csv"}
_EXCLUDED = {8: "none", 9: "uncertain", 10: "non-face"}
HEADER = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
          "facial_landmarks", "expression", "valence", "arousal")


def _csv_path(root: str, split: str) -> str:
  name = _CSV[split]
  return _common.first_existing(
      [os.path.join(root, "Manually_Annotated_file_lists", name), os.path.join(root, name)],
      f"AffectNet {name}", root)


def _image_dir(root: str) -> str:
  for d in (os.path.join(root, "Manually_Annotated", "Manually_Annotated_Images"),
            os.path.join(root, "Manually_Annotated_Images"),
            os.path.join(root, "Manually_Annotated")):
    if os.path.isdir(d):
      return d
  return os.path.join(root, "Manually_Annotated", "Manually_Annotated_Images")


def _is_header(row: list[str]) -> bool:
  """A header row names its columns; a data row has an integer expression column."""
  if not row:
    return False
  if row[0].strip().lower() == HEADER[0].lower():
    return True
  try:
    int(row[6])
    return False
  except (IndexError, ValueError):
    return True


def load(root: str, split: str | None = "train", fold: int | None = None, *,
         skips: SkipCounter, num_classes: int = 8, check_files: bool = True) -> list[Record]:
  """Records of 'train' (training.csv) or 'val'/'test' (validation.csv); None = both.

  Args:
    num_classes: 8 (AffectNet-8, with contempt) or 7 (AffectNet-7, contempt dropped).
  """
  del fold
  _common.check_split(split, SPLITS, "affectnet")
  if num_classes not in (7, 8):
    raise ValueError(f"affectnet: num_classes must be 7 or 8, got {num_classes}")
  dataset = "affectnet" if num_classes == 8 else "affectnet7"
  names = labels_lib.classes(dataset)
  image_dir = _image_dir(root)
  records = []
  for sp in (("train", "val") if split is None else (split,)):
    out_split = "val" if sp in ("val", "test") else "train"
    path = _csv_path(root, sp)
    rows = _common.read_csv(path)
    for i, row in enumerate(rows):
      if i == 0 and _is_header(row):
        continue
      if not row or not any(c.strip() for c in row):
        continue
      where = f"{path}:{i + 1}"
      if len(row) < 7:
        skips.skip("malformed_row", where, f"{len(row)} columns, need >= 7")
        continue
      try:
        expr = int(row[6])
        box = tuple(float(v) for v in row[1:5])
        lms = tuple(float(v) for v in row[5].split(";")) if row[5].strip() else None
        valence = float(row[7]) if len(row) > 7 and row[7].strip() else None
        arousal = float(row[8]) if len(row) > 8 and row[8].strip() else None
      except ValueError as e:
        skips.skip("malformed_row", where, str(e))
        continue
      if lms is not None and len(lms) != 136:
        skips.skip("malformed_row", where, f"{len(lms)} landmark numbers, expected 136")
        continue
      if expr in _EXCLUDED:
        skips.note(f"affectnet_{_EXCLUDED[expr]}")
        continue
      if expr == 7 and num_classes == 7:
        skips.note("affectnet7_contempt")
        continue
      if not 0 <= expr < len(names):
        skips.skip("unknown_label", where, f"expression {expr}")
        continue
      img = _common.inside(image_dir, row[0].strip(), skips)
      if img is None or not _common.exists_or_skip(img, skips, check_files):
        continue
      records.append(Record(
          dataset=dataset, split=out_split, id=row[0].strip(), media=img, media_type="image",
          label=names[expr], crop_box=box, landmarks=lms,
          extra={"valence": valence, "arousal": arousal}))
  return records
