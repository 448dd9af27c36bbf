"""LoRA adapters (Hu et al. 2021) for the NNX models, PEFT-compatible.

Paper facts: y = x W + (alpha / r) * dropout(x) A B with A [in, r], B [r, out], B initialised
to zero so the adapted model starts equal to the base. Our choices, mirroring PEFT's defaults so
exported adapters behave the same in `peft`: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's
kaiming-uniform with a=sqrt(5)), dropout on the LoRA input only, scale alpha / r (no rsLoRA).

A and B are `nnx.LoRAParam`s living next to the frozen `kernel` inside the same module, so the
base parameter path (e.g. `model.layers.3.self_attn.q_proj.kernel`) is unchanged and HF names
still apply. Works on stacked (scanned) layers too: A/B get the kernel's leading `layers` axis.
"""
from __future__ import annotations

import contextlib
import functools
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax.models.module import Module
from emo_jax.sharding import variable_logical_axes

DEFAULT_TARGETS: tuple[str, ...] = (
  "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(Module):
  """An `nnx.Linear` (same `kernel` / `bias` Variables) plus a low-rank update.

  The base kernel is the caller's frozen weight; `lora_a`, `lora_b` are the trainable
  `nnx.LoRAParam`s.
  """

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, dropout: float = 0.0,
               rngs: nnx.Rngs):
    if rank <= 0:
      raise ValueError(f"LoRA rank must be positive, got {rank}")
    self.in_features = base.in_features
    self.out_features = base.out_features
    self.use_bias = base.use_bias
    self.dtype = base.dtype
    # The factors are trained: stored in at least fp32 (master weights) even over a bf16 base.
    self.param_dtype = jnp.promote_types(base.param_dtype, jnp.float32)
    self.precision = base.precision
    self.preferred_element_type = getattr(base, "preferred_element_type", None)
    self.kernel = base.kernel
    self.bias = base.bias
    self.rank = rank
    self.alpha = float(alpha)
    self.scale = float(alpha) / rank
    kshape = self.kernel[...].shape
    lead = kshape[:-2]
    names = variable_logical_axes(self.kernel) or (None,) * len(kshape)
    bound = 1.0 / (self.in_features ** 0.5)
    a = jax.random.uniform(rngs.params(), lead + (self.in_features, rank), jnp.float32,
                           -bound, bound).astype(self.param_dtype)
    self.lora_a = nnx.LoRAParam(a, out_sharding=tuple(names[:-1]) + ("lora_rank",))
    self.lora_b = nnx.LoRAParam(jnp.zeros(lead + (rank, self.out_features), self.param_dtype),
                                out_sharding=tuple(names[:-2]) + ("lora_rank", names[-1]))
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.enabled = True   # python-level switch (see `disabled`): off = the base layer alone

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    pet = self.preferred_element_type
    x = x.astype(dtype)
    y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(dtype), precision=self.precision,
                   preferred_element_type=pet)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    if not self.enabled:
      return y
    xd = self.dropout(x) if self.dropout is not None else x
    up = low_rank_update(xd, self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype),
                         self.precision, pet)
    return y + (self.scale * up).astype(y.dtype)

  def merged_kernel(self) -> jax.Array:
    """kernel + scale * A @ B, computed in fp32, in the kernel's dtype."""
    k = self.kernel[...]
    delta = jnp.einsum("...ir,...ro->...io", self.lora_a[...].astype(jnp.float32),
                       self.lora_b[...].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return (k.astype(jnp.float32) + self.scale * delta).astype(k.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def low_rank_update(x: jax.Array, a: jax.Array, b: jax.Array, precision=None,
                    preferred_element_type=None) -> jax.Array:
  """(x @ a) @ b for x [..., in], a [in, r], b [r, out].

  The backward is written out (our choice) so that every contraction over tokens has the
  rank-r operand on the transposed side: dB = (x a)^T dy and dA = x^T (dy b^T) are formed as
  [r, T] x [T, n] products, and only [T, r] / [r, n] arrays get transposed. Left to autodiff,
  XLA:CPU transposed the [T, out] cotangent instead (a full copy of each LoRA'd projection's
  gradient per step).
  """
  return _low_rank_fwd(x, a, b, precision, preferred_element_type)[0]


def _low_rank_fwd(x, a, b, precision, preferred_element_type):
  xa = jnp.einsum("...i,ir->...r", x, a, precision=precision)
  up = jnp.einsum("...r,ro->...o", xa, b, precision=precision,
                  preferred_element_type=preferred_element_type)
  return up, (x, a, b, xa.reshape(-1, xa.shape[-1]).T)  # the small [r, T] transpose


def _low_rank_bwd(precision, preferred_element_type, res, g):
  del preferred_element_type
  x, a, b, xa_t = res
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])                          # [T, in]
  g2 = g.reshape(-1, g.shape[-1]).astype(b.dtype)          # [T, out]
  db = jnp.einsum("rt,to->ro", xa_t, g2, precision=precision)
  dxa_t = jnp.einsum("ro,to->rt", b, g2, precision=precision)   # [r, T]
  da = jnp.einsum("rt,ti->ri", dxa_t, x2, precision=precision).T
  dx = jnp.einsum("tr,ir->ti", dxa_t.T, a, precision=precision)
  return dx.reshape(lead + (x.shape[-1],)).astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


