"""Import FaceXFormer (and plain Swin) weights from PyTorch state dicts into the NNX modules.

Sources (facts): the released FaceXFormer file `ckpts/model.pt` is a pickled dict whose
`state_dict_backbone` holds the whole model: torchvision `swin_b` minus its head under
`backbone.0.*` (features) / `backbone.1.*` (final norm), the neck `linear_c.{i}.proj`,
`linear_fuse` (1x1 conv, no bias), the buffer `pe_layer.positional_encoding_gaussian_matrix`
and the decoder `face_decoder.*`. Torchvision also saves each block's
`attn.relative_position_index` buffer; we check it against our own and drop it.

Loading a pickle runs arbitrary code, so `.pt/.pth` files need `allow_pickle=True`; a
safetensors copy of the same state dict (same key names) loads without it.

The mapping is one rename table (`_TORCHVISION_SWIN_RULES`, the FaceXFormer prefix rules) plus
layout transposes chosen by the target variable: `kernel` of a Linear <- weight.T, of a Conv
<- weight.transpose(2, 3, 1, 0), of the 1x1 `linear_fuse` <- weight[:, :, 0, 0].T,
`{task}_token` <- embedding weight; everything else is copied.
HF `transformers.SwinModel` names (current `q_proj/k_proj/v_proj/o_proj` and legacy
`attention.self.query/...`) are first renamed to torchvision's layout by `hf_swin_to_torchvision`.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.models import facexformer as fx
from emo_jax.models import swin as swin_lib

# torchvision swin key (without prefix) -> our path inside SwinTransformer.
_TORCHVISION_SWIN_RULES: tuple[tuple[str, Any], ...] = (
    (r"^features\.0\.0\.(weight|bias)$", lambda m: f"patch_embed.proj.{m[1]}"),
    (r"^features\.0\.2\.(weight|bias)$", lambda m: f"patch_embed.norm.{m[1]}"),
    (r"^features\.(\d+)\.(\d+)\.mlp\.0\.(weight|bias)$",
     lambda m: f"stages.{_stage(m[1])}.blocks.{m[2]}.mlp.fc1.{m[3]}"),
    (r"^features\.(\d+)\.(\d+)\.mlp\.3\.(weight|bias)$",
     lambda m: f"stages.{_stage(m[1])}.blocks.{m[2]}.mlp.fc2.{m[3]}"),
    (r"^features\.(\d+)\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj)\.(weight|bias)$",
     lambda m: f"stages.{_stage(m[1])}.blocks.{m[2]}.{m[3]}.{m[4]}"),
    (r"^features\.(\d+)\.(\d+)\.attn\.(relative_position_bias_table|relative_position_index)$",
     lambda m: f"stages.{_stage(m[1])}.blocks.{m[2]}.attn.{m[3]}"),
    (r"^features\.(\d+)\.(reduction|norm)\.(weight|bias)$",
     lambda m: f"stages.{_merge_stage(m[1])}.downsample.{m[2]}.{m[3]}"),
    (r"^norm\.(weight|bias)$", lambda m: f"norm.{m[1]}"),
)


def _stage(feature_index: str) -> int:
  i = int(feature_index)
  if i % 2 != 1:
    raise KeyError(f"features.{i} is not a block stack (odd index expected)")
  return (i - 1) // 2


def _merge_stage(feature_index: str) -> int:
  i = int(feature_index)
  if i == 0 or i % 2:
    raise KeyError(f"features.{i} is not a patch-merging layer (even index > 0 expected)")
  return i // 2 - 1


def torchvision_swin_key(name: str) -> str:
  """torchvision `swin_*` key (e.g. `features.3.1.attn.qkv.weight`) -> our dotted path."""
  for pattern, fn in _TORCHVISION_SWIN_RULES:
    m = re.match(pattern, name)
    if m:
      return fn(m)
  raise KeyError(f"unknown torchvision Swin key {name!r}")


def facexformer_key(name: str) -> str:
  """FaceXFormer checkpoint key -> our dotted path inside `FaceXFormer`."""
  if name.startswith("backbone.0."):
    return "backbone." + torchvision_swin_key("features." + name[len("backbone.0."):])
  if name.startswith("backbone.1."):
    return "backbone." + torchvision_swin_key("norm." + name[len("backbone.1."):])
  m = re.match(r"^face_decoder\.(\w+_token|mask_tokens)\.weight$", name)
  if m:
    return f"face_decoder.{m[1]}"
  m = re.match(r"^face_decoder\.output_upscaling\.(\d)\.(weight|bias)$", name)
  if m:
    sub = {"0": "deconv1", "1": "norm", "3": "deconv2"}.get(m[1])
    if sub is None:
      raise KeyError(f"unknown FaceXFormer key {name!r}")
    return f"face_decoder.output_upscaling.{sub}.{m[2]}"
  if re.match(r"^(linear_c\.\d+\.proj|linear_fuse|pe_layer|face_decoder)\.", name):
    return name
  raise KeyError(f"unknown FaceXFormer key {name!r}")


def hf_swin_to_torchvision(state: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """Rename an HF `SwinModel` state dict (current or legacy names) to torchvision `swin_*` keys.

  q/k/v projections are concatenated into torchvision's fused `qkv` (rows q | k | v).
  """
  out: dict[str, np.ndarray] = {}
  qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  block_rules = (
      (r"attention\.(?:o_proj|output\.dense)\.(weight|bias)", "attn.proj.{}"),
      (r"attention\.(?:relative_position_bias|self)\.relative_position_bias_table",
       "attn.relative_position_bias_table"),
      (r"layernorm_before\.(weight|bias)", "norm1.{}"),
      (r"layernorm_after\.(weight|bias)", "norm2.{}"),
      (r"(?:mlp\.fc1|intermediate\.dense)\.(weight|bias)", "mlp.0.{}"),
      (r"(?:mlp\.fc2|output\.dense)\.(weight|bias)", "mlp.3.{}"),
  )
  for key, value in state.items():
    if not key.startswith(prefix):
      continue
    k = key[len(prefix):]
    value = _to_numpy(value)
    if k.startswith("embeddings.patch_embeddings.projection."):
      out["features.0.0." + k.rsplit(".", 1)[1]] = value
    elif k.startswith("embeddings.norm."):
      out["features.0.2." + k.rsplit(".", 1)[1]] = value
    elif k.startswith("layernorm."):
      out["norm." + k.rsplit(".", 1)[1]] = value
    elif k.endswith("relative_position_index"):
      continue  # recomputed from the window size
    elif m := re.match(r"^encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)$", k):
      out[f"features.{2 * int(m[1]) + 2}.{m[2]}.{m[3]}"] = value
    elif m := re.match(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$", k):
      base = f"features.{2 * int(m[1]) + 1}.{m[2]}."
      rest = m[3]
      if mq := re.match(r"^attention\.(?:(q|k|v)_proj|self\.(query|key|value))\.(weight|bias)$", rest):
        part = (mq[1] or mq[2])[0]
        qkv.setdefault((base, mq[3]), {})[part] = value
        continue
      for pattern, target in block_rules:
        mr = re.match("^" + pattern + "$", rest)
        if mr:
          out[base + target.format(*mr.groups())] = value
          break
      else:
        raise KeyError(f"unknown HF Swin key {key!r}")
    elif k.startswith("pooler"):
      continue
    else:
      raise KeyError(f"unsupported HF Swin key {key!r} (absolute position embeddings / mask "
                     "tokens are not part of torchvision's Swin)")
  for (base, kind), parts in qkv.items():
    if set(parts) != {"q", "k", "v"}:
      raise KeyError(f"incomplete q/k/v {kind} for {base}: have {sorted(parts)}")
    out[base + "attn.qkv." + kind] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
  return out


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch tensor
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _variables(model: nnx.Module) -> dict[str, tuple[nnx.Variable, Any]]:
  """Dotted path -> (variable, owning module) for every Variable of the model."""
  parents: dict[tuple, Any] = {}
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      parents[tuple(path)] = node
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      out[".".join(str(p) for p in path)] = (node, parents.get(tuple(path[:-1])))
  return out


def _layout(value: np.ndarray, parent: Any, torch_name: str) -> np.ndarray:
  """Torch layout -> ours, decided by the owning module (never by a shape coincidence)."""
  if not torch_name.endswith("weight"):
    return value
  if isinstance(parent, nnx.Conv):  # torch [O, I, kh, kw] -> [kh, kw, I, O]
    return value.transpose(2, 3, 1, 0)
  if isinstance(parent, nnx.Linear):
    if value.ndim == 4:  # a 1x1 conv used as a Linear (linear_fuse)
      if value.shape[2:] != (1, 1):
        raise ValueError(f"{torch_name}: expected a 1x1 conv, got {value.shape}")
      value = value[:, :, 0, 0]
    return value.T
  return value  # norms, embeddings, bias tables, ConvTranspose (kept in torch layout)


def load_torch_state_into(model: nnx.Module, state: Mapping[str, Any], key_fn, *,
                          strict: bool = True, ignore: tuple[str, ...] = ()) -> list[str]:
  """Copy a torch-named state dict into `model` in place via `key_fn(torch_name) -> our path`.

  Every model variable must be filled (else KeyError listing what is missing). Torch keys that
  map to nothing in the model raise when `strict`, except those matching a regex in `ignore`,
  which are returned (so callers can report what was deliberately left out).
  Returns the list of ignored torch keys.
  """
  variables = _variables(model)
  filled, ignored, unknown = set(), [], []
  for name, value in state.items():
    value = _to_numpy(value)
    try:
      path = key_fn(name)
    except KeyError:
      path = None
    if path is not None and path.endswith(".weight") and path not in variables:
      alt = path[: -len("weight")] + "kernel"
      path = alt if alt in variables else path
    if path is not None and path.endswith("relative_position_index"):
      window = int(round(value.size ** 0.25))
      want = swin_lib.relative_position_index(window)
      if value.size != want.size or not np.array_equal(value.reshape(want.shape), want):
        raise ValueError(f"{name}: relative_position_index differs from Swin's definition")
      continue
    if path is None or path not in variables:
      if any(re.search(p, name) for p in ignore):
        ignored.append(name)
        continue
      unknown.append(name)
      continue
    var, parent = variables[path]
    arr = _layout(value, parent, name)
    if tuple(arr.shape) != tuple(var.shape):
      raise ValueError(f"{name} -> {path}: shape {arr.shape} does not fit {var.shape}")
    var.set_value(jnp.asarray(arr, dtype=var.dtype))
    filled.add(path)
  if unknown and strict:
    raise KeyError(f"{len(unknown)} checkpoint keys have no place in the model: {unknown[:10]}")
  missing = sorted(set(variables) - filled)
  if missing:
    raise KeyError(f"{len(missing)} model variables not in the checkpoint: {missing[:10]}")
  return ignored


def load_swin_from_torchvision(model: swin_lib.SwinTransformer, state: Mapping[str, Any], *,
                               prefix: str = "") -> None:
  """Fill a SwinTransformer from a torchvision `swin_*` state dict (`head.*` is ignored)."""
  sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  load_torch_state_into(model, sub, torchvision_swin_key, ignore=(r"^head\.",))


def load_swin_from_hf(model: swin_lib.SwinTransformer, state: Mapping[str, Any], *,
                      prefix: str = "") -> None:
  """Fill a SwinTransformer from an HF `SwinModel` state dict (e.g. `model.state_dict()`)."""
  load_torch_state_into(model, hf_swin_to_torchvision(state, prefix), torchvision_swin_key)


# The segmentation head (face parsing) is optional in our FaceXFormer: its keys are expected in
# the checkpoint and skipped (reported) when the model is built without it.
SEGMENTATION_KEYS = (r"^face_decoder\.output_upscaling\.", r"^face_decoder\.output_hypernetwork_mlps\.")


def read_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Read FaceXFormer weights: a safetensors state dict, or the released pickle (opt-in).

  A pickle may be the full training checkpoint (`state_dict_backbone` is taken) or a bare state
  dict; a DDP `module.` prefix is stripped.
  """
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      state = dict(load_file(path))
    except Exception:  # bf16 tensors are not representable in numpy: go through torch
      from safetensors.torch import load_file as load_torch
      state = {k: _to_numpy(v) for k, v in load_torch(path).items()}
  elif path.endswith((".pt", ".pth", ".bin", ".ckpt")):
    if not allow_pickle:
      raise ValueError(f"{path} is a pickled torch file; loading it can run arbitrary code. Pass "
                       "allow_pickle=True if you trust it, or convert it to .safetensors.")
    import torch
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "state_dict_backbone" in obj:
      obj = obj["state_dict_backbone"]
    elif isinstance(obj, dict) and "state_dict" in obj:
      obj = obj["state_dict"]
    if not isinstance(obj, dict):
      raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    state = {k: _to_numpy(v) for k, v in obj.items()}
  else:
    raise ValueError(f"{path}: unknown checkpoint format (want .safetensors or .pt/.pth)")
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def load_facexformer_state(model, state: Mapping[str, Any], *, strict: bool = True) -> list[str]:
  """Fill a `FaceXFormer` from its torch state dict; returns the checkpoint keys it skipped."""
  ignore = () if getattr(model.face_decoder, "output_upscaling", None) is not None \
      else SEGMENTATION_KEYS
  return load_torch_state_into(model, state, facexformer_key, strict=strict, ignore=ignore)


def load_into(model, path: str | os.PathLike, *, allow_pickle: bool = False) -> list[str]:
  """Fill an existing `FaceXFormer` in place from a checkpoint file; returns skipped keys."""
  return load_facexformer_state(model, read_checkpoint(path, allow_pickle=allow_pickle))


def load_facexformer(path: str | os.PathLike, config=None, *, allow_pickle: bool = False):
  """Build a `FaceXFormer(config)` (no random init: shape-only, then filled) from `path`."""
  model = fx.abstract_model(config or fx.FaceXFormerConfig())
  load_into(model, path, allow_pickle=allow_pickle)
  return model
