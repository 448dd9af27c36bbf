"""orbax checkpoints of the train state and the grain iterator state, side by side.

One `CheckpointManager` step holds two items:
  'state'    the TrainState (step, trainable params, optimizer state, rng streams) saved
             as a flat {path: array} dict (readable keys, independent of pytree classes);
             written asynchronously, restored straight into the target shardings;
  'data'     the input iterator's state through grain's orbax handler (one JSON file
             per process), captured synchronously at save time so it matches the state.
Frozen weights are not saved: they come back from the config (seed / pretrained files).

Saving policy (our choice): every `save_every_steps` steps, or when `save_every_secs`
passed since the last save, keep the newest `max_to_keep` plus every step that is a
multiple of `keep_period`. A crash mid-save leaves only orbax's temporary
`<step>.orbax-checkpoint-tmp-*` directory (renamed into place on commit; on object stores
orbax writes a commit marker instead), which `latest_step()` never returns.

Two modes. A training `Checkpointer` owns the folder: it removes uncommitted step folders
and temporary directories (so those steps can be written again) and logs each one it
removes. A `read_only=True` one (eval, predict, export) never writes, creates or deletes
anything: it skips uncommitted steps with a warning and says which step it uses. The
path helpers below are the only places that touch the file system directly.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from emo_jax.train.errors import ConfigError, MissingCheckpointError
from emo_jax.train.optimizer import path_str
from input_pipeline import paths

CHECKPOINT_SUBDIR = "checkpoints"
COMMIT_MARKER = "commit_success.txt"
TMP_MARK = ".orbax-checkpoint-tmp"


# ----------------------------------------------------------------------- path helpers


def checkpoint_dir(workdir: str) -> str:
  return paths.join(workdir, CHECKPOINT_SUBDIR)


def _exists(path: str) -> bool:
  return paths.exists(path)


def _isdir(path: str) -> bool:
  return paths.path(path).is_dir()


def _listdir(path: str) -> list[str]:
  return sorted(p.name for p in paths.path(path).iterdir()) if _isdir(path) else []


def step_folders(directory: str) -> dict[int, bool]:
  """{step: committed} of the step folders in `directory` (temporary ones excluded)."""
  out = {}
  for name in _listdir(directory):
    if name.isdigit():
      out[int(name)] = _exists(paths.join(directory, name, COMMIT_MARKER))
  return out


def tmp_folders(directory: str) -> list[str]:
  """orbax's temporary directories of writes that never finished."""
  return [paths.join(directory, n) for n in _listdir(directory) if TMP_MARK in n]


def check_writable(out_dir: str, flag: str) -> None:
  """ConfigError unless `out_dir` (or its nearest existing parent) is a writable folder.
  A cloud URL is not checked here: the store answers at the first write."""
  if paths.is_remote(out_dir):
    return
  p = os.path.abspath(out_dir)
  while not os.path.exists(p):
    p = os.path.dirname(p)
  if not os.path.isdir(p) or not os.access(p, os.W_OK):
    raise ConfigError(f"cannot write to {out_dir} ({p} is not a writable folder): pass "
                      f"{flag}=<a writable folder>")


def require_checkpoint(workdir: str) -> int:
  """The newest committed step of a workdir; MissingCheckpointError (a one-line message
  for the command) when the workdir or a committed checkpoint in it is missing."""
  if not _isdir(workdir):
    raise MissingCheckpointError(f"workdir {workdir} does not exist: train first "
                                 "(--mode=train) or check --workdir")
  step = latest_committed_step(checkpoint_dir(workdir))
  if step is None:
    raise MissingCheckpointError(f"no committed checkpoint in {checkpoint_dir(workdir)}: "
                                 "train first (--mode=train) or check --workdir")
  return step


def latest_committed_step(directory: str) -> int | None:
  """The newest committed step in `directory` without opening an orbax manager."""
  steps = [s for s, ok in step_folders(directory).items() if ok]
  return max(steps) if steps else None