low_rank_update.defvjp(_low_rank_fwd, _low_rank_bwd)


def _path_str(path: Sequence[Any]) -> str:
  return ".".join(str(p) for p in path)


def target_matcher(targets: str | Iterable[str]) -> Callable[[str], bool]:
  """A plain identifier matches the last path component; anything else is a regex that must
  match the whole dotted path (e.g. r'model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj')."""
  if isinstance(targets, str):
    targets = (targets,)
  targets = tuple(targets)
  if not targets:
    raise ValueError("LoRA targets must not be empty")
  names = {t for t in targets if re.fullmatch(r"\w+", t)}
  regexes = [re.compile(t) for t in targets if t not in names]

  def match(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in names or any(r.fullmatch(path) for r in regexes)
  return match


def _set_child(model: nnx.Module, path: Sequence[Any], value: Any) -> None:
  parent = model
  for p in path[:-1]:
    parent = parent[p] if isinstance(p, int) else getattr(parent, p)
  last = path[-1]
  if isinstance(last, int):
    parent[last] = value
  else:
    setattr(parent, last, value)


def _iter_modules(model: nnx.Module):
  it = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
  return list(it)


def apply_lora(model: nnx.Module, *, rank: int, alpha: float,
               targets: str | Iterable[str] = DEFAULT_TARGETS, dropout: float = 0.0,
               rngs: nnx.Rngs | None = None) -> list[str]:
  """Wrap every `nnx.Linear` whose module path matches `targets` in a `LoRALinear` (in place).

  Returns the dotted paths that were wrapped; raises if none matched (a typo in `targets`
  must not silently train nothing).
  """
  rngs = nnx.Rngs(0) if rngs is None else rngs
  match = target_matcher(targets)
  hits = [(path, m) for path, m in _iter_modules(model)
          if isinstance(m, nnx.Linear) and path and match(_path_str(path))]
  if not hits:
    raise ValueError(f"no nnx.Linear module path matches LoRA targets {targets!r}")
  for path, m in hits:
    _set_child(model, path, LoRALinear(m, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs))
  return [_path_str(p) for p, _ in hits]


def lora_modules(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
  """(dotted path, module) of every LoRALinear in the model."""
  return [(_path_str(p), m) for p, m in _iter_modules(model) if isinstance(m, LoRALinear)]


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Fold every LoRA update into its base kernel and restore plain `nnx.Linear`s (in place).

  The merged kernels keep their Variable metadata (logical axes). Returns the model.
  """
  for path, m in [(p, m) for p, m in _iter_modules(model) if isinstance(m, LoRALinear)]:
    m.kernel.set_value(m.merged_kernel())
    lin = nnx.eval_shape(lambda m=m: nnx.Linear(
      m.in_features, m.out_features, use_bias=m.use_bias, dtype=m.dtype,
      param_dtype=m.param_dtype, precision=m.precision,
      preferred_element_type=m.preferred_element_type, rngs=nnx.Rngs(0)))
    lin.kernel = m.kernel
    lin.bias = m.bias
    _set_child(model, path, lin)
  return model


def trainable_filter(config: Mapping[str, Any] | Sequence[str] | str | None = None, *,
                     lora: bool = True, patterns: Sequence[str] = ()) -> Callable[..., bool]:
  """An nnx filter selecting the trainable parameters.

  Trainable = every `nnx.LoRAParam` (when `lora`) plus every `nnx.Param` whose dotted path
  matches (re.search) one of `patterns`. `config` may be a mapping with keys `lora` and
  `patterns` (e.g. `config.train.trainable`), a list of patterns, or one pattern. Use with
  `nnx.split(model, trainable_filter(...), ...)` so frozen weights get no optimizer state.
  """
  if isinstance(config, str):
    patterns = (config,)
  elif isinstance(config, Mapping) or hasattr(config, "get") and not isinstance(config, Sequence):
    lora = bool(config.get("lora", lora))
    patterns = tuple(config.get("patterns", patterns) or ())
  elif config is not None:
    patterns = tuple(config)
  regexes = [re.compile(p) for p in patterns]

  def filt(path, value) -> bool:
    if lora and isinstance(value, nnx.LoRAParam):
      return True
    return (isinstance(value, nnx.Param) and not isinstance(value, nnx.LoRAParam)
            and any(r.search(_path_str(path)) for r in regexes))
  return filt


@contextlib.contextmanager
def disabled(model: nnx.Module):
  """Within the block every LoRALinear of `model` computes its base layer only (the
  adapters are skipped, not zeroed): the base model, with no second copy of its weights.
  Meant for a traced forward (e.g. a DPO / GRPO reference pass inside the jitted step); the
  switch is a Python attribute, so the adapters are back on when the block exits."""
  mods = [m for _, m in lora_modules(model)]
  before = [m.enabled for m in mods]
  for m in mods:
    m.enabled = False
  try:
    yield model
  finally:
    for m, b in zip(mods, before):
      m.enabled = b
