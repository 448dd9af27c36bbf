"""AU frame batches for the AU head: records with `aus` -> uint8 pixels + int8 labels.

    it = au_data.make_iterator(records, image_size=224, batch_size=64, seed=0)
    batch = next(it)   # {'pixels': uint8 [B, S, S, 3], 'aus': int8 [B, A], 'index': int32 [B]}

Frame records (`media_type='image'`) are decoded with `media.load_image`; video records
(BP4D / DISFA with media='video') carry the 1-based decoded frame in `extra['frame']` and
are decoded by `load_video_frame` (sequential decode up to that frame: extract the frames
once with `extract_frames` for training). Pixels are in the encoder geometry
(`media.geometry`), not normalised (the model normalises, as for the LLM batches). A bad
input is a counted skip (`SkipCounter`), never a silent drop: the training iterator moves
on to the next record, evaluation (`load_all`) reports which indices were skipped.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from input_pipeline import media as media_lib
from input_pipeline.records import BadInputError, Record, SkipCounter


def load_video_frame(path: str, frame: int) -> np.ndarray:
  """The `frame`-th (1-based) decoded frame of a video, uint8 [H, W, 3]."""
  import av
  if frame < 1:
    raise BadInputError("bad_frame_index", path, f"frame {frame} < 1")
  try:
    with av.open(path) as c:
      for i, f in enumerate(c.decode(video=0), 1):
        if i == frame:
          return f.to_ndarray(format="rgb24")
  except (av.error.FFmpegError, OSError) as e:
    raise BadInputError("corrupt_video", path, str(e)) from None
  raise BadInputError("missing_frame", path, f"the video has fewer than {frame} frames")


def load_frame(record: Record) -> np.ndarray:
  if record.media_type == "video":
    return load_video_frame(str(record.media), int(record.extra["frame"]))
  return media_lib.load_media(record, 1)[0]


def example(record: Record, image_size: int, aspect: str = "pad") -> dict:
  if record.aus is None:
    raise BadInputError("no_au_labels", record.id, "record has no AU labels")
  img = media_lib.geometry(load_frame(record), image_size, aspect)[0]
  return {"pixels": img, "aus": np.asarray(record.aus, np.int8)}


def extract_frames(records: Sequence[Record], out_root: str, *, skips: SkipCounter | None = None
                   ) -> list[Record]:
  """Decodes each video once and writes its labelled frames as
  `out_root/<subject>/<task or ''>/<frame>.jpg`; returns the records pointing at them."""
  from PIL import Image
  skips = skips if skips is not None else SkipCounter()
  by_video: dict[str, list[Record]] = {}
  out = []
  for r in records:
    if r.media_type == "video":
      by_video.setdefault(str(r.media), []).append(r)
    else:
      out.append(r)
  import av
  import dataclasses
  for path, recs in by_video.items():
    want = {int(r.extra["frame"]): r for r in recs}
    got = set()
    try:
      with av.open(path) as c:
        for i, f in enumerate(c.decode(video=0), 1):
          r = want.get(i)
          if r is not None:
            d = os.path.join(out_root, r.extra.get("subject", ""), r.extra.get("task", ""))
            os.makedirs(d, exist_ok=True)
            p = os.path.join(d, f"{i}.jpg")
            Image.fromarray(f.to_ndarray(format="rgb24")).save(p, quality=95)
            out.append(dataclasses.replace(r, media=p, media_type="image"))
            got.add(i)
          if len(got) == len(want):
            break
    except (av.error.FFmpegError, OSError) as e:
      skips.skip("corrupt_video", path, str(e))
      continue
    for i in sorted(set(want) - got):
      skips.skip("missing_frame", path, f"frame {i} not in the video")
  return out


def make_iterator(records: Sequence[Record], *, image_size: int, batch_size: int, seed: int = 0,
                  aspect: str = "pad", skips: SkipCounter | None = None,
                  read_threads: int = 2) -> Iterator[dict]:
  """Endless shuffled training batches (a new order each epoch), skips counted."""
  import grain
  skips = skips if skips is not None else SkipCounter()
  if not records:
    raise ValueError("no AU training records")

  def one(rec):
    try:
      return example(rec, image_size, aspect)
    except BadInputError as e:
      if skips.strict:
        raise
      return {"_skip": (e.reason, e.path, e.detail)}

  ds = grain.MapDataset.source(list(records)).shuffle(seed=seed).repeat(None).map(one)
  it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                 prefetch_buffer_size=4 * batch_size)))
  consecutive = 0
  while True:
    pix, aus = [], []
    while len(pix) < batch_size:
      ex = next(it)
      if "_skip" in ex:
        skips.skip(*ex["_skip"])
        consecutive += 1
        if consecutive >= max(len(records), 100):
          raise BadInputError("too_many_skips", None, skips.report())
        continue
      consecutive = 0
      pix.append(ex["pixels"])
      aus.append(ex["aus"])
    yield {"pixels": np.stack(pix), "aus": np.stack(aus)}


def load_all(records: Sequence[Record], *, image_size: int, aspect: str = "pad",
             skips: SkipCounter | None = None, batch_size: int = 64,
             read_threads: int = 2) -> Iterator[tuple[np.ndarray, dict]]:
  """Evaluation batches in record order: (record indices kept, batch); skips counted."""
  import grain
  skips = skips if skips is not None else SkipCounter()

  def one(i):
    try:
      return i, example(records[i], image_size, aspect)
    except BadInputError as e:
      if skips.strict:
        raise
      return i, {"_skip": (e.reason, e.path, e.detail)}

  ds = grain.MapDataset.range(len(records)).map(one)
  buf_i, buf = [], []
  for i, ex in ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                    prefetch_buffer_size=2 * batch_size)):
    if "_skip" in ex:
      skips.skip(*ex["_skip"])
      continue
    buf_i.append(i)
    buf.append(ex)
    if len(buf) == batch_size:
      yield np.asarray(buf_i), {k: np.stack([e[k] for e in buf]) for k in buf[0]}
      buf_i, buf = [], []
  if buf:
    yield np.asarray(buf_i), {k: np.stack([e[k] for e in buf]) for k in buf[0]}
