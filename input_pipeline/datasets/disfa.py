"""DISFA action-unit intensities as occurrence labels (8 AUs, 3 subject-exclusive folds).

```
<root>/ActionUnit_Labels/SN001/SN001_au1.txt            'frame,intensity' per line, 0..5
<root>/Videos_LeftCamera/LeftVideoSN001_comp.avi         (or leftVideoSN001_Comp.avi, ...)
<root>/Videos_RightCamera/RightVideoSN001_comp.avi
<root>/<image dir>/SN001/0.png                           extracted frames, 0-based names
```
Detection uses AUs 1, 2, 4, 6, 9, 12, 25, 26; an AU occurs when its intensity is >= 2.
Label frame f (1-based) is video frame f (the f-th decoded frame) and image `f-1`
(ME-GraphAU and JAA-Net name extracted frames from 0; `frame_offset` changes that). Name
variants: subject folders and files zero-padded or not (SN001 / SN1, _au1 / _au01), video
names in any case (`LeftVideo` / `leftVideo`, `_comp` / `_Comp`).

A frame missing from one AU's file leaves that AU uncoded (-1, never 0). Bad input is
counted: unparsable lines or intensities outside 0..5 ('bad_au_value': that AU of that
frame stays -1), a missing AU file ('missing_file': the subject is skipped), missing images
or videos ('missing_file'). Subjects in no fold list are a protocol note.
"""
from __future__ import annotations

import os
import re

from input_pipeline import au as au_lib
from input_pipeline.datasets import _common
from input_pipeline.records import Record, SkipCounter

SPLITS = ("train", "test")
LABEL_DIR = "ActionUnit_Labels"
IMAGE_DIRS = ("img", "images", "Images", "frames", "Frames", "")
CAMERAS = {"left": ("Videos_LeftCamera", "leftvideo"), "right": ("Videos_RightCamera",
                                                                   "rightvideo")}
MEDIA = ("frames", "video")
_SUBJECT = re.compile(r"^sn0*(\d+)$", re.IGNORECASE)
_AU_FILE = re.compile(r"^sn0*(\d+)_au0*(\d+)\.txt$", re.IGNORECASE)


def subject_name(n: int) -> str:
  return f"SN{n:03d}"


def _subject_dirs(folder: str) -> dict[str, str]:
  out = {}
  if not os.path.isdir(folder):
    return out
  for name in os.listdir(folder):
    m = _SUBJECT.match(name)
    if m and os.path.isdir(os.path.join(folder, name)):
      out.setdefault(subject_name(int(m.group(1))), os.path.join(folder, name))
  return out


def read_au_file(path: str, skips: SkipCounter) -> dict[int, int]:
  """{frame: intensity} of one `SNxxx_auK.txt`; bad lines counted ('bad_au_value')."""
  out = {}
  for i, line in enumerate(_common.read_lines(path), 1):
    if not line.strip():
      continue
    parts = [p for p in re.split(r"[,\s]+", line.strip()) if p]
    try:
      frame, value = int(parts[0]), int(float(parts[1]))
      if not 0 <= value <= 5 or float(parts[1]) != value or len(parts) != 2:
        raise ValueError
    except (ValueError, IndexError):
      skips.skip("bad_au_value", f"{path}:{i}", f"expected 'frame,intensity 0..5', got "
                 f"{line.strip()!r}")
      continue
    out[frame] = value
  return out


def _video(root: str, camera: str, subject: str) -> str | None:
  folder, prefix = CAMERAS[camera]
  d = os.path.join(root, folder)
  if not os.path.isdir(d):
    return None
  n = int(subject[2:])
  pat = re.compile(rf"^{prefix}sn0*{n}_comp(\.\w+)$", re.IGNORECASE)
  for name in sorted(os.listdir(d)):
    m = pat.match(name)
    if m and m.group(1).lower() in _common.VIDEO_EXTS:
      return os.path.join(d, name)
  return None


