"""BP4D-Spontaneous action-unit occurrence labels (12 AUs, 3 subject-exclusive folds).

```
<root>/AUCoding/AU_OCC/F001_T1.csv                 (or <root>/AU_OCC/F001_T1.csv)
<root>/<image dir>/F001/T1/2440.jpg                 frames: 'img' (ME-GraphAU, no padding),
<root>/<image dir>/F001/T1/0732.jpg                   JAA-Net style zero padding, or any
                                                      other padding / .png
<root>/<video dir>/F001_T1.avi | 2F01_01.avi        videos (raw task codes, see below)
```
Label CSV: one header row of integer column names; column '0' is the frame number (the
original video's frame index), column 'k' is AU k: 1 present, 0 absent, 9 not coded.
The records carry the 12 AUs 1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24 (`aus=` picks
another list, e.g. the synthetic data's) as int8 with 9 -> -1 (never 0).

Frames: the image of CSV frame f is the file of the sequence folder whose stem is the
integer f, whatever its zero padding. Videos: CSV frame f is the f-th decoded frame
(1-based); the raw release names tasks by codes (`2F01_09.avi` = F001 T5:
_01 T1, _03 T2, _07 T3, _08 T4, _09 T5, _10 T6, _11 T7, _13 T8), renamed copies
`F001_T5.avi` / `2F01_T5.avi` work too. Video records have `media_type='video'` and
`extra['frame']`; extract the frames once for training (`input_pipeline.au_data`).

Folds: fold k tests on the subjects of part FOLD_TEST_PART[k] of `au.BP4D_PARTS` and trains
on the other two. Bad input is counted: unparsable file names ('malformed_name'), missing
AU columns ('missing_au_column', whole file), values other than 0 / 1 / 9
('bad_au_value', the row), missing images or videos ('missing_file'). Frames whose AUs are
all 9 are protocol exclusions (`SkipCounter.note('au_not_coded')`), as are subjects in no
fold list ('subject_not_in_folds').
"""
from __future__ import annotations

import csv
import os
import re

from input_pipeline import au as au_lib
from input_pipeline.datasets import _common
from input_pipeline.records import Record, SkipCounter

SPLITS = ("train", "test")
LABEL_DIRS = (os.path.join("AUCoding", "AU_OCC"), "AU_OCC")
IMAGE_DIRS = ("img", "images", "Images", "2DFaces", "Sequences(2D+3D)", "BP4D", "")
VIDEO_DIRS = ("", "videos", "Videos", "video", "2D+3D")
TASK_VIDEO_CODE = {"T1": "01", "T2": "03", "T3": "07", "T4": "08", "T5": "09", "T6": "10",
                   "T7": "11", "T8": "13"}
MEDIA = ("frames", "video")
_NAME = re.compile(r"^([FMfm])(\d+)_[Tt](\d+)\.csv$")


def label_dir(root: str) -> str:
  return _common.first_existing([os.path.join(root, d) for d in LABEL_DIRS],
                                "BP4D AU_OCC label folder", root)


def _stem_map(folder: str) -> dict[int, str]:
  """{int(stem): path} of the images in a sequence folder (any zero padding)."""
  out = {}
  for path in _common.frame_files(folder):
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem.isdigit():
      out.setdefault(int(stem), path)
  return out


def _sequence_folder(root: str, image_dir: str | None, subject: str, task: str) -> str:
  dirs = (image_dir,) if image_dir is not None else IMAGE_DIRS
  cands = [os.path.join(root, d, subject, task) for d in dirs]
  for c in cands:
    if os.path.isdir(c):
      return c
  return cands[0]


def _video(root: str, video_dir: str | None, subject: str, task: str) -> str | None:
  raw = f"2{subject[0]}{subject[-2:]}"
  stems = (f"{subject}_{task}", f"{raw}_{task}", f"{raw}_{TASK_VIDEO_CODE.get(task, '')}",
           os.path.join(subject, task))
  for d in ((video_dir,) if video_dir is not None else VIDEO_DIRS):
    for stem in stems:
      for ext in _common.VIDEO_EXTS:
        p = os.path.join(root, d, stem + ext)
        if os.path.isfile(p):
          return p
  return None


def parse_value(raw: str) -> int | None:
  """1 / 0 as they are, 9 (not coded) -> -1; anything else None."""
  try:
    v = float(raw)
  except ValueError:
    return None
  if v == 9:
    return au_lib.UNCODED
  if v in (0, 1):
    return int(v)
  return None


