"""Checkpoint file I/O shared by the converters: lazy safetensors reading (single file or
sharded with an index), opt-in pickled torch `.bin` reading, and sharded safetensors writing.

The safetensors format (a fact of the format spec): 8-byte little-endian header size N, an N-byte
JSON header `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then
the raw little-endian tensor bytes. We read it through `numpy.memmap`, so a tensor is only
materialised when asked for and never twice (bf16 via `ml_dtypes`), and write it the same way.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES: dict[str, Any] = {
  "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
  "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
  "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
  "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class CheckpointError(ValueError):
  """A checkpoint directory or file that cannot be read as asked."""


class SafetensorsFile:
  """Lazy view of one .safetensors file: `keys()`, `shape(k)`, `dtype(k)`, `get(k)`.

  The header is checked completely when the file is opened: every malformed entry
  (not JSON, not an object, a missing or mistyped `dtype` / `shape` / `data_offsets`,
  offsets outside the data or disagreeing with the shape) is a CheckpointError naming
  the file and the tensor."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise CheckpointError(f"{self.path}: too short to be a safetensors file")
      (n,) = struct.unpack("<Q", raw)
      size = self.path.stat().st_size
      if n > size - 8:
        raise CheckpointError(f"{self.path}: header size {n} exceeds the file size {size}")
      blob = f.read(n)
    try:
      header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
      raise CheckpointError(f"{self.path}: header is not JSON ({type(e).__name__}: "
                            f"{str(e)[:80]})") from None
    if not isinstance(header, dict):
      raise CheckpointError(f"{self.path}: header is a JSON {type(header).__name__}, "
                            "expected an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
      raise CheckpointError(f"{self.path}: __metadata__ is not an object")
    self.metadata = meta
    self._offset = 8 + n
    data_size = size - self._offset
    for key, info in header.items():
      _check_entry(self.path, key, info, data_size)
    self._header = header
    self._mmap = None

  def keys(self) -> list[str]:
    return list(self._header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._header[key]["shape"])

  def dtype(self, key: str) -> np.dtype:
    return np.dtype(_DTYPES[self._header[key]["dtype"]])

  def get(self, key: str) -> np.ndarray:
    """The tensor as a read-only memory-mapped numpy array (no copy)."""
    if key not in self._header:
      raise KeyError(f"{key!r} not in {self.path}")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    info = self._header[key]
    begin, end = info["data_offsets"]
    buf = self._mmap[self._offset + begin:self._offset + end]
    return buf.view(self.dtype(key)).reshape(tuple(info["shape"]))


def _check_entry(path: Path, key: str, info: Any, data_size: int) -> None:
  where = f"{path}: tensor {key!r}"
  if not isinstance(info, dict):
    raise CheckpointError(f"{where}: header entry is a {type(info).__name__}, expected an "
                          "object with dtype, shape and data_offsets")
  for field in ("dtype", "shape", "data_offsets"):
    if field not in info:
      raise CheckpointError(f"{where}: header entry has no {field!r}")
  name = info["dtype"]
  if not isinstance(name, str) or name not in _DTYPES:
    raise CheckpointError(f"{where}: unsupported dtype {name!r}")
  shape = info["shape"]
  if not isinstance(shape, list) or not all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
    raise CheckpointError(f"{where}: shape {shape!r} is not a list of sizes")
  offs = info["data_offsets"]
  if not (isinstance(offs, list) and len(offs) == 2 and all(
      isinstance(o, int) and not isinstance(o, bool) for o in offs)):
    raise CheckpointError(f"{where}: data_offsets {offs!r} is not [begin, end]")
  begin, end = offs
  if not 0 <= begin <= end <= data_size:
    raise CheckpointError(f"{where}: data_offsets {offs} outside the {data_size} data bytes")
  expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[name]).itemsize
  if end - begin != expected:
    raise CheckpointError(f"{where}: has {end - begin} bytes, expected {expected} for "
                          f"{name} {tuple(shape)}")


def is_float_dtype(dtype: Any) -> bool:
  """numpy floats plus ml_dtypes' bfloat16 / float8 (numpy kind 'V')."""
  dt = np.dtype(dtype)
  return dt.kind == "f" or str(dt).startswith(("bfloat16", "float8"))


def check_float_tensor(arr: np.ndarray, key: str, path: Any) -> np.ndarray:
  """`arr` if it holds floating-point values; CheckpointError for integer, boolean or
  complex storage (a weight stored that way would be silently converted by a cast)."""
  if not is_float_dtype(arr.dtype):
    raise CheckpointError(f"{path}: tensor {key!r} is stored as {arr.dtype}; a floating-point "
                          "weight was expected (refusing to cast)")
  return arr


