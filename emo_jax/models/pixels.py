"""Pixel normalisation inside the model (the batch carries raw uint8 pixels).

The input pipeline ships `frames` and `face_crops` as uint8 images that are already in
their encoder's geometry (pad / crop / resize done on the host) but not normalised: 4x
fewer bytes to build, batch, copy between processes and transfer to the device, and the
per-pixel affine runs fused into the jitted model on the accelerator instead of on the
data-loading CPU.

Contract (docs/INTERFACES.md "The batch"): a **uint8** array is raw RGB pixels and is
normalised here, `(x / 255 - mean) / std` per channel; a **floating** array is taken as
already normalised and passed through unchanged (tests and callers that normalise on the
host keep working). Other dtypes are an error.

The statistics come from the batch contract (`input_pipeline.contract`), which the host
side uses too.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline.contract import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD


def _affine(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset) float32 [3] with (x / 255 - mean) / std == x * scale + offset."""
  mean = np.asarray(mean, np.float64)
  std = np.asarray(std, np.float64)
  return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def normalize_pixels(x, mean: Sequence[float], std: Sequence[float], dtype=jnp.float32
                     ) -> jax.Array:
  """uint8 RGB [..., 3] -> `(x / 255 - mean) / std` computed in float32, cast to `dtype`.

  Written as one multiply-add per element with float32 constants (the same arithmetic as
  the host-side `input_pipeline.media.normalize`). Floating input is returned unchanged:
  it is already normalised (see the module docstring); its dtype is left to the consumer.
  """
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x
  if x.dtype != jnp.uint8:
    raise TypeError(f"pixels must be uint8 (raw) or floating (normalised), got {x.dtype}")
  if x.shape[-1] != len(mean):
    raise ValueError(f"pixels have {x.shape[-1]} channels, statistics have {len(mean)}")
  scale, offset = _affine(mean, std)
  return (x.astype(jnp.float32) * scale + offset).astype(dtype)


def normalize_vit(frames, dtype=jnp.float32) -> jax.Array:
  """ViT input: CLIP mean / std (EVA-CLIP shares them)."""
  return normalize_pixels(frames, CLIP_MEAN, CLIP_STD, dtype)


def normalize_face(crops, dtype=jnp.float32) -> jax.Array:
  """Face-network input: ImageNet mean / std (FaceXFormer, the tiny test prior)."""
  return normalize_pixels(crops, IMAGENET_MEAN, IMAGENET_STD, dtype)
