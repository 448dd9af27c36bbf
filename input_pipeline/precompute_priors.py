"""Frozen-prior mode: run the face prior network once per sample and store its outputs.

The face prior (FaceXFormer, or any module returning `FacePriors`) is frozen in EMO-LLaMA,
so its outputs can be computed once in preprocessing instead of every epoch:

    python -m input_pipeline.precompute_priors --shards='/data/raf_train/*.array_record' \\
        --checkpoint=/ckpt/facexformer.safetensors --out_dir=/data/raf_train_priors
    python -m input_pipeline.precompute_priors --dataset=dfew --root=/data/DFEW --fold=1 \\
        --num_frames=8 --checkpoint=/ckpt/facexformer.safetensors --out_dir=/data/dfew_priors

reads the pre-extracted `face_crops` (uint8 [F, S, S, 3], see input_pipeline.preprocess) or,
with `--dataset`, decodes the records exactly as the training pipeline does
(`pipeline.face_crop_items`: same frame sampling and geometry, uint8, so the priors belong to
the batch's frames), normalises them on the device with the model's own function (ImageNet
mean/std, emo_jax.models.pixels), runs the network in fixed-size batches (one jit compile;
the last batch is zero-padded, which changes nothing since the network is per-sample) and
writes ArrayRecord shards of one `.npz` blob per sample (no pickle) plus `index.json`
(record id -> shard, position). `PriorStore(out_dir)[record_id]` gives back `face_global`
[F, G, Cf], `face_local` [F, L, Cf], landmarks, AGR logits and the AGR label names, which the
pipeline puts into the batch as `face_global` / `face_local` (docs/INTERFACES.md).

`make_priors_fn(runner)` is the same computation as a `priors_fn` hook for
`input_pipeline.preprocess.write_shards` (priors stored inside the example itself).

Our choices: key = `Record.id`; the AGR labels of a multi-frame sample come from the
frame-averaged logits (`emo_jax.models.face.agr_indices`).
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from input_pipeline import paths

PRIOR_FIELDS = ("face_global", "face_local", "landmarks", "age_logits", "gender_logits",
                "race_logits")
_PRIOR_ATTRS = ("global_feats", "local_feats", "landmarks", "age_logits", "gender_logits",
                "race_logits")
INDEX_NAME = "index.json"
SUFFIX = ".array_record"


class PriorRunner:
  """Runs a frozen `FacePriors` network over crops in fixed batches with one jitted function.

  `__call__(crops [N, S, S, 3])` -> dict of numpy arrays keyed by PRIOR_FIELDS (first axis N).
  uint8 crops are ImageNet-normalised inside the jitted function by the same function
  EmoLlama applies to uint8 `face_crops` (emo_jax.models.pixels.normalize_face), so stored
  priors equal the online ones; float crops must be normalised already.
  """

  def __init__(self, model: nnx.Module, batch_size: int = 8):
    if batch_size < 1:
      raise ValueError("batch_size must be >= 1")
    self.batch_size = batch_size
    graphdef, state = nnx.split(model)
    self._state = state

    from emo_jax.models.pixels import normalize_face

    def apply(state, crops):
      priors = nnx.merge(graphdef, state)(normalize_face(crops))
      return {f: getattr(priors, a) for f, a in zip(PRIOR_FIELDS, _PRIOR_ATTRS)}

    self._fn = jax.jit(apply)

  def __call__(self, crops: np.ndarray) -> dict[str, np.ndarray]:
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[-1] != 3:
      raise ValueError(f"face crops must be [N, S, S, 3], got {crops.shape}")
    if crops.dtype != np.uint8:
      crops = crops.astype(np.float32)
    n, b = crops.shape[0], self.batch_size
    pad = (-n) % b
    if pad:
      crops = np.concatenate([crops, np.zeros((pad,) + crops.shape[1:], crops.dtype)])
    chunks = [jax.device_get(self._fn(self._state, crops[i:i + b]))
              for i in range(0, crops.shape[0], b)]
    return {k: np.concatenate([c[k] for c in chunks])[:n] for k in PRIOR_FIELDS}


def agr_labels(priors: Mapping[str, np.ndarray]) -> dict[str, str]:
  """Age / gender / race label names of one sample from its per-frame logits [F, n]."""
  from emo_jax.models import face as face_lib
  from emo_jax.models.face_prior import AGE_BINS, GENDERS, RACES
  a, g, r = face_lib.agr_indices(priors["age_logits"][None], priors["gender_logits"][None],
                                 priors["race_logits"][None])[0]
  return {"age": AGE_BINS[int(a)], "gender": GENDERS[int(g)], "race": RACES[int(r)]}


def encode_priors(record_id: str, priors: Mapping[str, np.ndarray]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, id=np.array(record_id), **{k: np.asarray(priors[k]) for k in PRIOR_FIELDS})
  return buf.getvalue()


def decode_priors(data: bytes) -> tuple[str, dict[str, np.ndarray]]:
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    return str(z["id"]), {k: z[k] for k in PRIOR_FIELDS}


def _batched_records(items: Iterable[tuple[str, np.ndarray]], frames_per_call: int
                     ) -> Iterator[list[tuple[str, np.ndarray]]]:
  group, count = [], 0
  for rid, crops in items:
    group.append((rid, crops))
    count += len(crops)
    if count >= frames_per_call:
      yield group
      group, count = [], 0
  if group:
    yield group


def precompute_priors(runner: PriorRunner, items: Iterable[tuple[str, np.ndarray]],
                      out_dir: str, *, num_shards: int = 1) -> dict[str, Any]:
  """Write the priors of every (record_id, crops [F, S, S, 3]) to ArrayRecord shards.

  Samples are distributed round-robin over `num_shards`; returns the index written to
  `out_dir/index.json`. A duplicate id or a sample without crops raises. A cloud `out_dir`
  (gs://...) is written locally, then uploaded.
  """
  with paths.staged_dir(out_dir) as local:
    return _write_priors(runner, items, local, num_shards)


def _write_priors(runner, items, out_dir: str, num_shards: int) -> dict[str, Any]:
  from array_record.python.array_record_module import ArrayRecordWriter
  os.makedirs(out_dir, exist_ok=True)
  names = [f"priors-{i:05d}-of-{num_shards:05d}{SUFFIX}" for i in range(num_shards)]
  writers = [ArrayRecordWriter(os.path.join(out_dir, n), "group_size:1") for n in names]
  counts = [0] * num_shards
  index: dict[str, list[int]] = {}
  written = 0
  try:
    for group in _batched_records(items, runner.batch_size):
      for rid, crops in group:
        if rid in index:
          raise ValueError(f"duplicate record id {rid!r}")
        if np.asarray(crops).ndim != 4 or len(crops) == 0:
          raise ValueError(f"record {rid!r}: face crops must be [F>0, S, S, 3], "
                           f"got {np.asarray(crops).shape}")
        index[rid] = [-1, -1]  # reserve the id before running the network
      out = runner(np.concatenate([np.asarray(c) for _, c in group]))
      start = 0
      for rid, crops in group:
        f = len(crops)
        shard = written % num_shards
        written += 1
        writers[shard].write(encode_priors(rid, {k: v[start:start + f] for k, v in out.items()}))
        index[rid] = [shard, counts[shard]]
        counts[shard] += 1
        start += f
  finally:
    for w in writers:
      w.close()
  meta = {"shards": names, "ids": index, "fields": list(PRIOR_FIELDS)}
  with open(os.path.join(out_dir, INDEX_NAME), "w") as fh:
    json.dump(meta, fh)
  return meta


class PriorStore:
  """Random access to precomputed priors by record id.

  `store[record_id]` -> {'face_global' [F, G, Cf], 'face_local' [F, L, Cf], 'landmarks'
  [F, 68, 2], 'age_logits', 'gender_logits', 'race_logits', 'agr_labels': {'age', 'gender',
  'race'} label names}. A missing id raises KeyError naming it. A cloud `out_dir` is copied
  to a local cache once (ArrayRecord reads local files).
  """

  def __init__(self, out_dir: str):
    self.out_dir = out_dir
    self._local = paths.local_dir(out_dir)
    with open(os.path.join(self._local, INDEX_NAME)) as fh:
      meta = json.load(fh)
    self._shards = meta["shards"]
    self._index = {k: tuple(v) for k, v in meta["ids"].items()}
    self._readers: dict[int, Any] = {}

  def __len__(self) -> int:
    return len(self._index)

  def __contains__(self, record_id: str) -> bool:
    return record_id in self._index

  def ids(self) -> list[str]:
    return list(self._index)

  def _reader(self, shard: int):
    if shard not in self._readers:
      from array_record.python.array_record_module import ArrayRecordReader
      self._readers[shard] = ArrayRecordReader(os.path.join(self._local, self._shards[shard]))
    return self._readers[shard]

  def __getitem__(self, record_id: str) -> dict[str, Any]:
    if record_id not in self._index:
      raise KeyError(f"no precomputed priors for record {record_id!r} in {self.out_dir}")
    shard, pos = self._index[record_id]
    rid, priors = decode_priors(self._reader(shard).read([pos])[0])
    if rid != record_id:
      raise ValueError(f"index of {self.out_dir} is corrupt: {record_id!r} points at {rid!r}")
    out: dict[str, Any] = dict(priors)
    out["agr_labels"] = agr_labels(priors)
    return out

  def __getstate__(self):  # grain workers re-open readers lazily
    return {"out_dir": self.out_dir}

  def __setstate__(self, state):
    self.__init__(state["out_dir"])


def make_priors_fn(runner: PriorRunner, template: str | None = None):
  """A `priors_fn(crops uint8 [F, S, S, 3], record)` hook for preprocess.write_shards: stores the
  PRIOR_FIELDS arrays and, with a template, the sample's `agr_sentence` (face.agr_sentence)."""
  def priors_fn(crops: np.ndarray, record) -> dict[str, Any]:
    out: dict[str, Any] = runner(crops)
    if template is not None:
      from emo_jax.models import face as face_lib
      idx = face_lib.agr_indices(out["age_logits"][None], out["gender_logits"][None],
                                 out["race_logits"][None])[0]
      still = getattr(record, "media_type", "image") in ("image", "pixels")
      out["agr_sentence"] = face_lib.agr_sentence(*idx, template=template,
                                                  media="image" if still else "video")
    return out
  return priors_fn


def _preextracted_items(paths: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
  from input_pipeline.preprocess import PreextractedSource
  source = PreextractedSource(list(paths))
  for i in range(len(source)):
    ex = source[i]
    if "face_crops" not in ex:
      raise ValueError(f"example {ex['record'].id!r} has no face_crops; preprocess with a "
                       "face_mode other than 'none'")
    yield ex["record"].id, ex["face_crops"]


def _record_items(args) -> Iterator[tuple[str, np.ndarray]]:
  """Crops of a dataset's records, decoded as the training pipeline decodes them."""
  from input_pipeline import datasets, pipeline
  from input_pipeline.records import SkipCounter
  skips = SkipCounter(strict=args.strict)
  records = datasets.load_records(args.dataset, args.root, split=args.split, fold=args.fold,
                                  strict=args.strict, skips=skips,
                                  **json.loads(args.reader_options))
  cfg = pipeline.PipelineConfig(num_frames=args.num_frames, face_size=args.face_size,
                                face_mode=args.face_mode, face_margin=args.face_margin)
  yield from pipeline.face_crop_items(records, cfg, skips=skips)
  print(skips.report(), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shards", default="", help="glob of preprocess ArrayRecord shards")
  parser.add_argument("--dataset", default="", help="or: a dataset name (raw records, decoded "
                      "as the training pipeline does with the options below)")
  parser.add_argument("--root", default="")
  parser.add_argument("--split", default="train")
  parser.add_argument("--fold", type=int, default=None)
  parser.add_argument("--reader_options", default="{}", help="JSON of load_records options")
  parser.add_argument("--num_frames", type=int, default=8, help="= data.pipeline.num_frames")
  parser.add_argument("--face_size", type=int, default=224)
  parser.add_argument("--face_mode", default="aligned",
                      choices=("aligned", "detect", "detect_or_full"))
  parser.add_argument("--face_margin", type=float, default=0.2)
  parser.add_argument("--strict", action="store_true", help="fail on the first bad input")
  parser.add_argument("--checkpoint", required=True, help="FaceXFormer .safetensors (or .pt)")
  parser.add_argument("--allow_pickle", action="store_true")
  parser.add_argument("--config", default="{}", help="JSON overrides of FaceXFormerConfig")
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--num_shards", type=int, default=1)
  args = parser.parse_args(argv)
  from emo_jax.convert import facexformer as convert
  from emo_jax.models import facexformer as fx
  if bool(args.shards) == bool(args.dataset):
    print("give exactly one of --shards or --dataset", file=sys.stderr)
    return 1
  if args.shards:
    paths = sorted(glob.glob(args.shards))
    if not paths:
      print(f"no shards match {args.shards}", file=sys.stderr)
      return 1
    items = _preextracted_items(paths)
  else:
    items = _record_items(args)
  model = convert.load_facexformer(args.checkpoint, fx.FaceXFormerConfig(**json.loads(args.config)),
                                   allow_pickle=args.allow_pickle)
  meta = precompute_priors(PriorRunner(model, args.batch_size), items,
                           args.out_dir, num_shards=args.num_shards)
  print(f"wrote priors of {len(meta['ids'])} samples to {args.out_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