def read_json_object(path: str | os.PathLike, what: str) -> dict:
  """A JSON file that must hold an object; CheckpointError naming the file otherwise."""
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path} not found or not a file (expected {what})")
  try:
    d = json.loads(path.read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise CheckpointError(f"{path}: not JSON ({type(e).__name__}: {str(e)[:80]})") from None
  if not isinstance(d, dict):
    raise CheckpointError(f"{path}: top level is a JSON {type(d).__name__}, expected an "
                          "object")
  return d


class CheckpointReader:
  """Tensor-by-tensor access to a checkpoint: a directory (sharded or single safetensors,
  or — only with `allow_pickle=True` — torch .bin files) or a single file."""

  def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
    self.path = Path(path)
    self._where: dict[str, Any] = {}
    files = self._resolve(allow_pickle)
    for f in files:
      for k in f.keys():
        self._where[k] = f

  def _resolve(self, allow_pickle: bool) -> list[Any]:
    p = self.path
    if p.is_file():
      if p.suffix == ".safetensors":
        return [SafetensorsFile(p)]
      return [_TorchFile(p, allow_pickle)]
    if not p.is_dir():
      raise CheckpointError(f"checkpoint path {p} does not exist")
    if (p / SAFE_INDEX).exists():
      return [SafetensorsFile(p / n) for n in _index_files(p / SAFE_INDEX)]
    if (p / SAFE_SINGLE).exists():
      return [SafetensorsFile(p / SAFE_SINGLE)]
    singles = sorted(p.glob("*.safetensors"))
    if singles:
      return [SafetensorsFile(s) for s in singles]
    if (p / BIN_INDEX).exists():
      return [_TorchFile(p / n, allow_pickle) for n in _index_files(p / BIN_INDEX)]
    if (p / BIN_SINGLE).exists():
      return [_TorchFile(p / BIN_SINGLE, allow_pickle)]
    raise CheckpointError(f"no safetensors or torch weights found in {p}")

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    return self._where[key].shape(key)

  def get(self, key: str) -> np.ndarray:
    if key not in self._where:
      raise KeyError(f"tensor {key!r} not found in checkpoint {self.path}")
    return self._where[key].get(key)


def _index_files(index_path: Path) -> list[str]:
  index = read_json_object(index_path, "a safetensors index")
  weight_map = index.get("weight_map")
  if not isinstance(weight_map, dict) or not all(
      isinstance(v, str) for v in weight_map.values()):
    raise CheckpointError(f"{index_path}: field 'weight_map' must map tensor names to file "
                          "names")
  names = sorted(set(weight_map.values()))
  missing = [n for n in names if not (index_path.parent / n).exists()]
  if missing:
    raise CheckpointError(f"{index_path}: shard files missing: {missing}")
  return names


class _TorchFile:
  """A pickled torch state dict, read only behind an explicit opt-in (pickle can run code)."""

  def __init__(self, path: Path, allow_pickle: bool):
    if not allow_pickle:
      raise CheckpointError(
        f"{path} is a pickled torch file; loading it can execute arbitrary code. Convert it to "
        "safetensors, or pass allow_pickle=True if you trust its source.")
    import torch  # pylint: disable=import-outside-toplevel
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
      sd = sd["state_dict"]
    self._sd = sd

  def keys(self):
    return list(self._sd)

  def shape(self, key):
    return tuple(self._sd[key].shape)

  def get(self, key):
    import torch  # pylint: disable=import-outside-toplevel
    t = self._sd[key].detach()
    if t.dtype == torch.bfloat16:
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _header_entry(arr_dtype: np.dtype, shape: tuple[int, ...], begin: int) -> dict[str, Any]:
  dtype = np.dtype(arr_dtype)
  if dtype not in _NAMES:
    raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  return {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [begin, begin + nbytes]}


TensorSource = Callable[[], Any]  # returns an array-like (numpy / jax) when called


def write_safetensors(path: str | os.PathLike,
                      tensors: Iterable[tuple[str, tuple[int, ...], Any, TensorSource]],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Write one file. `tensors` yields (name, shape, dtype, fetch); each tensor is fetched,
  written and released one at a time."""
  tensors = list(tensors)
  header: dict[str, Any] = {}
  offset = 0
  for name, shape, dtype, _ in tensors:
    header[name] = _header_entry(dtype, tuple(shape), offset)
    offset = header[name]["data_offsets"][1]
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = Path(str(path) + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype, fetch in tensors:
      arr = np.ascontiguousarray(np.asarray(fetch()))
      if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise CheckpointError(f"tensor {name!r}: got {arr.dtype} {arr.shape}, declared "
                              f"{np.dtype(dtype)} {tuple(shape)}")
      f.write(arr.tobytes() if arr.dtype.byteorder not in (">",) else arr.byteswap().tobytes())
      del arr
  os.replace(tmp, path)


def write_sharded_safetensors(out_dir: str | os.PathLike,
                              tensors: Iterable[tuple[str, tuple[int, ...], Any, TensorSource]],
                              *, max_shard_bytes: int = 5 * 2**30,
                              weights_name: str = SAFE_SINGLE,
                              metadata: Mapping[str, str] | None = None) -> list[str]:
  """Write `weights_name` if everything fits in `max_shard_bytes`, else HF-style shards
  `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`. Returns file names."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tensors = list(tensors)
  sizes = [int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d, _ in tensors]
  total = sum(sizes)
  metadata = {"format": "pt", **(metadata or {})}
  if total <= max_shard_bytes:
    write_safetensors(out_dir / weights_name, tensors, metadata)
    return [weights_name]
  shards: list[list[int]] = [[]]
  used = 0
  for i, size in enumerate(sizes):
    if shards[-1] and used + size > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(i)
    used += size
  stem = weights_name[:-len(".safetensors")]
  names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, idx in zip(names, shards):
    write_safetensors(out_dir / name, [tensors[i] for i in idx], metadata)
    weight_map.update({tensors[i][0]: name for i in idx})
  with open(out_dir / f"{weights_name}.index.json", "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names


def iter_tensors(path: str | os.PathLike, *, allow_pickle: bool = False,
                 ) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) for every tensor of a checkpoint, one at a time."""
  reader = CheckpointReader(path, allow_pickle=allow_pickle)
  for k in reader.keys():
    yield k, reader.get(k)

