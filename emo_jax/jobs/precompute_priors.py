"""Frozen-prior mode: run the face prior network once per sample and store its outputs.

The face prior (FaceXFormer, or any module returning `FacePriors`) is frozen in EMO-LLaMA,
so its outputs can be computed once instead of every epoch:

    python -m emo_jax.jobs.precompute_priors --shards='/data/raf_train/*.array_record' \\
        --checkpoint=/ckpt/facexformer.safetensors --out_dir=/data/raf_train_priors
    python -m emo_jax.jobs.precompute_priors --dataset=dfew --root=/data/DFEW --fold=1 \\
        --num_frames=8 --checkpoint=/ckpt/facexformer.safetensors --out_dir=/data/dfew_priors

It reads the pre-extracted `face_crops` of preprocess shards or, with `--dataset`, decodes
the records exactly as the training pipeline does (`pipeline.face_crop_items`), normalises
them with the model's own function, runs the network in fixed-size batches (one compile;
the last batch is zero-padded) and writes a store that `input_pipeline.prior_store.PriorStore`
reads (docs/FROZEN_PRIORS.md). The AGR labels of a multi-frame sample come from the
frame-averaged logits (our choice).
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from emo_jax.convert import facexformer as convert
from emo_jax.models import facexformer as fx
from emo_jax.models.pixels import normalize_face
from input_pipeline import contract, datasets, paths, pipeline
from input_pipeline.preprocess import PreextractedSource
from input_pipeline.prior_store import PRIOR_FIELDS, StoreWriter
from input_pipeline.records import SkipCounter

_PRIOR_ATTRS = ("global_feats", "local_feats", "landmarks", "age_logits", "gender_logits",
                "race_logits")


class PriorRunner:
  """Runs a frozen `FacePriors` network over crops in fixed batches with one jitted function.

  `__call__(crops [N, S, S, 3])` -> dict of numpy arrays keyed by PRIOR_FIELDS (first axis N).
  uint8 crops are normalised inside the jitted function by the function EmoLlama applies to
  uint8 `face_crops`, so stored priors equal the online ones; float crops must be
  normalised already.
  """

  def __init__(self, model: nnx.Module, batch_size: int = 8):
    if batch_size < 1:
      raise ValueError("batch_size must be >= 1")
    self.batch_size = batch_size
    graphdef, state = nnx.split(model)
    self._state = state

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
  """Write the priors of every (record_id, crops [F, S, S, 3]) to a prior store.

  Samples are distributed round-robin over `num_shards`; returns the index written to
  `out_dir/index.json`. A duplicate id or a sample without crops raises. A cloud `out_dir`
  (gs://...) is written locally, then uploaded.
  """
  with paths.staged_dir(out_dir) as local, StoreWriter(local, num_shards) as writer:
    for group in _batched_records(items, runner.batch_size):
      for rid, crops in group:
        if np.asarray(crops).ndim != 4 or len(crops) == 0:
          raise ValueError(f"record {rid!r}: face crops must be [F>0, S, S, 3], "
                           f"got {np.asarray(crops).shape}")
        writer.reserve(rid)  # before running the network
      out = runner(np.concatenate([np.asarray(c) for _, c in group]))
      start = 0
      for rid, crops in group:
        f = len(crops)
        writer.write(rid, {k: v[start:start + f] for k, v in out.items()})
        start += f
  return {"shards": writer.names, "ids": writer.index, "fields": list(PRIOR_FIELDS)}


def make_priors_fn(runner: PriorRunner, template: str | None = None):
  """A `priors_fn(crops uint8 [F, S, S, 3], record)` hook for preprocess.write_shards: stores
  the PRIOR_FIELDS arrays and, with a template, the sample's `agr_sentence`."""
  def priors_fn(crops: np.ndarray, record) -> dict[str, Any]:
    out: dict[str, Any] = runner(crops)
    if template is not None:
      idx = contract.agr_indices(out["age_logits"][None], out["gender_logits"][None],
                                 out["race_logits"][None])[0]
      still = getattr(record, "media_type", "image") in ("image", "pixels")
      out["agr_sentence"] = contract.agr_sentence(*idx, template=template,
                                                  media="image" if still else "video")
    return out
  return priors_fn


def _preextracted_items(shard_paths: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
  source = PreextractedSource(list(shard_paths))
  for i in range(len(source)):
    ex = source[i]
    if "face_crops" not in ex:
      raise ValueError(f"example {ex['record'].id!r} has no face_crops; preprocess with a "
                       "face_mode other than 'none'")
    yield ex["record"].id, ex["face_crops"]


def _record_items(args) -> Iterator[tuple[str, np.ndarray]]:
  """Crops of a dataset's records, decoded as the training pipeline decodes them."""
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
  if bool(args.shards) == bool(args.dataset):
    print("error: give exactly one of --shards or --dataset", file=sys.stderr)
    return 2
  if args.shards:
    shard_paths = sorted(glob.glob(args.shards))
    if not shard_paths:
      print(f"error: no shards match {args.shards}", file=sys.stderr)
      return 2
    items = _preextracted_items(shard_paths)
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
