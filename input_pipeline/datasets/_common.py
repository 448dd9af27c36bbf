"""Helpers shared by the dataset readers: text files, natural sort, path checks, skips."""
from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Iterable, Sequence

from input_pipeline import labels as labels_lib
from input_pipeline.records import BadInputError, Record, SkipCounter, check_inside_root

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
  """Sort key ordering digit runs by value: 'x_2.jpg' < 'x_10.jpg'."""
  parts = _DIGITS.split(name)
  return tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in parts if p)


def natural_sorted(names: Iterable[str]) -> list[str]:
  return sorted(names, key=natural_key)


def read_text(path: str, encodings: Sequence[str] = ("utf-8-sig",)) -> str:
  """A label / split / instruction file's text, trying `encodings` in turn.

  The one encoding rule of every reader: a file that no encoding decodes is a
  BadInputError('bad_encoding') naming it (a whole file cannot be half used);
  ('missing_file') if absent, ('not_a_file') for a directory.
  """
  if os.path.isdir(path):
    raise BadInputError("not_a_file", path, "a directory where a file was expected")
  if not os.path.isfile(path):
    raise BadInputError("missing_file", path, "label / split file not found")
  with open(path, "rb") as f:
    data = f.read()
  for enc in encodings:
    try:
      return data.decode(enc)
    except UnicodeDecodeError:
      continue
  raise BadInputError("bad_encoding", path, f"not decodable as any of {list(encodings)}")


def read_lines(path: str, encodings: Sequence[str] = ("utf-8-sig",)) -> list[str]:
  """Lines of a text file (see read_text for the errors)."""
  return read_text(path, encodings).splitlines()


def read_csv(path: str, encodings: Sequence[str] = ("utf-8-sig",)) -> list[list[str]]:
  """Rows of a CSV file (see read_text for the errors)."""
  return list(csv.reader(io.StringIO(read_text(path, encodings), newline="")))


def dedupe(records: list[Record], skips: SkipCounter) -> list[Record]:
  """The one duplicate rule of every reader: the same sample (split, fold, media file or,
  for inline pixels, id; the frame of a video for per-frame labels; for instruction data,
  the conversation) listed twice is kept once and counted ('duplicate');
  listed with different labels it is dropped entirely and counted ('conflicting_labels'),
  since no one can tell which label is right."""
  groups: dict[tuple, list[int]] = {}
  for i, r in enumerate(records):
    conv = json.dumps(r.conversations, sort_keys=True) if r.conversations else None
    media = r.media or f"{r.dataset}:{r.id}"   # rows with inline pixels have no file
    frame = r.extra.get("frame") if isinstance(r.extra, dict) else None
    groups.setdefault((r.dataset, r.split, r.fold, media, frame, conv), []).append(i)
  drop: set[int] = set()
  for key, idx in groups.items():
    if len(idx) == 1:
      continue
    labels = sorted({str((records[i].label, records[i].aus)) if records[i].aus is not None
                     else str(records[i].label) for i in idx})
    media = key[3] if isinstance(key[3], str) else (key[3][0] if key[3] else "?")
    if len(labels) > 1:
      for _ in idx:
        skips.skip("conflicting_labels", media, f"listed {len(idx)} times with labels {labels}")
      drop.update(idx)
    else:
      for _ in idx[1:]:
        skips.skip("duplicate", media, f"listed {len(idx)} times")
      drop.update(idx[1:])
  return [r for i, r in enumerate(records) if i not in drop]


def first_existing(candidates: Iterable[str], what: str, root: str) -> str:
  """The first existing path among `candidates`, else BadInputError('missing_file')."""
  tried = []
  for c in candidates:
    if os.path.exists(c):
      return c
    tried.append(os.path.relpath(c, root))
  raise BadInputError("missing_file", root, f"{what} not found; looked for {tried}")


def inside(root: str, rel: str, skips: SkipCounter) -> str | None:
  """`root/rel` resolved, or None (counted as 'path_escapes_root') if it leaves root."""
  try:
    return check_inside_root(root, rel)
  except BadInputError as e:
    skips.skip(e.reason, e.path, e.detail)
    return None


def exists_or_skip(path: str, skips: SkipCounter, check: bool = True) -> bool:
  """True if the file exists (or checks are off); else counts 'missing_file'."""
  if not check or os.path.exists(path):
    return True
  skips.skip("missing_file", path)
  return False


def dataset_label(dataset: str, raw: str, skips: SkipCounter, where: str) -> str | None:
  """The dataset's own spelling of a class given a name or synonym, else a counted skip."""
  try:
    return labels_lib.classes(dataset)[labels_lib.label_index(dataset, raw)]
  except KeyError:
    skips.skip("unknown_label", where, f"{raw!r} is not a {dataset} class")
    return None


def label_from_id(dataset: str, raw: str, base: int, skips: SkipCounter,
                  where: str) -> str | None:
  """Class name for an integer id (`base` = id of the first class), else a counted skip."""
  names = labels_lib.classes(dataset)
  try:
    i = int(raw.strip()) - base
  except ValueError:
    skips.skip("unknown_label", where, f"label {raw!r} is not an integer id")
    return None
  if not 0 <= i < len(names):
    skips.skip("unknown_label", where, f"id {raw.strip()} outside {base}..{base + len(names) - 1}")
    return None
  return names[i]


def frame_files(folder: str) -> tuple[str, ...]:
  """Image files of a frame folder, naturally sorted (empty tuple if none)."""
  if not os.path.isdir(folder):
    return ()
  names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS)]
  return tuple(os.path.join(folder, n) for n in natural_sorted(names))


def check_split(split: str | None, allowed: Sequence[str], dataset: str) -> None:
  if split is not None and split not in allowed:
    raise ValueError(f"{dataset}: split must be one of {list(allowed)} or None, got {split!r}")


def check_fold(fold: int | None, dataset: str, num_folds: int = 5) -> int:
  """The fold, defaulting to 1 (a k-fold protocol needs one); ValueError if out of range."""
  fold = 1 if fold is None else int(fold)
  if not 1 <= fold <= num_folds:
    raise ValueError(f"{dataset}: fold must be in 1..{num_folds}, got {fold}")
  return fold


def clip_or_frames(media_dir: str, clip_rel: str, folder_rel: str, media: str,
                   skips: SkipCounter, check_files: bool = True
                   ) -> tuple[str | tuple[str, ...], str] | None:
  """(media, media_type) of one sample stored as a clip file (`media == 'clip'`) or as a
  folder of frames; None after counting a skip (path escapes the root, missing file or
  folder, empty folder)."""
  if media == "clip":
    clip = inside(media_dir, clip_rel, skips)
    if clip is None or not exists_or_skip(clip, skips, check_files):
      return None
    return clip, "video"
  folder = inside(media_dir, folder_rel, skips)
  if folder is None:
    return None
  frames = frame_files(folder)
  if not frames:
    skips.skip("missing_file" if not os.path.isdir(folder) else "no_frames", folder)
    return None
  return frames, "frames"


def au_frame_record(dataset: str, split: str, rec_id: str, path: str, media: str, fold: int,
                    aus: tuple[int, ...], extra: dict) -> Record:
  """One AU-coded frame: an image (media='frames') or frame `extra['frame']` of a video."""
  return Record(dataset=dataset, split=split, id=rec_id, media=path,
                media_type="image" if media == "frames" else "video", fold=fold, aus=aus,
                extra=extra)
