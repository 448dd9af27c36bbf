"""The base class of every emo_jax module: weights carry logical axes, placed explicitly.

Weights name their logical axes in their metadata (`out_sharding`); the caller places them
(`emo_jax.sharding.init_sharded`: jit with out_shardings from the abstract state). So a
module is always built with flax's eager sharding off, whatever the process-wide setting,
and `import emo_jax` changes no global flag.
"""
from __future__ import annotations

import functools

from flax import nnx


class Module(nnx.Module):
  """`nnx.Module` whose constructor runs with eager sharding off."""

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_lazy_sharding", False):
      return

    @functools.wraps(init)
    def __init__(self, *args, **kw):
      with nnx.use_eager_sharding(False):
        init(self, *args, **kw)

    __init__._lazy_sharding = True  # pylint: disable=protected-access
    cls.__init__ = __init__