class CheckpointableIterator:
  """Adapts any iterator with `get_state()` / `set_state()` (grain DatasetIterator,
  DataLoaderIterator, or our own) to grain's orbax handler: state as JSON bytes."""

  def __init__(self, it: Any):
    if not (hasattr(it, "get_state") and hasattr(it, "set_state")):
      raise TypeError(f"{type(it).__name__} has no get_state/set_state: cannot checkpoint it")
    self.inner = it

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self) -> Any:
    return next(self.inner)

  def get_state(self) -> bytes:
    s = self.inner.get_state()
    wrapped = {"bytes": s.decode("latin-1")} if isinstance(s, bytes) else {"json": s}
    return json.dumps(wrapped, sort_keys=True).encode()

  def set_state(self, state: bytes) -> None:
    d = json.loads(state.decode() if isinstance(state, bytes) else state)
    self.inner.set_state(d["bytes"].encode("latin-1") if "bytes" in d else d["json"])

  def start_prefetch(self) -> None:   # called by grain's handler after a restore
    if hasattr(self.inner, "start_prefetch"):
      self.inner.start_prefetch()


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def flatten_state(tree: Any) -> dict[str, Any]:
  """{'/'-path: array}; typed PRNG keys stored as their uint32 key data."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    key = path_str(path) or "_"
    if key in out:
      raise ValueError(f"duplicate checkpoint key {key!r}")
    out[key] = jax.random.key_data(leaf) if _is_key(leaf) else leaf
  return out


def unflatten_state(template: Any, flat: dict[str, Any]) -> Any:
  """Inverse of flatten_state against a (possibly abstract) template of the same tree."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for path, t in leaves_with_path:
    key = path_str(path) or "_"
    if key not in flat:
      raise KeyError(f"checkpoint has no entry {key!r}")
    v = flat[key]
    leaves.append(jax.random.wrap_key_data(v, impl=jax.random.key_impl(t)) if _is_key(t) else v)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _abstract_flat(template: Any) -> dict[str, Any]:
  """ShapeDtypeStructs (with the template's shardings) to restore into."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(template):
    sharding = getattr(x, "sharding", None)
    if _is_key(x):
      x = jax.eval_shape(jax.random.key_data, x)
      if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    out[path_str(path) or "_"] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return out


class Checkpointer:
  """Step- and time-based async saving, keep-N + keep-every-N, restore-latest."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, keep_period: int | None = None,
               save_every_steps: int = 1000, save_every_secs: float | None = None,
               async_save: bool = True, read_only: bool = False):
    self.directory = directory
    self.read_only = read_only
    self.save_every_steps = max(int(save_every_steps), 1) if save_every_steps else None
    self.save_every_secs = save_every_secs
    self._last_save_time = time.monotonic()
    if read_only:
      if not _isdir(directory):
        raise MissingCheckpointError(f"no checkpoint folder {directory}: train first "
                                     "(--mode=train) or check --workdir")
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                             cleanup_tmp_directories=False,
                                             save_root_metadata=False)
    else:
      if jax.process_index() == 0:
        for t in tmp_folders(directory):
          logging.warning("checkpoint: removing %s (a write that never finished)", t)
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, keep_period=keep_period or None, create=True,
          enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(directory, options=options,
                                         item_names=("state", "data"))

  @classmethod
  def for_training(cls, workdir: str, ck) -> "Checkpointer":
    """The training checkpointer of ``<workdir>/checkpoints`` from a ``config.checkpoint``."""
    return cls(checkpoint_dir(workdir), max_to_keep=ck.max_to_keep,
               keep_period=ck.keep_period or None, save_every_steps=ck.every_steps,
               save_every_secs=ck.every_secs if ck.every_secs > 0 else None,
               async_save=ck.async_save)

  def restore_or_start(self, state: Any, data_iter: CheckpointableIterator | None
                       ) -> tuple[Any, int]:
    """(restored state, its step) from the latest committed step, else (state, 0)."""
    restored = self.restore(state, data_iter)
    if restored is None:
      return state, 0
    logging.info("resumed from step %d", restored[1])
    return restored

  def _committed(self, step: int) -> bool:
    """orbax writes `commit_success.txt` into a step before it becomes visible; a step
    directory without it was copied or written partially (e.g. an interrupted sync)."""
    return _exists(paths.join(self.directory, str(step), COMMIT_MARKER))

  def latest_step(self) -> int | None:
    """The newest *committed* step. Uncommitted step directories newer than it are
    removed by a training checkpointer (process 0, logged) so training can write those
    steps again; a read-only one only warns."""
    self.manager.reload()
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      if self._committed(step):
        return step
      folder = paths.join(self.directory, str(step))
      if self.read_only:
        logging.warning("checkpoint: %s has no %s (not committed): skipped", folder,
                        COMMIT_MARKER)
        continue
      logging.warning("checkpoint: removing %s: not committed (no %s)", folder, COMMIT_MARKER)
      if jax.process_index() == 0:
        self.manager.delete(step)
    return None

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    if self.save_every_steps and step % self.save_every_steps == 0:
      return True
    if self.save_every_secs is not None:
      return time.monotonic() - self._last_save_time >= self.save_every_secs
    return False

  def save(self, step: int, state: Any, data_iter: CheckpointableIterator | None,
           *, force: bool = False) -> bool:
    """Starts an (async) save of `state` and the iterator at `step`. Returns whether it
    saved (a step already on disk is skipped)."""
    if self.read_only:
      raise RuntimeError("a read-only Checkpointer cannot save")
    if step in self.manager.all_steps():
      logging.info("checkpoint: step %d already saved", step)
      return False
    args = {"state": ocp.args.StandardSave(flatten_state(state))}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    self._last_save_time = time.monotonic()
    logging.info("checkpoint: %s step %d in %s", "saving" if saved else "skipped", step,
                 self.directory)
    return saved

  def restore(self, template: Any, data_iter: CheckpointableIterator | None,
              step: int | None = None) -> tuple[Any, int] | None:
    """Restores the latest (or given) committed step into `template`'s structure and
    shardings; sets the iterator's position. None when there is no checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    args = {"state": ocp.args.StandardRestore(_abstract_flat(template))}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return unflatten_state(template, dict(out["state"])), step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
