"""MAFW (single-label, 11 classes, 5-fold cross-validation) as distributed.

```
<root>/data/clips/00151.mp4  (or <root>/clips/00151.mp4)
<root>/Train & Test Set/single/no_caption/set_N/{train,test}.txt   (copies differ:)
      split/single/no_caption/set_N/...   Train_Test_Set/single/no_caption_new/set_N/...
```
Each split line is a clip name and a label string (`00151.mp4 anger`); copies differ in
separator (space or tab) and encoding (some GBK), so lines are split on any whitespace and
read as UTF-8 with a GBK fallback. Classes: anger, disgust, fear, happiness, neutral,
sadness, surprise, contempt, anxiety, helplessness, disappointment.
"""
from __future__ import annotations

import os

from input_pipeline.datasets import _common
from input_pipeline.records import Record, SkipCounter

SPLITS = ("train", "test")
_SPLIT_DIRS = (
    ("split", "single", "no_caption"),
    ("Train_Test_Set", "single", "no_caption_new"),
    ("Train_Test_Set", "single", "no_caption"),
    ("Train & Test Set", "single", "no_caption"),
    ("Train & Test Set", "single", "no_caption_new"),
)
_CLIP_DIRS = (("data", "clips"), ("clips",), ("data", "clips_10045"))
_FRAME_DIRS = (("data", "frames"), ("frames",))


def split_file(root: str, split: str, fold: int) -> str:
  cands = []
  for parts in _SPLIT_DIRS:
    for base in (root, os.path.join(root, "data")):
      cands.append(os.path.join(base, *parts, f"set_{fold}", f"{split}.txt"))
  return _common.first_existing(cands, f"MAFW {split}.txt of fold {fold}", root)


def _media_dir(root: str, media: str) -> str:
  for parts in (_CLIP_DIRS if media == "clip" else _FRAME_DIRS):
    d = os.path.join(root, *parts)
    if os.path.isdir(d):
      return d
  return os.path.join(root, *(_CLIP_DIRS[0] if media == "clip" else _FRAME_DIRS[0]))


def load(root: str, split: str | None = "train", fold: int | None = None, *,
         skips: SkipCounter, media: str = "clip", check_files: bool = True) -> list[Record]:
  """Records of one split ('train' | 'test' | None for both) of fold 1..5 (default 1).

  Args:
    media: 'clip' (clips/*.mp4) or 'frames' (frames/<id>/ image folders).
  """
  _common.check_split(split, SPLITS, "mafw")
  fold = _common.check_fold(fold, "mafw")
  if media not in ("clip", "frames"):
    raise ValueError(f"mafw: media must be 'clip' or 'frames', got {media!r}")
  media_dir = _media_dir(root, media)
  records = []
  for sp in (SPLITS if split is None else (split,)):
    path = split_file(root, sp, fold)
    for lineno, line in enumerate(_common.read_lines(path, ("utf-8-sig", "gbk")), 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      parts = line.split()
      if len(parts) != 2:
        skips.skip("malformed_line", where, repr(line))
        continue
      name, raw_label = parts
      label = _common.dataset_label("mafw", raw_label, skips, where)
      if label is None:
        continue
      stem, ext = os.path.splitext(name)
      found = _common.clip_or_frames(media_dir, name if ext else stem + ".mp4", stem, media,
                                     skips, check_files)
      if found is None:
        continue
      rec_media, media_type = found
      records.append(Record(dataset="mafw", split=sp, id=stem, media=rec_media,
                            media_type=media_type, label=label, fold=fold))
  return records
