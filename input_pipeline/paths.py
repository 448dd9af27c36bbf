"""Paths that may be local or cloud URLs (`gs://bucket/x`, anything etils.epath opens).

One path layer for every file the job reads or writes: etils.epath (the layer orbax and
grain use). Local paths behave as plain files; `gs://` goes through epath's backend for
the scheme (tf.io.gfile when TensorFlow is installed; fsspec/gcsfs with
`EPATH_USE_TF=false`).

Libraries that need a real local file (PyAV, ArrayRecord readers, sentencepiece training,
matplotlib) get one through `local_copy` (download a remote file to a temporary copy) or
`staged_dir` (write into a local folder, upload its files to the remote folder on
`sync()` / exit). Paths stay `str` in configs and return values.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from typing import Iterator

from etils import epath

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
  """True for URLs (`gs://...`, `s3://...`); `file://` and plain paths are local."""
  p = os.fspath(path)
  return bool(_SCHEME.match(p)) and not p.startswith("file://")


def resolve(path: str | os.PathLike) -> str:
  """Local: absolute, `~` expanded (as before). Remote: the URL without a trailing '/'."""
  p = os.fspath(path)
  if is_remote(p):
    return p.rstrip("/")
  return os.path.abspath(os.path.expanduser(p))


def join(base: str | os.PathLike, *parts: str) -> str:
  """`base/part/...` for local paths and URLs alike (a URL never goes through abspath)."""
  if is_remote(base):
    return "/".join([os.fspath(base).rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(os.fspath(base), *parts)


def basename(path: str | os.PathLike) -> str:
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def path(p: str | os.PathLike) -> epath.Path:
  return epath.Path(os.fspath(p))


def exists(p: str | os.PathLike) -> bool:
  return path(p).exists()


def isfile(p: str | os.PathLike) -> bool:
  q = path(p)
  return q.exists() and not q.is_dir()


def makedirs(p: str | os.PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def read_bytes(p: str | os.PathLike) -> bytes:
  return path(p).read_bytes()


def read_text(p: str | os.PathLike) -> str:
  return path(p).read_text(encoding="utf-8")


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
  path(p).write_bytes(data)


def write_text(p: str | os.PathLike, text: str) -> None:
  path(p).write_text(text, encoding="utf-8")


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Copies one file between any two of local / remote (bytes through this process)."""
  write_bytes(dst, read_bytes(src))


def upload_tree(local_dir: str, dst_dir: str) -> list[str]:
  """Copies every file under `local_dir` to the same relative path under `dst_dir`.
  Returns the destination paths."""
  out = []
  for root, _, files in os.walk(local_dir):
    for name in sorted(files):
      src = os.path.join(root, name)
      rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
      dst = join(dst_dir, *rel.split("/"))
      makedirs(dst.rsplit("/", 1)[0] if is_remote(dst) else os.path.dirname(dst))
      copy_file(src, dst)
      out.append(dst)
  return out


def list_files(directory: str) -> list[str]:
  """Every file under `directory` (recursively), as '/'-separated relative paths."""
  out = []

  def visit(d: epath.Path, prefix: str):
    for child in sorted(d.iterdir(), key=lambda c: c.name):
      rel = prefix + child.name
      if child.is_dir():
        visit(child, rel + "/")
      else:
        out.append(rel)
  visit(path(directory), "")
  return out


def download_tree(src_dir: str, local_dir: str) -> None:
  """Copies every file under the (remote) `src_dir` into `local_dir`."""
  for rel in list_files(src_dir):
    dst = os.path.join(local_dir, *rel.split("/"))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "wb") as fh:
      fh.write(read_bytes(join(src_dir, *rel.split("/"))))


def cache_dir(*parts: str) -> str:
  """A local folder for copies of remote inputs and generated data:
  `$EMO_JAX_CACHE` or `~/.cache/emo_jax`, then `parts`."""
  base = os.environ.get("EMO_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "emo_jax")
  return os.path.join(base, *parts)


def local_dir(p: str) -> str:
  """`p` itself when local; for a URL, a local copy of the whole folder (made once per
  process; later calls reuse it) under cache_dir('remote', <hash of the URL>)."""
  if not is_remote(p):
    return p
  key = hashlib.sha1(resolve(p).encode()).hexdigest()[:16]
  dst = cache_dir("remote", f"{basename(p)}-{key}")
  marker = os.path.join(dst, ".complete")
  if not os.path.exists(marker):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(dst))
    download_tree(p, tmp)
    open(os.path.join(tmp, ".complete"), "w").close()
    try:
      os.rename(tmp, dst)
    except OSError:   # another process got there first: its copy is complete
      shutil.rmtree(tmp, ignore_errors=True)
  return dst


@contextlib.contextmanager
def local_copy(p: str) -> Iterator[str]:
  """A local file with the contents of `p` (itself when local; a temporary download,
  same base name, removed on exit, when remote)."""
  if not is_remote(p):
    yield p
    return
  with tempfile.TemporaryDirectory(prefix="emo_jax_in_") as d:
    dst = os.path.join(d, basename(p))
    with open(dst, "wb") as fh:
      fh.write(read_bytes(p))
    yield dst


class StagedDir:
  """A local folder standing for `target`: writers use `.local`; `sync()` uploads its files
  to `target` (only the ones that changed since the last sync). For a local `target` the
  folder is `target` itself and `sync()` does nothing."""

  def __init__(self, target: str):
    self.target = resolve(target)
    self.remote = is_remote(target)
    if self.remote:
      self.local = tempfile.mkdtemp(prefix="emo_jax_stage_")
    else:
      self.local = self.target
      os.makedirs(self.local, exist_ok=True)
    self._sent: dict[str, tuple[int, int]] = {}

  def sync(self) -> list[str]:
    if not self.remote:
      return []
    out = []
    for root, _, files in os.walk(self.local):
      for name in sorted(files):
        src = os.path.join(root, name)
        st = os.stat(src)
        sig = (st.st_size, st.st_mtime_ns)
        if self._sent.get(src) == sig:
          continue
        rel = os.path.relpath(src, self.local).replace(os.sep, "/")
        dst = join(self.target, *rel.split("/"))
        copy_file(src, dst)
        self._sent[src] = sig
        out.append(dst)
    return out

  def close(self) -> None:
    self.sync()
    if self.remote:
      shutil.rmtree(self.local, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str) -> Iterator[str]:
  """`with staged_dir(out) as d:` write files into local folder `d`; on normal exit they
  are uploaded to `out` (a no-op when `out` is local: `d` is `out`)."""
  s = StagedDir(target)
  try:
    yield s.local
    s.sync()
  finally:
    if s.remote:
      shutil.rmtree(s.local, ignore_errors=True)
