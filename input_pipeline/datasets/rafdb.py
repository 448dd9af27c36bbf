"""RAF-DB (basic) as distributed.

```
<root>/EmoLabel/list_patition_label.txt     ("patition": the release's spelling)
<root>/Image/aligned/train_00001_aligned.jpg, test_0001_aligned.jpg
<root>/Image/original/train_00001.jpg
```
Label lines `train_00001.jpg 5`, ids 1..7 (1-based) = surprise, fear, disgust, happiness,
sadness, anger, neutral. The split is the name prefix. `root` may be `.../basic` or its
parent (release facts: docs/DATASETS.md).
"""
from __future__ import annotations

import os

from input_pipeline.datasets import _common
from input_pipeline.records import BadInputError, Record, SkipCounter

LABEL_FILE = os.path.join("EmoLabel", "list_patition_label.txt")
SPLITS = ("train", "test")


def find_base(root: str) -> str:
  """The directory holding EmoLabel/: `root` itself or `root/basic`."""
  for base in (root, os.path.join(root, "basic")):
    if os.path.isfile(os.path.join(base, LABEL_FILE)):
      return base
  raise BadInputError("missing_file", root,
                      f"no {LABEL_FILE} under the root or its basic/ folder")


def load(root: str, split: str | None = "train", fold: int | None = None, *,
         skips: SkipCounter, aligned: bool = True, check_files: bool = True,
         dataset: str = "rafdb") -> list[Record]:
  """Records of one split ('train' | 'test' | None for both).

  Args:
    aligned: read `Image/aligned/<stem>_aligned.jpg` (the 100x100 aligned faces, our
      default) or `Image/original/<stem>.jpg` (raw images; crop faces with media.crop_face).
    check_files: count missing images as skips at listing time.
    dataset: the name written into the records (the synthetic data reuses this reader).
  """
  del fold  # RAF-DB has one fixed split.
  _common.check_split(split, SPLITS, "rafdb")
  base = find_base(root)
  label_path = os.path.join(base, LABEL_FILE)
  records = []
  for lineno, line in enumerate(_common.read_lines(label_path), 1):
    if not line.strip():
      continue
    where = f"{label_path}:{lineno}"
    parts = line.split()
    if len(parts) != 2:
      skips.skip("malformed_line", where, repr(line))
      continue
    name, raw_label = parts
    stem, _ = os.path.splitext(name)
    prefix = stem.split("_", 1)[0]
    if prefix not in SPLITS:
      skips.skip("malformed_line", where, f"name {name!r} has no train_/test_ prefix")
      continue
    if split is not None and prefix != split:
      continue
    label = _common.label_from_id(dataset if dataset in ("rafdb", "synthetic") else "rafdb",
                                  raw_label, 1, skips, where)
    if label is None:
      continue
    rel = (os.path.join("Image", "aligned", f"{stem}_aligned.jpg") if aligned
           else os.path.join("Image", "original", name))
    path = _common.inside(base, rel, skips)
    if path is None or not _common.exists_or_skip(path, skips, check_files):
      continue
    records.append(Record(dataset=dataset, split=prefix, id=stem, media=path,
                          media_type="image", label=label))
  return records
