"""Helpers shared by the dataset readers: text files, natural sort, path checks, skips."""
from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

from input_pipeline import labels as labels_lib
from input_pipeline.records import BadInputError, SkipCounter, check_inside_root

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
  """Sort key ordering digit runs by value: 'x_2.jpg' < 'x_10.jpg'."""
  parts = _DIGITS.split(name)
  return tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in parts if p)


def natural_sorted(names: Iterable[str]) -> list[str]:
  return sorted(names, key=natural_key)


def read_lines(path: str, encodings: Sequence[str] = ("utf-8-sig",)) -> list[str]:
  """Lines of a text file, trying `encodings` in turn (e.g. ('utf-8-sig', 'gbk')).

  Raises BadInputError('missing_file') if absent, ('bad_encoding') if no encoding fits.
  """
  if not os.path.isfile(path):
    raise BadInputError("missing_file", path, "label / split file not found")
  with open(path, "rb") as f:
    data = f.read()
  for enc in encodings:
    try:
      return data.decode(enc).splitlines()
    except UnicodeDecodeError:
      continue
  raise BadInputError("bad_encoding", path, f"not decodable as any of {list(encodings)}")


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