def read_label_csv(path: str, aus: tuple[int, ...], skips: SkipCounter
                   ) -> list[tuple[int, tuple[int, ...]]] | None:
  """[(frame, AU vector)] of one AU_OCC CSV; None (counted) if the file is unusable."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    rows = list(csv.reader(f))
  if not rows:
    skips.skip("malformed_file", path, "empty CSV")
    return None
  header = [h.strip() for h in rows[0]]
  try:
    frame_col = header.index("0")
    cols = [header.index(str(a)) for a in aus]
  except ValueError:
    missing = [c for c in ["0"] + [str(a) for a in aus] if c not in header]
    skips.skip("missing_au_column", path, f"no column(s) {missing} in the header")
    return None
  out = []
  for i, row in enumerate(rows[1:], 2):
    if not row or not any(c.strip() for c in row):
      continue
    where = f"{path}:{i}"
    if len(row) < len(header):
      skips.skip("malformed_row", where, f"{len(row)} fields, header has {len(header)}")
      continue
    try:
      frame = int(float(row[frame_col]))
    except ValueError:
      skips.skip("malformed_row", where, f"frame {row[frame_col]!r} is not an integer")
      continue
    vals = [parse_value(row[c]) for c in cols]
    bad = [(a, row[c]) for a, c, v in zip(aus, cols, vals) if v is None]
    if bad:
      skips.skip("bad_au_value", where, f"AU values {bad} are not 0, 1 or 9")
      continue
    out.append((frame, tuple(vals)))
  return out


def load(root: str, split: str | None = "train", fold: int | None = None, *,
         skips: SkipCounter, media: str = "frames", image_dir: str | None = None,
         video_dir: str | None = None, check_files: bool = True, dataset: str = "bp4d",
         aus: tuple[int, ...] | None = None) -> list[Record]:
  """Frame records of one split ('train' | 'test' | None for both) of fold 1..3 (default 1).

  Args:
    media: 'frames' (extracted images) or 'video' (per-sequence videos; records carry
      `extra['frame']`, the 1-based decoded frame index).
    image_dir / video_dir: folder under `root` holding `<S>/<T>/` frame folders or the
      videos (default: the first of IMAGE_DIRS / VIDEO_DIRS that has the sequence).
    dataset: the name written into the records (the synthetic AU data reuses this reader).
    aus: the AU columns to read (default `au.dataset_aus(dataset)`).
  """
  _common.check_split(split, SPLITS, "bp4d")
  fold = _common.check_fold(fold, "bp4d", au_lib.NUM_FOLDS)
  if media not in MEDIA:
    raise ValueError(f"bp4d: media must be one of {MEDIA}, got {media!r}")
  aus = tuple(aus) if aus is not None else au_lib.dataset_aus(dataset)
  splits = SPLITS if split is None else (split,)
  want = {s: sp for sp in splits for s in au_lib.fold_subjects("bp4d", fold, sp)}
  ldir = label_dir(root)
  records = []
  for name in _common.natural_sorted(os.listdir(ldir)):
    if not name.lower().endswith(".csv"):
      continue
    path = os.path.join(ldir, name)
    m = _NAME.match(name)
    if not m:
      skips.skip("malformed_name", path, "expected <F|M><nnn>_T<k>.csv")
      continue
    subject = f"{m.group(1).upper()}{int(m.group(2)):03d}"
    task = f"T{int(m.group(3))}"
    if au_lib.subject_fold_of("bp4d", subject) is None:
      skips.note("subject_not_in_folds")
      continue
    if subject not in want:
      continue
    rows = read_label_csv(path, aus, skips)
    if rows is None:
      continue
    if media == "frames":
      folder = _sequence_folder(root, image_dir, subject, task)
      if _common.inside(root, os.path.relpath(folder, root), skips) is None:
        continue
      images = _stem_map(folder) if check_files else {}
    else:
      video = _video(root, video_dir, subject, task)
      if video is None:
        skips.skip("missing_file", os.path.join(root, f"{subject}_{task}"),
                   f"no video of {subject} {task} (tried {subject}_{task}, 2{subject[0]}"
                   f"{subject[-2:]}_{TASK_VIDEO_CODE.get(task, '?')} under {VIDEO_DIRS})")
        continue
    for frame, vec in rows:
      if all(v == au_lib.UNCODED for v in vec):
        skips.note("au_not_coded")
        continue
      extra = {"subject": subject, "task": task, "frame": frame}
      if media == "frames":
        img = images.get(frame) if check_files else os.path.join(folder, f"{frame}.jpg")
        if img is None:
          skips.skip("missing_file", os.path.join(folder, f"{frame}.*"),
                     f"no image for CSV frame {frame}")
          continue
      records.append(_common.au_frame_record(
          dataset, want[subject], f"{subject}_{task}_{frame}",
          img if media == "frames" else video, media, fold, vec, extra))
  return records
