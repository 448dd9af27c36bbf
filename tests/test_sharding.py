"""Sharding over a (2, 2, 2) ('data', 'fsdp', 'tensor') mesh of 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from emo_jax import sharding as shd
from emo_jax.convert import hf
from emo_jax.models.lora import apply_lora, lora_modules, trainable_filter
from llama_testutil import make_hf, make_lora_train_step


def test_logical_to_spec_rules():
  mesh = shd.make_mesh((2, 2, 2))
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (2, 2, 2)
  rules = shd.RULES_FSDP_TP
  assert shd.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
  # batch takes data+fsdp, so an activation's embed dim stays replicated.
  assert shd.logical_to_spec(("batch", "length", "embed"), rules) == P(("data", "fsdp"), None,
                                                                       None)
  assert shd.logical_to_spec(("layers", "embed", "heads"), rules) == P(None, "fsdp", "tensor")
  # A dim the mesh axis does not divide stays replicated.
  assert shd.logical_to_spec(("vocab", "embed"), rules, (33, 8), mesh) == P(None, "fsdp")
  assert shd.logical_to_spec(("embed", "mlp"), shd.RULES_DP) == P(None, None)
  x = jnp.ones((4, 2))
  assert shd.constrain(x, ("batch", "embed")) is x  # no active mesh: no-op
  with pytest.raises(ValueError, match="needs 16 devices"):
    shd.make_mesh((4, 2, 2))
  assert shd.make_mesh((2, -1, 1)).devices.shape == (2, 4, 1)


def test_init_sharded_creates_weights_in_place():
  from emo_jax.models.llama import LlamaConfig, LlamaForCausalLM
  mesh = shd.make_mesh((2, 2, 2))
  cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, scan_layers=True)
  model = shd.init_sharded(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh,
                           shd.RULES_FSDP_TP)
  k = model.model.layers.mlp.up_proj.kernel[...]
  assert k.shape == (2, 16, 32) and k.sharding.spec == P(None, "fsdp", "tensor")
  # Same random weights as an unsharded init (eager and jitted RNG differ in the last ulp).
  ref = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)).model.layers.mlp.up_proj.kernel[...]
  np.testing.assert_allclose(np.asarray(k), np.asarray(ref), atol=1e-6, rtol=0)


def _batch(rng):
  ids = rng.randint(3, 96, (4, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  loss_mask = np.zeros_like(ids)
  loss_mask[:, 6:] = 1
  return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def test_sharded_forward_and_train_step_match_single_device(tmp_path):
  make_hf(tmp_path, hidden_size=32, num_key_value_heads=2, intermediate_size=64)
  mesh = shd.make_mesh((2, 2, 2))
  rules = shd.RULES_FSDP_TP
  single = hf.load_llama(tmp_path)
  sharded = hf.load_llama(tmp_path, mesh=mesh, rules=rules)
  for model in (single, sharded):
    apply_lora(model, rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
               rngs=nnx.Rngs(5))
    key = jax.random.key(1)
    for _, m in lora_modules(model):
      key, sub = jax.random.split(key)
      m.lora_b.set_value(0.05 * jax.random.normal(sub, m.lora_b[...].shape))

  # Every weight matrix of the sharded model really is split across devices.
  state = nnx.state(sharded, nnx.Param)
  specs = shd.state_shardings(state, mesh, rules)
  state = jax.tree.map(lambda v, s: jax.device_put(v, s), state, specs)
  nnx.update(sharded, state)
  for p, v in state.flat_state():
    arr = v.get_value()
    if arr.ndim >= 2:
      assert arr.addressable_shards[0].data.size < arr.size, (p, arr.sharding)
  q = sharded.model.layers[0].self_attn.q_proj.kernel[...]
  assert q.sharding.spec == P("fsdp", "tensor")

  batch = _batch(np.random.RandomState(0))
  batch_sh = NamedSharding(mesh, P(("data", "fsdp")))
  sbatch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}

  def fwd(m, b):
    return m(b["input_ids"], attention_mask=b["attention_mask"])
  want = np.asarray(jax.jit(fwd)(single, batch))
  with shd.use_mesh_rules(mesh, rules):
    got = jax.jit(fwd)(sharded, sbatch)
  assert got.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)

  tx = optax.adamw(1e-2)
  results = []
  for model, b, ctx in ((single, batch, None), (sharded, sbatch, (mesh, rules))):
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(), ...)
    opt_state = tx.init(trainable)
    step = jax.jit(make_lora_train_step(graphdef, tx), donate_argnums=(0, 2))
    if ctx:
      with shd.use_mesh_rules(*ctx):
        new_tr, _, loss = step(trainable, frozen, opt_state, b)
      leaf = jax.tree.leaves(new_tr)[0]
      assert leaf.sharding.spec != P() or leaf.ndim < 2
    else:
      new_tr, _, loss = step(trainable, frozen, opt_state, b)
    results.append((float(loss), jax.tree.map(np.asarray, new_tr)))
  (l1, t1), (l2, t2) = results
  assert abs(l1 - l2) < 1e-5
  for a, b in zip(jax.tree.leaves(t1), jax.tree.leaves(t2)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_to_global_batch_shards_over_data_axes():
  from jax.sharding import Mesh

  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  batch = {"input_ids": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
           "frames": np.random.default_rng(0).normal(size=(8, 2, 4, 4, 3)).astype(np.float32)}
  out = shd.to_global_batch(batch, mesh)
  for k, v in batch.items():
    assert out[k].shape == v.shape
    np.testing.assert_array_equal(np.asarray(out[k]), v)
    assert out[k].sharding.spec == P(("data", "fsdp"))
    # Each device holds a quarter of the batch (replicated over 'tensor').
    assert {s.data.shape[0] for s in out[k].addressable_shards} == {2}
  # uint8 pixels; a key aliasing another's array (face_crops = frames) is placed once.
  frames = np.random.default_rng(1).integers(0, 256, (8, 2, 4, 4, 3), dtype=np.uint8)
  out = shd.to_global_batch({"frames": frames, "face_crops": frames,
                           "other": frames.copy()}, mesh)
  assert out["face_crops"] is out["frames"] and out["other"] is not out["frames"]
  assert out["frames"].dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(out["other"]), frames)
