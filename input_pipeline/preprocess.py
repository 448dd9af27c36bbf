"""Offline preprocessing: decode, sample and crop media once into ArrayRecord shards.

    python -m input_pipeline.preprocess --dataset=dfew --root=/data/DFEW --split=train \\
        --fold=1 --out_dir=/data/dfew_f1_train --num_frames=8 --image_size=224 \\
        --face_mode=aligned --num_shards=16 --workers=8

Training then reads pre-extracted uint8 frames instead of decoding videos:

    source = PreextractedSource(glob('/data/dfew_f1_train/*.array_record'))
    pipeline.make_iterator(source, config, tokenizer, qformer_tokenizer)

Each stored example is one msgpack map (no pickle): the Record's fields, `frames` uint8
[F, S, S, 3] already in the ViT geometry (media.geometry; not normalised: the pipeline
ships uint8 pixels and the model normalises them),
optional `face_crops` uint8 [F, Sf, Sf, 3], and whatever an optional `priors_fn`
returns (e.g. precomputed `face_global`, `face_local` float arrays and an
`agr_sentence`), which the pipeline then uses instead of face crops.

Our choices: shard j holds a contiguous slice of the record list (so shard order =
record order); bad inputs are counted per reason and reported (strict: the first one
raises with file and reason); workers decode in a process pool, order preserved.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import msgpack
import numpy as np

from input_pipeline import media as media_lib
from input_pipeline.records import BadInputError, Record, SkipCounter

PriorsFn = Callable[[np.ndarray, Record], Mapping[str, Any]]
SUFFIX = ".array_record"


# ---------------------------------------------------------------------------------------
# Serialisation (msgpack, arrays as dtype/shape/bytes).


def _pack(obj: Any) -> Any:
  if isinstance(obj, np.ndarray):
    obj = np.ascontiguousarray(obj)
    return {"__nd__": True, "dtype": obj.dtype.str, "shape": list(obj.shape),
            "data": obj.tobytes()}
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, Mapping):
    return {str(k): _pack(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_pack(v) for v in obj]
  return obj


def _unpack(obj: Any) -> Any:
  if isinstance(obj, dict):
    if obj.get("__nd__"):
      return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    return {k: _unpack(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_unpack(v) for v in obj]
  return obj


def _record_to_dict(record: Record) -> dict:
  return {f.name: getattr(record, f.name) for f in dataclasses.fields(Record)}


def _record_from_dict(d: Mapping[str, Any]) -> Record:
  d = dict(d)
  for key in ("crop_box", "landmarks"):
    if d.get(key) is not None:
      d[key] = tuple(d[key])
  if isinstance(d.get("media"), list):
    d["media"] = tuple(d["media"])
  if d.get("conversations") is not None:
    d["conversations"] = tuple(dict(t) for t in d["conversations"])
  d["extra"] = d.get("extra") or {}
  return Record(**d)


def encode_example(record: Record, frames: np.ndarray, *, face_crops: np.ndarray | None = None,
                   priors: Mapping[str, Any] | None = None) -> bytes:
  """One pre-extracted example as bytes."""
  ex = {"record": _record_to_dict(record), "frames": np.asarray(frames, np.uint8)}
  if face_crops is not None:
    ex["face_crops"] = np.asarray(face_crops, np.uint8)
  for k, v in (priors or {}).items():
    if k in ex:
      raise ValueError(f"priors_fn returned the reserved key {k!r}")
    ex[k] = v
  return msgpack.packb(_pack(ex), use_bin_type=True)


def decode_example(data: bytes) -> dict:
  """Bytes -> {'record': Record, 'frames': uint8 [F,S,S,3], ...} (the pipeline's input)."""
  ex = _unpack(msgpack.unpackb(data, raw=False))
  ex["record"] = _record_from_dict(ex["record"])
  return ex


# ---------------------------------------------------------------------------------------
# Extraction.


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
  """How to decode one record. `face_mode`: 'aligned' (crop = frame), 'detect'
  (OpenCV, no face -> skip), 'detect_or_full', 'none' (no face crops stored)."""
  num_frames: int = 8
  image_size: int = 224
  aspect: str = "pad"
  face_mode: str = "aligned"
  face_size: int = 224
  face_margin: float = 0.2


def extract(record: Record, config: ExtractConfig) -> tuple[np.ndarray, np.ndarray | None]:
  """(frames uint8 [F, S, S, 3] in ViT geometry, face crops uint8 [F, Sf, Sf, 3] | None)."""
  n = 1 if record.media_type in ("image", "pixels") else config.num_frames
  frames = media_lib.load_media(record, n)
  crops = None
  if config.face_mode != "none":
    raw = frames
    if config.face_mode in ("detect", "detect_or_full"):
      try:
        raw = media_lib.crop_face_frames(frames, margin=config.face_margin,
                                         path=str(record.media))
      except BadInputError as e:
        if not (config.face_mode == "detect_or_full" and e.reason == "no_face"):
          raise
    elif config.face_mode != "aligned":
      raise ValueError(f"unknown face_mode {config.face_mode!r}")
    crops = media_lib.geometry(raw, config.face_size, "resize")
  return media_lib.geometry(frames, config.image_size, config.aspect), crops


def _extract_one(record: Record, config: ExtractConfig, priors_fn: PriorsFn | None,
                 strict: bool) -> bytes | tuple[str, str, str]:
  """Bytes of the example, or (reason, path, detail) of a skip."""
  try:
    frames, crops = extract(record, config)
    priors = priors_fn(crops if crops is not None else frames, record) if priors_fn else None
    return encode_example(record, frames, face_crops=crops, priors=priors)
  except BadInputError as e:
    if strict:
      raise
    return (e.reason, e.path or str(record.media), e.detail)


def shard_paths(out_dir: str, num_shards: int, prefix: str = "data") -> list[str]:
  return [os.path.join(out_dir, f"{prefix}-{i:05d}-of-{num_shards:05d}{SUFFIX}")
          for i in range(num_shards)]


def write_shards(
    records: Sequence[Record],
    out_dir: str,
    *,
    config: ExtractConfig = ExtractConfig(),
    num_shards: int = 1,
    prefix: str = "data",
    priors_fn: PriorsFn | None = None,
    skips: SkipCounter | None = None,
    workers: int = 0,
) -> list[str]:
  """Decodes `records` into `num_shards` ArrayRecord files under `out_dir`.

  Args:
    priors_fn: optional hook (face crops or frames uint8, record) -> mapping of extra
      arrays / text stored with the example (e.g. precomputed face priors).
    skips: counter for bad inputs (strict counter: the first one raises).
    workers: decoding processes (0: in this process). priors_fn must pickle if > 0.
  Returns:
    The shard paths, in record order.
  """
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

  skips = skips if skips is not None else SkipCounter()
  if num_shards < 1:
    raise ValueError("num_shards must be >= 1")
  os.makedirs(out_dir, exist_ok=True)
  paths = shard_paths(out_dir, num_shards, prefix)
  fn = functools.partial(_extract_one, config=config, priors_fn=priors_fn, strict=skips.strict)
  bounds = np.linspace(0, len(records), num_shards + 1).round().astype(int)

  def results() -> Iterable[bytes | tuple]:
    if workers > 0:
      import multiprocessing  # pylint: disable=g-import-not-at-top

      with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(fn, records, chunksize=4)
    else:
      yield from map(fn, records)

  stream = iter(results())
  for j, path in enumerate(paths):
    writer = ArrayRecordWriter(path, "group_size:1")
    try:
      for _ in range(bounds[j], bounds[j + 1]):
        out = next(stream)
        if isinstance(out, bytes):
          writer.write(out)
        else:
          skips.skip(*out)
    finally:
      writer.close()
  return paths


class PreextractedSource:
  """grain random-access source over preprocess shards, yielding decoded examples."""

  def __init__(self, paths: str | Sequence[str]):
    import grain  # pylint: disable=g-import-not-at-top

    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
      raise ValueError("no shard paths")
    self._paths = paths
    self._source = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return decode_example(self._source[index])

  def __getstate__(self):
    return {"paths": self._paths}

  def __setstate__(self, state):
    self.__init__(state["paths"])

  def __repr__(self) -> str:
    return f"PreextractedSource({len(self._paths)} shards)"


# ---------------------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str] | None = None) -> int:
  from input_pipeline import datasets  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", required=True, help=f"one of {sorted(datasets.READERS)}")
  p.add_argument("--root", required=True, help="the dataset as downloaded")
  p.add_argument("--split", default="train")
  p.add_argument("--fold", type=int, default=None)
  p.add_argument("--out_dir", required=True)
  p.add_argument("--prefix", default=None, help="shard file prefix (default dataset-split)")
  p.add_argument("--num_shards", type=int, default=1)
  p.add_argument("--num_frames", type=int, default=ExtractConfig.num_frames)
  p.add_argument("--image_size", type=int, default=ExtractConfig.image_size)
  p.add_argument("--aspect", default=ExtractConfig.aspect, choices=("pad", "crop", "resize"))
  p.add_argument("--face_mode", default=ExtractConfig.face_mode,
                 choices=("aligned", "detect", "detect_or_full", "none"))
  p.add_argument("--face_size", type=int, default=ExtractConfig.face_size)
  p.add_argument("--face_margin", type=float, default=ExtractConfig.face_margin)
  p.add_argument("--workers", type=int, default=0)
  p.add_argument("--strict", action="store_true", help="fail on the first bad input")
  p.add_argument("--reader_options", default="{}", help="JSON of load_records options")
  args = p.parse_args(argv)

  skips = SkipCounter(strict=args.strict)
  records = datasets.load_records(args.dataset, args.root, split=args.split, fold=args.fold,
                                  strict=args.strict, skips=skips,
                                  **json.loads(args.reader_options))
  config = ExtractConfig(num_frames=args.num_frames, image_size=args.image_size,
                         aspect=args.aspect, face_mode=args.face_mode,
                         face_size=args.face_size, face_margin=args.face_margin)
  prefix = args.prefix or f"{args.dataset}-{args.split}" + (f"-fold{args.fold}" if args.fold else "")
  paths = write_shards(records, args.out_dir, config=config, num_shards=args.num_shards,
                       prefix=prefix, skips=skips, workers=args.workers)
  n = len(PreextractedSource(paths))
  print(f"wrote {n} examples of {len(records)} records to {len(paths)} shards in {args.out_dir}")
  print(skips.report())
  return 0


if __name__ == "__main__":
  sys.exit(main())
