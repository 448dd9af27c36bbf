"""DFEW as distributed (5-fold cross-validation).

```
<root>/Clip/original/XXXXX.mp4                   (16,372 clips)
<root>/Clip/clip_224x224/XXXXX/*.jpg             (face-aligned frames)
<root>/Clip/clip_224x224_16f/XXXXX/*.jpg         (16 interpolated frames)
<root>/EmoLabel_DataSplit/train(single-labeled)/set_{1..5}.csv
<root>/EmoLabel_DataSplit/test(single-labeled)/set_{1..5}.csv
```
CSV header `video_name,label`; video_name is an unpadded integer (padded to 5 digits here);
label 1..7 = happy, sad, neutral, angry, surprise, disgust, fear. Some copies spell the
folders `train(single_labeled)`: both are accepted. Frames are sorted naturally.
"""
from __future__ import annotations

import os

from input_pipeline.datasets import _common
from input_pipeline.records import Record, SkipCounter

SPLITS = ("train", "test")
MEDIA = {"clip": os.path.join("Clip", "original"),
         "frames": os.path.join("Clip", "clip_224x224"),
         "frames16": os.path.join("Clip", "clip_224x224_16f")}


def split_file(root: str, split: str, fold: int) -> str:
  return _common.first_existing(
      [os.path.join(root, "EmoLabel_DataSplit", f"{split}({sep}labeled)", f"set_{fold}.csv")
       for sep in ("single-", "single_")],
      f"DFEW {split} split of fold {fold}", root)


def _find_clip(folder: str, stem: str) -> str:
  for ext in _common.VIDEO_EXTS:
    p = os.path.join(folder, stem + ext)
    if os.path.exists(p):
      return p
  return os.path.join(folder, stem + ".mp4")


def load(root: str, split: str | None = "train", fold: int | None = None, *,
         skips: SkipCounter, media: str = "clip", check_files: bool = True,
         dataset: str = "dfew", label_space: str = "dfew") -> list[Record]:
  """Records of one split ('train' | 'test' | None for both) of fold 1..5 (default 1).

  Args:
    media: 'clip' (Clip/original/*.mp4), 'frames' (Clip/clip_224x224/<id>/) or
      'frames16' (Clip/clip_224x224_16f/<id>/).
    dataset: the name written into the records (the synthetic clips reuse this reader).
    label_space: class list whose spelling the labels take ('dfew'; 'synthetic' maps
      happy -> happiness etc.). Ids are always DFEW's 1..7.
  """
  _common.check_split(split, SPLITS, "dfew")
  fold = _common.check_fold(fold, "dfew")
  if media not in MEDIA:
    raise ValueError(f"dfew: media must be one of {sorted(MEDIA)}, got {media!r}")
  media_dir = os.path.join(root, MEDIA[media])
  records = []
  for sp in (SPLITS if split is None else (split,)):
    path = split_file(root, sp, fold)
    rows = _common.read_csv(path)
    for i, row in enumerate(rows):
      if not row or not any(c.strip() for c in row):
        continue
      if i == 0 and row[0].strip().lower() == "video_name":
        continue
      where = f"{path}:{i + 1}"
      if len(row) < 2:
        skips.skip("malformed_row", where, repr(row))
        continue
      try:
        stem = f"{int(row[0].strip()):05d}"
      except ValueError:
        skips.skip("malformed_row", where, f"video_name {row[0]!r} is not an integer")
        continue
      label = _common.label_from_id("dfew", row[1], 1, skips, where)
      if label is None:
        continue
      if label_space != "dfew":
        label = _common.dataset_label(label_space, label, skips, where)
      if media == "clip":
        clip = _common.inside(media_dir, os.path.basename(_find_clip(media_dir, stem)), skips)
        if clip is None or not _common.exists_or_skip(clip, skips, check_files):
          continue
        rec_media, media_type = clip, "video"
      else:
        folder = os.path.join(media_dir, stem)
        frames = _common.frame_files(folder)
        if not frames:
          skips.skip("missing_file" if not os.path.isdir(folder) else "no_frames", folder)
          continue
        rec_media, media_type = frames, "frames"
      records.append(Record(dataset=dataset, split=sp, id=stem, media=rec_media,
                            media_type=media_type, label=label, fold=fold))
  return records

