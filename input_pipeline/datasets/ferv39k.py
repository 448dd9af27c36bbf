"""FERV39k as distributed.

```
<root>/0_7_LabelClips/<Scene>/<Class>/<NNNN>.mp4
<root>/2_ClipsforFaceCrop/<Scene>/<Class>/<NNNN>/*.jpg
<root>/4_setups/All_scenes/train_All.csv, test_All.csv
```
Split files have no header: space-separated `<Scene>/<Class>/<NNNN> <Class>`, e.g.
`Action/Sad/0010 Sad`. Classes happy, sad, neutral, angry, surprise, disgust, fear (folder
names capitalised). One split: 31,088 train / 7,847 test.
"""
from __future__ import annotations

import os

from input_pipeline.datasets import _common
from input_pipeline.records import Record, SkipCounter

SPLITS = ("train", "test")
MEDIA = {"clip": "0_7_LabelClips", "frames": "2_ClipsforFaceCrop"}


def load(root: str, split: str | None = "train", fold: int | None = None, *,
         skips: SkipCounter, media: str = "clip", check_files: bool = True) -> list[Record]:
  """Records of 'train' | 'test' | None (both).

  Args:
    media: 'clip' (0_7_LabelClips/*.mp4) or 'frames' (2_ClipsforFaceCrop/<clip>/ folders
      of face crops).
  """
  del fold
  _common.check_split(split, SPLITS, "ferv39k")
  if media not in MEDIA:
    raise ValueError(f"ferv39k: media must be one of {sorted(MEDIA)}, got {media!r}")
  media_dir = os.path.join(root, MEDIA[media])
  records = []
  for sp in (SPLITS if split is None else (split,)):
    path = _common.first_existing(
        [os.path.join(root, "4_setups", "All_scenes", f"{sp}_All.csv"),
         os.path.join(root, "4_setups", "All_scenes", f"{sp}_All.txt")],
        f"FERV39k {sp}_All.csv", root)
    for lineno, line in enumerate(_common.read_lines(path), 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      parts = line.replace(",", " ").split()
      if len(parts) != 2:
        skips.skip("malformed_line", where, repr(line))
        continue
      rel, raw_label = parts
      label = _common.dataset_label("ferv39k", raw_label, skips, where)
      if label is None:
        continue
      found = _common.clip_or_frames(media_dir, rel + ".mp4", rel, media, skips, check_files)
      if found is None:
        continue
      rec_media, media_type = found
      scene = rel.split("/", 1)[0]
      records.append(Record(dataset="ferv39k", split=sp, id=rel, media=rec_media,
                            media_type=media_type, label=label, extra={"scene": scene}))
  return records
