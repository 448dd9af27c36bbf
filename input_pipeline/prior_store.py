"""The on-disk store of precomputed face priors, and its reader.

A store is a folder of ArrayRecord shards holding one `.npz` blob per sample (no pickle) plus
`index.json` (record id -> shard, position). `emo_jax.jobs.precompute_priors` writes it
with `StoreWriter`; the pipeline reads it with `PriorStore` inside grain workers, which
therefore need only numpy and array_record.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Mapping

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from input_pipeline import paths
from input_pipeline.contract import agr_labels as _agr_labels

PRIOR_FIELDS = ("face_global", "face_local", "landmarks", "age_logits", "gender_logits",
                "race_logits")
INDEX_NAME = "index.json"
SUFFIX = ".array_record"


def agr_labels(priors: Mapping[str, np.ndarray]) -> dict[str, str]:
  """Age / gender / race label names of one sample from its per-frame logits [F, n]."""
  return _agr_labels(priors["age_logits"], priors["gender_logits"], priors["race_logits"])


def encode_priors(record_id: str, priors: Mapping[str, np.ndarray]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, id=np.array(record_id), **{k: np.asarray(priors[k]) for k in PRIOR_FIELDS})
  return buf.getvalue()


def decode_priors(data: bytes) -> tuple[str, dict[str, np.ndarray]]:
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    return str(z["id"]), {k: z[k] for k in PRIOR_FIELDS}


class StoreWriter:
  """Writes samples round-robin over `num_shards` shards; `close()` writes the index.

  A duplicate id raises. Use as a context manager: the index is written only when the
  block ends without an error, so a failed run leaves no index that looks complete.
  """

  def __init__(self, out_dir: str, num_shards: int = 1):
    if num_shards < 1:
      raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    os.makedirs(out_dir, exist_ok=True)
    self.out_dir = out_dir
    self.names = [f"priors-{i:05d}-of-{num_shards:05d}{SUFFIX}" for i in range(num_shards)]
    self._writers = [ArrayRecordWriter(os.path.join(out_dir, n), "group_size:1")
                     for n in self.names]
    self._counts = [0] * num_shards
    self.index: dict[str, list[int]] = {}
    self._written = 0

  def reserve(self, record_id: str) -> None:
    """Claim an id before its priors are computed (a duplicate fails before the work)."""
    if record_id in self.index:
      raise ValueError(f"duplicate record id {record_id!r}")
    self.index[record_id] = [-1, -1]

  def write(self, record_id: str, priors: Mapping[str, np.ndarray]) -> None:
    if self.index.get(record_id, [-1, -1]) != [-1, -1]:
      raise ValueError(f"duplicate record id {record_id!r}")
    shard = self._written % len(self._writers)
    self._written += 1
    self._writers[shard].write(encode_priors(record_id, priors))
    self.index[record_id] = [shard, self._counts[shard]]
    self._counts[shard] += 1

  def close(self, write_index: bool = True) -> dict[str, Any]:
    for w in self._writers:
      w.close()
    meta = {"shards": self.names, "ids": self.index, "fields": list(PRIOR_FIELDS)}
    if write_index:
      with open(os.path.join(self.out_dir, INDEX_NAME), "w") as fh:
        json.dump(meta, fh)
    return meta

  def __enter__(self) -> "StoreWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.close(write_index=exc_type is None)


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
