"""The batch contract shared by the data side and the model side.

Everything both sides must agree on lives here once: the visual placeholder id, the pixel
statistics the model normalises uint8 pixels with, the age/gender/race label tables with
the AGR sentence built from them, and the batch keys the model reads. The model package
imports these names from here; this module imports numpy only, so grain workers that read
it load no flax. The batch itself is described in docs/INTERFACES.md.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# The `<image>` placeholder in text, and the id its visual slots carry in `input_ids`
# (LLaVA's IMAGE_TOKEN_INDEX): a negative id that no tokenizer produces.
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = -200

# CLIP / EVA-CLIP image processor statistics (the ViT's input, as in LLaMA-VID).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet statistics (FaceXFormer and most face-analysis networks).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Age / gender / race label tables: the order of the face prior's AGR logits
# (FaceXFormer's heads; docs/CHECKPOINTS.md).
AGE_BINS: tuple[str, ...] = ("0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")
GENDERS: tuple[str, ...] = ("male", "female")
RACES: tuple[str, ...] = ("white", "black", "indian", "asian", "others")

# The AGR sentence placed in the first user turn. EMO-LLaMA does not publish its wording;
# this template is ours (fields: {media} {age} {gender} {race}).
AGR_TEMPLATE = ("The person in the {media} appears to be a {gender} aged {age}, "
                "of {race} appearance.")

# The batch keys the model reads; anything else in a batch (labels, ids) stays on the host.
MODEL_KEYS = ("frames", "frame_mask", "face_crops", "face_global", "face_local", "qformer_ids",
              "qformer_mask", "input_ids", "attention_mask", "loss_mask")


def agr_sentence(age_idx: int, gender_idx: int, race_idx: int, template: str = AGR_TEMPLATE,
                 media: str = "image") -> str:
  """Fill the AGR template with the label names of the given table indices."""
  for name, idx, table in (("age", age_idx, AGE_BINS), ("gender", gender_idx, GENDERS),
                           ("race", race_idx, RACES)):
    if not 0 <= int(idx) < len(table):
      raise ValueError(f"{name} index {idx} out of range [0, {len(table)})")
  return template.format(media=media, age=AGE_BINS[int(age_idx)],
                         gender=GENDERS[int(gender_idx)], race=RACES[int(race_idx)])


def agr_indices(age_logits, gender_logits, race_logits, frame_mask=None) -> np.ndarray:
  """Argmax AGR labels per sample from per-frame logits [B, F, n] (or [B, n]).

  With frames, the logits are averaged over the real frames (`frame_mask` [B, F]; our
  choice) before the argmax. Returns int [B, 3] = (age, gender, race).
  """
  out = []
  for logits in (age_logits, gender_logits, race_logits):
    logits = np.asarray(logits, np.float32)
    if logits.ndim == 3:
      mask = (np.ones(logits.shape[:2], bool) if frame_mask is None
              else np.asarray(frame_mask, bool))
      if not mask.any(axis=1).all():
        raise ValueError("every sample needs at least one real frame for its AGR prediction")
      logits = (logits * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    out.append(logits.argmax(-1))
  return np.stack(out, axis=-1)


def agr_labels(age_logits, gender_logits, race_logits) -> dict[str, str]:
  """Age / gender / race label names of one sample from its per-frame logits [F, n]."""
  a, g, r = agr_indices(np.asarray(age_logits)[None], np.asarray(gender_logits)[None],
                        np.asarray(race_logits)[None])[0]
  return {"age": AGE_BINS[int(a)], "gender": GENDERS[int(g)], "race": RACES[int(r)]}


def agr_sentences_from_indices(idx: np.ndarray, template: str = AGR_TEMPLATE,
                               media: str | Sequence[str] = "image") -> list[str]:
  """One AGR sentence per row of `idx` [B, 3] (see agr_indices)."""
  medias = [media] * len(idx) if isinstance(media, str) else list(media)
  if len(medias) != len(idx):
    raise ValueError(f"{len(medias)} media names for {len(idx)} samples")
  return [agr_sentence(a, g, r, template, m) for (a, g, r), m in zip(idx, medias)]
