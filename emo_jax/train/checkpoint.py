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
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterator

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from emo_jax.train.optimizer import path_str
from input_pipeline import paths


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
               async_save: bool = True):
    self.directory = directory
    self.save_every_steps = max(int(save_every_steps), 1) if save_every_steps else None
    self.save_every_secs = save_every_secs
    self._last_save_time = time.monotonic()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period or None, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(directory, options=options,
                                         item_names=("state", "data"))

  def _committed(self, step: int) -> bool:
    """orbax writes `commit_success.txt` into a step before it becomes visible; a step
    directory without it was copied or written partially (e.g. an interrupted sync)."""
    return paths.exists(paths.join(self.directory, str(step), "commit_success.txt"))

  def latest_step(self) -> int | None:
    """The newest *committed* step. Uncommitted step directories newer than it are
    deleted (on process 0) so training can write those steps again."""
    self.manager.reload()
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      if self._committed(step):
        return step
      logging.warning("checkpoint: step %d in %s is not committed (no commit_success.txt); "
                      "ignoring and deleting it", step, self.directory)
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