def load(root: str, split: str | None = "train", fold: int | None = None, *,
         skips: SkipCounter, media: str = "frames", camera: str = "left",
         image_dir: str | None = None, frame_offset: int = -1, check_files: bool = True,
         dataset: str = "disfa", aus: tuple[int, ...] | None = None) -> list[Record]:
  """Frame records of one split ('train' | 'test' | None for both) of fold 1..3 (default 1).

  Args:
    media: 'frames' (extracted images) or 'video' (`camera`'s videos; records carry
      `extra['frame']`, the 1-based decoded frame index).
    camera: 'left' (the usual choice) or 'right' for media='video'.
    image_dir: folder under `root` holding `SNxxx/` frame folders (default: the first of
      IMAGE_DIRS that has the subject).
    frame_offset: image stem = label frame + frame_offset (-1: 0-based image names).
    aus: AUs to read (default the 8 detection AUs).
  """
  _common.check_split(split, SPLITS, "disfa")
  fold = _common.check_fold(fold, "disfa", au_lib.NUM_FOLDS)
  if media not in MEDIA:
    raise ValueError(f"disfa: media must be one of {MEDIA}, got {media!r}")
  if camera not in CAMERAS:
    raise ValueError(f"disfa: camera must be one of {sorted(CAMERAS)}, got {camera!r}")
  aus = tuple(aus) if aus is not None else au_lib.dataset_aus("disfa")
  splits = SPLITS if split is None else (split,)
  want = {s: sp for sp in splits for s in au_lib.fold_subjects("disfa", fold, sp)}
  ldir = _common.first_existing([os.path.join(root, LABEL_DIR)], "DISFA ActionUnit_Labels",
                                root)
  records = []
  for subject, sdir in sorted(_subject_dirs(ldir).items()):
    if au_lib.subject_fold_of("disfa", subject) is None:
      skips.note("subject_not_in_folds")
      continue
    if subject not in want:
      continue
    files = {}
    for name in os.listdir(sdir):
      m = _AU_FILE.match(name)
      if m and int(m.group(1)) == int(subject[2:]):
        files.setdefault(int(m.group(2)), os.path.join(sdir, name))
    missing = [a for a in aus if a not in files]
    if missing:
      skips.skip("missing_file", sdir, f"no label file for AU(s) {missing}")
      continue
    per_au = [read_au_file(files[a], skips) for a in aus]
    frames = sorted(set().union(*per_au))
    if media == "frames":
      dirs = (image_dir,) if image_dir is not None else IMAGE_DIRS
      folder = next((f for d in dirs if (f := _subject_dirs(os.path.join(root, d)).get(subject))),
                    None) if check_files else None
      if check_files and folder is None:
        skips.skip("missing_file", os.path.join(root, IMAGE_DIRS[0], subject),
                   f"no frame folder of {subject} under {list(dirs)}")
        continue
      images = {}
      if check_files:
        for p in _common.frame_files(folder):
          stem = os.path.splitext(os.path.basename(p))[0]
          if stem.isdigit():
            images.setdefault(int(stem), p)
    else:
      video = _video(root, camera, subject)
      if video is None:
        skips.skip("missing_file", os.path.join(root, CAMERAS[camera][0]),
                   f"no {camera} video of {subject}")
        continue
    for f in frames:
      vec = tuple(au_lib.UNCODED if f not in d else
                  int(d[f] >= au_lib.DISFA_OCCURRENCE_THRESHOLD) for d in per_au)
      if all(v == au_lib.UNCODED for v in vec):
        skips.note("au_not_coded")
        continue
      extra = {"subject": subject, "frame": f, "intensity": tuple(d.get(f, -1) for d in per_au)}
      if media == "frames":
        if check_files:
          img = images.get(f + frame_offset)
          if img is None:
            skips.skip("missing_file", os.path.join(folder, f"{f + frame_offset}.*"),
                       f"no image for label frame {f}")
            continue
        else:
          img = os.path.join(root, image_dir or IMAGE_DIRS[0], subject, f"{f + frame_offset}.png")
      records.append(_common.au_frame_record(
          dataset, want[subject], f"{subject}_{f}", img if media == "frames" else video, media,
          fold, vec, extra))
  return records
