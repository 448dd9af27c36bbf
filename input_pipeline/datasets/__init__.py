"""Readers for the FER datasets in their distributed layouts, behind one function.

```python
from input_pipeline import datasets
skips = SkipCounter()
recs = datasets.load_records("dfew", "/data/DFEW", split="test", fold=3, skips=skips)
print(skips.report())
```

Every reader checks, at listing time, that label files parse, labels are classes of the
dataset, media paths stay inside the data root and media files exist. Each failure is a
counted skip (reason -> count in the `SkipCounter`), or with `strict=True` a
`BadInputError` naming the file and reason. Two rules hold for every reader: a file no
encoding decodes is BadInputError('bad_encoding'), and a sample listed twice is kept once
('duplicate') or, with different labels, dropped ('conflicting_labels'), both counted.
Rows the dataset's *protocol* excludes
(AffectNet 'none', FERPlus 'unknown', ...) are counted apart with `SkipCounter.note`.
Decoding the media is `input_pipeline.media`'s job (its errors are BadInputError too).
See README.md in this folder for the layouts.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

from input_pipeline.datasets import (_common, affectnet, bp4d, dfew, disfa, ferid, ferplus,
                                     ferv39k, mafw, rafdb)
from input_pipeline.records import BadInputError, Record, SkipCounter

SYNTHETIC_KINDS = ("all", "image", "video", "instructions")


def _load_synthetic(root: str, split: str | None = "train", fold: int | None = None, *,
                    skips: SkipCounter, kind: str = "all", check_files: bool = True
                    ) -> list[Record]:
  """The data of `input_pipeline.synthetic.generate`: stills in the RAF-DB layout and clips
  in the DFEW layout under one root (their files do not collide), labels in RAF-DB's
  spelling (happiness, sadness, anger, ...), plus the FERID-style JSON (`ferid_<split>.json`).

  kind: 'image' (stills), 'video' (clips of `fold`, default 1), 'all' (both) or
  'instructions' (the FERID-style records).
  """
  if kind not in SYNTHETIC_KINDS:
    raise ValueError(f"synthetic: kind must be one of {SYNTHETIC_KINDS}, got {kind!r}")
  if kind == "instructions":
    return ferid.load(os.path.join(root, f"ferid_{split}.json") if split else root, split,
                      fold, skips=skips, media_root=root, check_files=check_files,
                      dataset="synthetic")
  out = []
  if kind in ("all", "image"):
    out += rafdb.load(root, split, skips=skips, check_files=check_files, dataset="synthetic")
  if kind in ("all", "video"):
    out += dfew.load(root, split, fold, skips=skips, check_files=check_files,
                     dataset="synthetic", label_space="synthetic")
  return out


READERS: dict[str, Callable[..., list[Record]]] = {
    "rafdb": rafdb.load,
    "affectnet": affectnet.load,
    "affectnet7": functools.partial(affectnet.load, num_classes=7),
    "ferplus": ferplus.load,
    "dfew": dfew.load,
    "ferv39k": ferv39k.load,
    "mafw": mafw.load,
    "ferid": ferid.load,
    "synthetic": _load_synthetic,
    "bp4d": bp4d.load,
    "disfa": disfa.load,
    "synthetic_au": functools.partial(bp4d.load, dataset="synthetic_au"),
}


def load_records(name: str, root: str, split: str | None = "train", fold: int | None = None,
                 strict: bool = False, skips: SkipCounter | None = None,
                 **options: Any) -> list[Record]:
  """Unified records of dataset `name` read from `root` in its distributed layout.

  Args:
    name: one of READERS ('rafdb', 'affectnet', 'affectnet7', 'ferplus', 'dfew',
      'ferv39k', 'mafw', 'ferid', 'synthetic'; action units: 'bp4d', 'disfa' and
      'synthetic_au', the synthetic faces' BP4D-layout AU data).
    root: the dataset's top folder as downloaded (a JSON file or folder for 'ferid').
    split: 'train' | 'test' (| 'val' for AffectNet / FERPlus), or None for every split.
    fold: 1..5 for DFEW / MAFW, 1..3 for BP4D / DISFA (default 1); ignored by
      single-split datasets.
    strict: raise BadInputError on the first bad input instead of counting it.
    skips: the counter to add skips to (create one and call `report()` at the end).
    **options: reader-specific, e.g. media='frames' (DFEW, FERV39k, MAFW),
      aligned=False (RAF-DB), form='csv' (FERPlus), media_root= (FERID),
      kind='image' (synthetic), check_files=False (skip existence checks).

  Returns:
    Records in the order of the dataset's label/split files.
  """
  try:
    reader = READERS[name]
  except KeyError:
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(READERS)}") from None
  if not os.path.exists(root):
    raise BadInputError("missing_file", root, f"{name} root does not exist")
  if strict:
    counter = SkipCounter(strict=True)
  else:
    counter = skips if skips is not None else SkipCounter()
  records = _common.dedupe(reader(root, split, fold, skips=counter, **options), counter)
  if strict and skips is not None:
    skips.merge(counter)  # notes (protocol exclusions) of a strict run
  return records


__all__ = ["load_records", "READERS", "Record", "SkipCounter", "BadInputError"]
