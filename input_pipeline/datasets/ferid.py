"""FERID-style instruction data: LLaVA conversation JSON (or JSON Lines).

Each record: `{"id": ..., "image": "<rel path>" | "video": "<rel path>",
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...},
...]}` (multi-turn allowed; human and gpt alternate, human first). Media paths are
relative to `media_root` (LLaVA's `--image_folder`; default: the JSON file's directory).
A `video` that names a directory, or a list, is read as a frame folder / frame list.

`root` is a .json / .jsonl file, or a directory: then `<split>.json`, else every
`*<split>*.json[l]` in it (every JSON file when split is None).

Category instructions ("... Choose one from the following options: {a, b, ...}." ->
"a") get `label` = the chosen option (lower case); free conversations get None, unless
the record carries its own `label` key. Malformed files and records are counted skips.
"""
from __future__ import annotations

import json
import os
import re

from input_pipeline import labels as labels_lib
from input_pipeline.datasets import _common
from input_pipeline.records import BadInputError, Record, SkipCounter

_OPTIONS = re.compile(r"\{([^{}]+)\}")
_ROLES = ("human", "gpt")


def json_files(root: str, split: str | None) -> list[str]:
  if os.path.isfile(root):
    return [root]
  if os.path.isdir(root) and root.endswith((".json", ".jsonl")):
    raise BadInputError("not_a_file", root, "a directory named like an instruction JSON file")
  if not os.path.isdir(root):
    raise BadInputError("missing_file", root, "FERID root is neither a file nor a directory")
  names = sorted(n for n in os.listdir(root) if n.endswith((".json", ".jsonl")))
  folders = [n for n in names if os.path.isdir(os.path.join(root, n))]
  if folders:
    raise BadInputError("not_a_file", os.path.join(root, folders[0]),
                        "a directory named like an instruction JSON file")
  if split is not None:
    exact = [n for n in names if os.path.splitext(n)[0] == split]
    names = exact or [n for n in names if split in os.path.splitext(n)[0]]
  if not names:
    raise BadInputError("missing_file", root, f"no instruction JSON for split {split!r}")
  return [os.path.join(root, n) for n in names]


def category_label(conversations: list[dict]) -> str | None:
  """The option chosen in the first answer when the first question is a category
  instruction (options in braces), else None. Later turns may be free conversation."""
  if len(conversations) < 2:
    return None
  m = _OPTIONS.search(conversations[0]["value"])
  if not m:
    return None
  options = [o.strip().lower() for o in m.group(1).split(",") if o.strip()]
  answer = conversations[1]["value"].strip().lower().rstrip(".!")
  return answer if answer in options else None


def _parse(text: str, where: str, skips: SkipCounter):
  """json.loads, or None after counting 'malformed_json' (syntax, or nested too deeply)."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    skips.skip("malformed_json", where, str(e))
  except RecursionError:
    skips.skip("malformed_json", where, "nested too deeply")
  return None


def _read(path: str, skips: SkipCounter) -> list:
  text = _common.read_text(path, ("utf-8-sig",))   # bad_encoding: an error naming the file
  if path.endswith(".jsonl"):
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
      if line.strip():
        item = _parse(line, f"{path}:{lineno}", skips)
        if item is not None:
          items.append(item)
    return items
  data = _parse(text, path, skips)
  if data is None:
    return []
  if not isinstance(data, list):
    skips.skip("malformed_json", path, f"top level is {type(data).__name__}, expected a list")
    return []
  return data


def _validate(item, where: str, skips: SkipCounter) -> list[dict] | None:
  if not isinstance(item, dict):
    skips.skip("malformed_record", where, f"{type(item).__name__}, expected an object")
    return None
  conv = item.get("conversations")
  if not isinstance(conv, list) or not conv:
    skips.skip("malformed_record", where, "no 'conversations' list")
    return None
  for j, turn in enumerate(conv):
    if (not isinstance(turn, dict) or turn.get("from") != _ROLES[j % 2]
        or not isinstance(turn.get("value"), str)):
      skips.skip("malformed_record", where,
                 f"turn {j} must be {{'from': {_ROLES[j % 2]!r}, 'value': str}}")
      return None
  if len(conv) % 2:
    skips.skip("malformed_record", where, "conversation ends with a human turn")
    return None
  return [{"from": t["from"], "value": t["value"]} for t in conv]


def load(root: str, split: str | None = "train", fold: int | None = None, *,
         skips: SkipCounter, media_root: str | None = None, check_files: bool = True,
         dataset: str = "ferid") -> list[Record]:
  """Records of the instruction file(s) of `split` (the split name is recorded as given)."""
  records = []
  for path in json_files(root, split):
    base = media_root or os.path.dirname(os.path.abspath(path))
    for i, item in enumerate(_read(path, skips)):
      where = f"{path}[{i}]"
      conv = _validate(item, where, skips)
      if conv is None:
        continue
      rel = item.get("image", item.get("video"))
      is_video = "image" not in item and "video" in item
      if rel is None:
        skips.skip("malformed_record", where, "neither 'image' nor 'video'")
        continue
      if isinstance(rel, list):
        if not rel or not all(isinstance(r, str) for r in rel):
          skips.skip("malformed_record", where, "media list must hold path strings")
          continue
        paths = [_common.inside(base, r, skips) for r in rel]
        if any(p is None for p in paths):
          continue
        if not all(_common.exists_or_skip(p, skips, check_files) for p in paths):
          continue
        media, media_type = tuple(paths), "frames"
      elif isinstance(rel, str):
        full = _common.inside(base, rel, skips)
        if full is None or not _common.exists_or_skip(full, skips, check_files):
          continue
        if os.path.isdir(full):
          media = _common.frame_files(full)
          if not media:
            skips.skip("no_frames", full)
            continue
          media_type = "frames"
        else:
          media, media_type = full, ("video" if is_video else "image")
      else:
        skips.skip("malformed_record", where, f"media is {type(rel).__name__}")
        continue
      label = item.get("label")
      if label is not None:
        if not isinstance(label, str) or labels_lib.canonical(label) is None:
          skips.skip("unknown_label", where, f"label {label!r} names no known emotion")
          continue
        label = label.strip().lower()
      else:
        label = category_label(conv)
      records.append(Record(
          dataset=dataset, split=split or "train", id=str(item.get("id", f"{i}")),
          media=media, media_type=media_type, label=label, fold=fold,
          conversations=tuple(conv), extra={"source": os.path.basename(path)}))
  return records
