"""The pure train step: grads of a token-summed loss, accumulated over micro-batches.

`train_step(graphdef, tx, loss_fn, state, frozen, batch)` is a pure function of its
arrays; `jit_train_step` jits it with explicit in/out shardings and donates the state.

The loss function is `loss_fn(model, batch) -> (loss_sum, weight)`: the *sum* of the
per-token losses and the number of loss tokens. It may return a third item, a dict of
metric *sums* (summed over micro-batches too, returned under `metrics['aux']`), and, when
the step is given `extra` (a pytree of arrays the loss reads but does not train, e.g. a
post-training reference model's weights), it is called as `loss_fn(model, batch, extra)`. The step divides the summed gradient of
all micro-batches by the total weight, so N micro-batches give exactly the gradient of
one step on the whole batch (mean over all loss tokens of the global batch), whatever
the padding per micro-batch. Micro-batch i takes rows i, i+N, i+2N, ... so a batch
sharded contiguously over devices needs no data movement to be split.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from emo_jax.models.layers import DEFAULT_CHUNK
from emo_jax.train.state import TrainState
from emo_jax.xla_options import train_compiler_options

LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, jax.Array]]


def _cast_floats(tree: Any, dtype) -> Any:
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def split_micro(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B/n, ...] with micro-batch i = rows i::n."""
  def f(x):
    b = x.shape[0]
    if b % n:
      raise ValueError(f"batch size {b} is not divisible by accum_steps {n}")
    return jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(f, batch)


def train_step(graphdef, tx: optax.GradientTransformation, loss_fn: LossFn,
               state: TrainState, frozen, batch: dict, extra: Any = None, *,
               accum_steps: int = 1, compute_dtype=None) -> tuple[TrainState, dict]:
  """One optimizer step. Returns (new_state, metrics with loss, grad_norm, tokens[, aux])."""

  def micro_loss(params, rngs, micro):
    model = nnx.merge(graphdef, _cast_floats(params, compute_dtype), rngs,
                      _cast_floats(frozen, compute_dtype))
    out = loss_fn(model, micro) if extra is None else loss_fn(
        model, micro, _cast_floats(extra, compute_dtype))
    loss_sum, weight = out[0], out[1]
    aux = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), out[2]) if len(out) > 2 else {}
    new_rngs = nnx.state(model, nnx.RngState)
    return loss_sum.astype(jnp.float32), (weight.astype(jnp.float32), aux, new_rngs)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  if accum_steps == 1:
    (loss_sum, (weight, aux, rngs)), grads = grad_fn(state.params, state.rngs, batch)
  else:
    micro = split_micro(batch, accum_steps)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    aux0 = jax.eval_shape(lambda: grad_fn(state.params, state.rngs,
                                          jax.tree.map(lambda x: x[0], micro))[0][1][1])
    aux0 = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), aux0)

    def body(carry, mb):
      g_acc, l_acc, w_acc, a_acc, rngs = carry
      (l, (w, a, rngs)), g = grad_fn(state.params, rngs, mb)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, w_acc + w,
              jax.tree.map(jnp.add, a_acc, a), rngs), None

    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), aux0, state.rngs)
    (grads, loss_sum, weight, aux, rngs), _ = jax.lax.scan(body, init, micro)

  denom = jnp.maximum(weight, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            rngs=rngs)
  metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "tokens": weight}
  if aux:
    metrics["aux"] = aux
  return new_state, metrics


def jit_train_step(graphdef, tx, loss_fn: LossFn, *, state_shardings=None,
                   frozen_shardings=None, batch_sharding=None, accum_steps: int = 1,
                   compute_dtype=None, donate: bool = True,
                   compiler_options: dict | None | str = "auto",
                   extra_shardings: Any = None, with_extra: bool = False):
  """jax.jit of `train_step` over (state, frozen, batch[, extra]) with explicit shardings.

  With all shardings None it runs unsharded (default device). The state is donated.
  `with_extra`: the jitted step takes a fourth argument `extra` (see `train_step`).
  `compiler_options="auto"` takes `xla_options.train_compiler_options()` (on CPU: YNNPACK
  elementwise and reduce fusions); None compiles with XLA's defaults.
  """
  if compiler_options == "auto":
    compiler_options = train_compiler_options()
  fn = functools.partial(train_step, graphdef, tx, loss_fn, accum_steps=accum_steps,
                         compute_dtype=compute_dtype)
  kw = {}
  if state_shardings is not None:
    kw["in_shardings"] = (state_shardings, frozen_shardings, batch_sharding)
    if with_extra:
      kw["in_shardings"] += (extra_shardings,)
    kw["out_shardings"] = (state_shardings, None)
  return jax.jit(fn, donate_argnums=(0,) if donate else (),
                 compiler_options=compiler_options, **kw)


def token_ce_sum(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Next-token cross entropy summed over positions with loss_mask (batch contract:
  loss at t uses the logits at t-1). fp32. Returns (sum, count)."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = jnp.maximum(input_ids[:, 1:], 0)
  mask = loss_mask[:, 1:].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(ce * mask), jnp.sum(mask)


def causal_lm_ce_sum(model, input_ids: jax.Array, attention_mask: jax.Array,
                     loss_mask: jax.Array, *, chunk: int = DEFAULT_CHUNK
                     ) -> tuple[jax.Array, jax.Array]:
  """`token_ce_sum` of a `LlamaForCausalLM` on `input_ids`, through the chunked LM-head cross
  entropy (`LlamaForCausalLM.cross_entropy`): the [B, T, V] logits are never materialised.
  Returns (sum, count)."""
  ids = jnp.maximum(input_ids, 0)  # negative pad ids (-100) embed as id 0
  h, _ = model.model(ids, attention_mask=attention_mask)
  targets = ids[:, 1:]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  nll, _ = model.cross_entropy(h[:, :-1], targets, mask, chunk=chunk)
  return nll, jnp.sum(mask)
