"""The LoRA-step FLOP count (emo_jax.perf.flops) against the matmuls autodiff traces."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from emo_jax.perf.flops import jaxpr_matmul_flops, lora_step_flops, lora_targets_per_layer
from emo_jax.models.llama import LlamaConfig, LlamaForCausalLM
from emo_jax.models.lora import apply_lora, trainable_filter
from emo_jax.xla_options import train_compiler_options

BATCH, SEQ, RANK = 2, 17, 4     # 16 loss positions: a whole number of 8-position CE chunks
CE_CHUNK = 8


def _grad_fn(cfg: LlamaConfig, targets):
  """(value_and_grad of the next-token loss w.r.t. the LoRA params, those params)."""
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  apply_lora(model, rank=RANK, alpha=2 * RANK, targets=targets, rngs=nnx.Rngs(1))
  graphdef, trainable, frozen = nnx.split(model, trainable_filter(), ...)
  ids = jnp.zeros((BATCH, SEQ), jnp.int32)

  def loss(tr):
    m = nnx.merge(graphdef, tr, frozen)
    h, _ = m.model(ids)
    w = jnp.ones((BATCH, SEQ - 1), jnp.float32)
    nll, _ = m.cross_entropy(h[:, :-1], ids[:, 1:], w, chunk=CE_CHUNK)
    return nll

  return jax.value_and_grad(loss), trainable


def _traced_step_flops(cfg: LlamaConfig, targets) -> float:
  """Matmul FLOPs in the jaxpr of value_and_grad of the next-token loss w.r.t. LoRA params."""
  fn, trainable = _grad_fn(cfg, targets)
  flops, unknown_loops = jaxpr_matmul_flops(jax.make_jaxpr(fn)(trainable).jaxpr)
  assert unknown_loops == 0
  return flops


def _custom_vjp_dead_dx(cfg: LlamaConfig, targets) -> float:
  """LoRA's hand-written backward always forms dx = (dy B^T) A^T (a custom VJP returns every
  input's cotangent). Where that input depends on nothing trainable, which can only happen in
  the first layer that has LoRA (everything before it is frozen), autodiff still traces it and
  XLA drops it as dead code; the model count leaves it out. That layer's dead inputs, worked
  out by hand:"""
  lora = next(s for s in lora_targets_per_layer(cfg, targets) if s)
  d, f = cfg.hidden_size, cfg.intermediate_size
  hq = cfg.num_attention_heads * cfg.head_dim
  dead_inputs = [d for n in ("q_proj", "k_proj", "v_proj") if n in lora]
  attn_live = bool(dead_inputs)                      # a LoRA'd q/k/v makes attention live
  if "o_proj" in lora and not attn_live:
    dead_inputs.append(hq)
  residual_live = attn_live or "o_proj" in lora
  if not residual_live:
    dead_inputs += [d for n in ("gate_proj", "up_proj") if n in lora]
    if "down_proj" in lora and not ({"gate_proj", "up_proj"} & lora):
      dead_inputs.append(f)
  return sum(2 * BATCH * SEQ * RANK * i for i in dead_inputs)


CASES = {
  "mha_qkvo": (dict(num_attention_heads=4, num_key_value_heads=4), ("q_proj", "k_proj",
                                                                    "v_proj", "o_proj")),
  "gqa_all_seven": (dict(num_attention_heads=4, num_key_value_heads=2), ".*_proj"),
  "mqa_v_and_mlp": (dict(num_attention_heads=4, num_key_value_heads=1),
                    ("v_proj", "gate_proj", "down_proj")),
  # No LoRA before layer 0's o_proj: layer 0 needs no attention backward at all.
  "o_and_down_only": (dict(num_attention_heads=4, num_key_value_heads=2),
                      ("o_proj", "down_proj")),
  "down_only": (dict(num_attention_heads=4, num_key_value_heads=4), ("down_proj",)),
  # A path regex: LoRA only in layer 1, so layer 0 is entirely frozen (no backward at all).
  "layer1_q_v_regex": (dict(num_attention_heads=4, num_key_value_heads=2),
                       r"model\.layers\.1\.self_attn\.(q|v)_proj"),
  "q_only_head_dim": (dict(num_attention_heads=2, num_key_value_heads=2, head_dim=24),
                      ("q_proj",)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_lora_step_flops_equal_traced_matmuls(name):
  overrides, targets = CASES[name]
  # attention_chunk=0: attention over all keys, i.e. the T x T pairs the count assumes.
  cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=56, num_hidden_layers=3,
                    max_position_embeddings=64, attention_chunk=0, **overrides)
  want = lora_step_flops(cfg, batch=BATCH, seq=SEQ, rank=RANK, targets=targets)
  traced = _traced_step_flops(cfg, targets)
  assert traced == pytest.approx(want["total"] + _custom_vjp_dead_dx(cfg, targets), rel=1e-12)
  assert want["forward"] > 0 and want["backward"] > 0


def test_lora_step_flops_layer0_savings_and_bad_targets():
  cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=56, num_hidden_layers=2)
  qkvo = lora_step_flops(cfg, batch=1, seq=8, rank=2, targets=("q_proj", "k_proj", "v_proj",
                                                               "o_proj"))
  o_only = lora_step_flops(cfg, batch=1, seq=8, rank=2, targets=("o_proj",))
  # Forward work differs only by the q/k/v LoRA factors; o-only skips layer 0's attention
  # backward, so its backward is smaller by more than the factors' share.
  lora_qkv_fwd = 2 * cfg.num_hidden_layers * 8 * 2 * 3 * (32 + 32)
  assert qkvo["forward"] - o_only["forward"] == lora_qkv_fwd
  assert qkvo["backward"] - o_only["backward"] > 2 * lora_qkv_fwd
  with pytest.raises(ValueError, match="match no projection"):
    lora_step_flops(cfg, batch=1, seq=8, rank=2, targets=("qproj",))
  # Scanned layers share one path, as in apply_lora.
  scanned = cfg.replace(scan_layers=True)
  assert lora_targets_per_layer(scanned, r"model\.layers\.self_attn\.q_proj") == [{"q_proj"}] * 2
  with pytest.raises(ValueError, match="match no projection"):
    lora_targets_per_layer(cfg, r"model\.layers\.self_attn\.q_proj")


@pytest.mark.parametrize("scan", [False, True])
def test_train_loop_step_flops_count_every_layer(scan):
  """The training loop's per-device count of a jitted step (`loop.step_matmul_flops_per_device`)
  counts every layer of a scanned stack (XLA's cost_analysis() counts a scanned body once).
  A scan runs one body for every layer, so layer 0 does the input-gradient work of the others:
  its count is the model count with a live input."""
  from emo_jax.train.loop import step_matmul_flops_per_device
  targets = ("q_proj", "v_proj", "up_proj")
  cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=56, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    attention_chunk=0, scan_layers=scan)
  fn, trainable = _grad_fn(cfg, targets)
  # compiler_options as the library's jit_train_step sets them (allowed on a top-level jit).
  jitted = jax.jit(fn, compiler_options=train_compiler_options())
  per_device = step_matmul_flops_per_device(jitted.trace(trainable))
  want = lora_step_flops(cfg, batch=BATCH, seq=SEQ, rank=RANK, targets=targets,
                         input_live=scan)["total"]
  dead = 0.0 if scan else _custom_vjp_dead_dx(cfg, targets)
  assert per_device * jax.device_count() == pytest.approx(want + dead, rel=1e-12)


def test_peak_flops_table_prefers_the_specific_kind():
  from emo_jax.train.loop import peak_flops_of_kind
  assert peak_flops_of_kind("NVIDIA H100 PCIe") == 756e12
  assert peak_flops_of_kind("NVIDIA H100 80GB HBM3") == 989e12
  assert peak_flops_of_kind("TPU v5 lite") == 197e12
  assert peak_flops_of_kind("cpu") == 0.0
