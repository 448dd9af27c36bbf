"""The unified record every dataset reader yields, and the bad-input accounting.

A reader never drops an input silently: it either raises `BadInputError` (strict mode)
or counts the skip under a reason in a `SkipCounter`, which the run reports at the end.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, Mapping, Sequence

MEDIA_TYPES = ("image", "video", "frames", "pixels")


class BadInputError(ValueError):
  """An input file or record that cannot be used; the message names the file and reason."""

  def __init__(self, reason: str, path: str | None = None, detail: str = ""):
    self.reason = reason
    self.path = path
    self.detail = detail
    where = f" [{path}]" if path else ""
    more = f": {detail}" if detail else ""
    super().__init__(f"{reason}{where}{more}")


@dataclasses.dataclass(frozen=True)
class Record:
  """One labelled sample or instruction conversation, independent of the source layout.

  Attributes:
    dataset: 'rafdb', 'affectnet', 'ferplus', 'dfew', 'ferv39k', 'mafw', 'ferid',
      'synthetic', ...
    split: 'train' | 'test' | 'val'.
    id: stable sample id inside the dataset (file stem, clip number, row index).
    media: a path (image or video file), or a tuple of frame paths (frame folders).
      Empty string for FERPlus pixel rows (see `pixels`).
    media_type: one of MEDIA_TYPES.
    label: the dataset's own class name, lower case (None for free-form instructions).
    fold: 1-based fold for k-fold protocols (DFEW, MAFW), else None.
    crop_box: (x, y, w, h) face box in pixels when the layout gives one (AffectNet).
    landmarks: flat (x0, y0, x1, y1, ...) when the layout gives them.
    pixels: uint8 [H, W] image held inline (FERPlus CSV).
    conversations: LLaVA-style turns [{'from': 'human'|'gpt', 'value': str}, ...].
    aus: facial action unit labels, one int per AU of the dataset's AU list
      (`input_pipeline.au.dataset_aus(dataset)`): 1 present, 0 absent, -1 not coded.
    extra: anything else a reader wants to pass on (votes, valence, scene, ...).
  """

  dataset: str
  split: str
  id: str
  media: str | tuple[str, ...]
  media_type: str
  label: str | None = None
  fold: int | None = None
  crop_box: tuple[float, float, float, float] | None = None
  landmarks: tuple[float, ...] | None = None
  pixels: Any = None
  conversations: tuple[Mapping[str, str], ...] | None = None
  aus: tuple[int, ...] | None = None
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.media_type not in MEDIA_TYPES:
      raise ValueError(f"media_type must be one of {MEDIA_TYPES}, got {self.media_type!r}")


class SkipCounter:
  """Counts skipped inputs per reason (thread-safe); `strict` turns a skip into an error."""

  def __init__(self, strict: bool = False, max_examples: int = 5):
    self.strict = strict
    self.max_examples = max_examples
    self._counts: collections.Counter[str] = collections.Counter()
    self._examples: dict[str, list[str]] = collections.defaultdict(list)
    self._notes: collections.Counter[str] = collections.Counter()
    self._truncs: collections.Counter[str] = collections.Counter()
    self._trunc_examples: dict[str, list[str]] = collections.defaultdict(list)
    self._lock = threading.Lock()

  def __getstate__(self):
    # Picklable (grain worker processes): the lock is recreated on unpickling.
    state = dict(self.__dict__)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def note(self, reason: str, n: int = 1) -> None:
    """Counts inputs left out *by the dataset's protocol* (never raises, even when strict).

    E.g. AffectNet's 'none'/'uncertain'/'non-face' rows or FERPlus majority-vote 'unknown':
    the data is fine, the protocol excludes it. Reported apart from the skips.
    """
    with self._lock:
      self._notes[reason] += n

  @property
  def notes(self) -> dict[str, int]:
    with self._lock:
      return dict(self._notes)

  def truncation(self, reason: str, path: str | None = None, detail: str = "") -> None:
    """Counts an input that is used, but cut to fit the config (e.g. a Q-Former text
    longer than `qformer_max_length`); never raises, even when strict. Reported apart."""
    with self._lock:
      self._truncs[reason] += 1
      if len(self._trunc_examples[reason]) < self.max_examples:
        self._trunc_examples[reason].append(f"{path or '?'}{': ' + detail if detail else ''}")

  @property
  def truncations(self) -> dict[str, int]:
    with self._lock:
      return dict(self._truncs)

  def merge_truncations(self, counts: Mapping[str, int]) -> None:
    with self._lock:
      self._truncs.update(dict(counts))

  def skip(self, reason: str, path: str | None = None, detail: str = "") -> None:
    """Records one skip, or raises BadInputError when strict."""
    if self.strict:
      raise BadInputError(reason, path, detail)
    with self._lock:
      self._counts[reason] += 1
      if len(self._examples[reason]) < self.max_examples:
        self._examples[reason].append(f"{path or '?'}{': ' + detail if detail else ''}")

  def merge(self, other: "SkipCounter | Mapping[str, int]") -> None:
    counts = other.counts if isinstance(other, SkipCounter) else dict(other)
    notes = other.notes if isinstance(other, SkipCounter) else {}
    examples = other._examples if isinstance(other, SkipCounter) else {}
    truncs = other.truncations if isinstance(other, SkipCounter) else {}
    with self._lock:
      self._truncs.update(truncs)
      self._counts.update(counts)
      self._notes.update(notes)
      for reason, ex in examples.items():
        room = self.max_examples - len(self._examples[reason])
        self._examples[reason].extend(ex[:max(room, 0)])

  @property
  def counts(self) -> dict[str, int]:
    with self._lock:
      return dict(self._counts)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def report(self) -> str:
    """A human-readable summary, e.g. for the end of a run."""
    counts = self.counts
    lines = [f"skipped inputs: {sum(counts.values()) if counts else 'none'}"]
    for reason, n in sorted(counts.items()):
      examples = "; ".join(self._examples.get(reason, []))
      lines.append(f"  {reason}: {n}" + (f" (e.g. {examples})" if examples else ""))
    notes = self.notes
    if notes:
      lines.append(f"excluded by protocol: {sum(notes.values())}")
      lines.extend(f"  {reason}: {n}" for reason, n in sorted(notes.items()))
    truncs = self.truncations
    if truncs:
      lines.append(f"used but truncated: {sum(truncs.values())}")
      for reason, n in sorted(truncs.items()):
        examples = "; ".join(self._trunc_examples.get(reason, []))
        lines.append(f"  {reason}: {n}" + (f" (e.g. {examples})" if examples else ""))
    return "\n".join(lines)


def check_inside_root(root: str, path: str) -> str:
  """Returns the resolved path, raising BadInputError if it escapes `root`."""
  import os

  root_real = os.path.realpath(root)
  full = os.path.realpath(os.path.join(root_real, path))
  if os.path.commonpath([root_real, full]) != root_real:
    raise BadInputError("path_escapes_root", path, f"resolves outside {root_real}")
  return full


def as_tuple(xs: Sequence[Any] | None) -> tuple[Any, ...] | None:
  return None if xs is None else tuple(xs)
