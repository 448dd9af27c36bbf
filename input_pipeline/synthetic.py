"""Procedural expressive faces: the embedded default data (our construction, not a paper's).

`generate(root, num_images, num_clips, seed)` writes, under one root:

- stills in the RAF-DB basic layout: `Image/aligned/{train_00001,test_0001}_aligned.jpg`
  and `EmoLabel/list_patition_label.txt` (`train_00001.jpg 4`, 1-based RAF-DB ids);
- onset-to-apex clips as real mp4 files in the DFEW layout: `Clip/original/00001.mp4` and
  `EmoLabel_DataSplit/{train,test}(single-labeled)/set_{1..5}.csv` (`video_name,label`,
  DFEW ids 1..7), 5 folds;
- FERID-style instruction JSON `ferid_train.json`, `ferid_test.json` (category questions
  with shuffled options, and a two-turn conversation per some items) referencing them;
- with `num_au_subjects > 0`, facial action-unit sequences in the BP4D layout (read by the
  'synthetic_au' reader = the BP4D reader): `AUCoding/AU_OCC/{S}_{T}.csv` (column '0' the
  frame, column 'k' AU k, 9 for AUs the faces cannot show) and `img/{S}/{T}/{frame}.jpg`.
  Subjects take real BP4D ids spread over the three fold parts, so the standard
  subject-exclusive folds apply; each subject keeps one identity (skin, face shape) over
  its tasks. A task blends one or two expressions with a random gain per face parameter
  and ramps from neutral to that apex; each frame's AU labels follow from the parameters
  it is drawn with (`au_labels`: raised inner brow ends -> AU1, raised outer ends -> AU2,
  brows pulled together or lowered -> AU4, wide eyes -> AU5, smile folds -> AU6,
  narrowed / squinted eyes -> AU7, nose wrinkles -> AU9, raised upper lip -> AU10,
  corners up -> AU12, corners down -> AU15, a wide flat mouth -> AU20, a narrow closed
  mouth -> AU24, parted lips -> AU25, a dropped jaw -> AU26); plus FERID-style AU questions
  `au_instructions_{train,test}.json` (fold 1's subject split): "Which facial action units
  are active in the image?" per frame and, at each task's apex, "Why does this person look
  <emotion>?" answered with the active AUs (not read by the default's tokenizer corpus,
  which takes `ferid_*.json` only).

The 7 RAF-DB expressions are cartoons drawn from a small parametric face: brows (height,
inner/outer tilt, arch, gap), eyes (openness, squint lids), mouth (width, corner lift,
opening, teeth, O shape, raised upper lip) and nose wrinkles; each sample draws an
intensity (0.8-1 of a bold, 1.3x exaggerated apex; clips ramp from neutral to it), head pose (rotation, shift,
scale), face shape, skin, hair and iris colours, background and sensor noise, so classes
are separable by a small model without being identical images.

Deterministic: each item has its own `numpy` generator seeded by (seed, kind, index), JPEG
bytes are identical for a seed, and the clips decode to identical frames (libx264, one
thread, fixed options).
The AU sequences use generators of their own kinds, so the stills and clips are the same
bytes with or without them.
"""
from __future__ import annotations

import io
import json
import os
import time
from typing import Sequence

import av
import cv2
import numpy as np
from PIL import Image

from input_pipeline import labels as labels_lib

CLASSES = labels_lib.classes("synthetic")  # RAF-DB order: surprise ... neutral

# Apex parameters per expression; a sample uses neutral + intensity * (apex - neutral).
# brow_raise: up (+) / down (-) of both brows; brow_inner: extra lift of the inner ends;
# brow_arch: bump in the middle; brow_gap: inner ends pulled together (+);
# eye_open: lid opening (1 = neutral); eye_squint: lower lid raised;
# mouth_w: half width; mouth_curve: corner lift (+ smile, - frown); mouth_open: opening
# height; mouth_o: round 'O' (1) vs. wide opening (0); teeth: show teeth;
# upper_lip: raised upper lip (snarl); wrinkle: nose wrinkle lines; cheek: smile folds.
_NEUTRAL = dict(brow_raise=0.0, brow_inner=0.0, brow_arch=0.012, brow_gap=0.0, eye_open=1.0,
                eye_squint=0.0, mouth_w=0.11, mouth_curve=0.0, mouth_open=0.0, mouth_o=0.0,
                teeth=0.0, upper_lip=0.0, wrinkle=0.0, cheek=0.0)
_APEX = {
    "surprise": dict(brow_raise=0.075, brow_arch=0.04, eye_open=1.9, mouth_w=0.055,
                     mouth_open=0.11, mouth_o=1.0),
    "fear": dict(brow_raise=0.05, brow_inner=0.03, brow_arch=-0.004, brow_gap=0.02,
                 eye_open=1.8, mouth_w=0.15, mouth_curve=-0.025, mouth_open=0.08, teeth=1.0),
    "disgust": dict(brow_raise=-0.025, brow_inner=-0.015, brow_gap=0.012, eye_open=0.55,
                    eye_squint=0.5, mouth_w=0.10, mouth_curve=-0.035, upper_lip=1.0,
                    wrinkle=1.0),
    "happiness": dict(brow_raise=0.012, eye_open=0.65, eye_squint=0.7, mouth_w=0.14,
                      mouth_curve=0.075, mouth_open=0.05, teeth=1.0, cheek=1.0),
    "sadness": dict(brow_raise=0.0, brow_inner=0.055, brow_arch=-0.01, brow_gap=0.01,
                    eye_open=0.75, mouth_w=0.10, mouth_curve=-0.06),
    "anger": dict(brow_raise=-0.04, brow_inner=-0.045, brow_arch=0.0, brow_gap=0.03,
                  eye_open=0.7, mouth_w=0.075, mouth_curve=-0.01),
    "neutral": dict(),
}

_SKIN = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 132], [198, 134, 96],
                  [161, 102, 70], [112, 72, 50], [80, 52, 38]], np.float64)
_HAIR = np.array([[30, 22, 18], [70, 45, 25], [120, 80, 40], [200, 170, 110], [140, 140, 140],
                  [90, 30, 20]], np.float64)
_IRIS = np.array([[60, 40, 25], [40, 90, 140], [60, 110, 60], [100, 70, 40]], np.float64)

_SHIFT = 4  # cv2 fixed-point bits
_ONE = 1 << _SHIFT


# Exaggeration of every expression's displacement from neutral: cartoon-bold features keep the
# classes learnable by a tiny model at 48-64 px while pose, skin and background still vary.
_GAIN = 1.3


def expression_params(label: str, intensity: float) -> dict[str, float]:
  """Face parameters of `label` at `intensity` (0 = neutral face, 1 = apex)."""
  apex = {**_NEUTRAL, **_APEX[label]}
  gain = _GAIN * intensity
  return {k: _NEUTRAL[k] + gain * (apex[k] - _NEUTRAL[k]) for k in _NEUTRAL}


# AU occurrence from the drawing parameters (our rules: each AU is a visible change of the
# cartoon; thresholds sit well inside the range the parameter spans when drawn).
AU_RULES: dict[int, tuple[str, object]] = {
    1: ("inner brow ends raised", lambda p: p["brow_raise"] + p["brow_inner"] > 0.02),
    2: ("outer brow ends raised", lambda p: p["brow_raise"] > 0.02),
    4: ("brows pulled together or lowered",
        lambda p: p["brow_gap"] > 0.008 or p["brow_raise"] + p["brow_inner"] < -0.02),
    5: ("eyes wide open", lambda p: p["eye_open"] > 1.3),
    6: ("smile folds on the cheeks", lambda p: p["cheek"] > 0.3),
    7: ("eyes narrowed or lower lids raised",
        lambda p: p["eye_squint"] > 0.2 or p["eye_open"] < 0.8),
    9: ("nose wrinkled", lambda p: p["wrinkle"] > 0.3),
    10: ("upper lip raised", lambda p: p["upper_lip"] > 0.3),
    12: ("mouth corners pulled up", lambda p: p["mouth_curve"] > 0.02),
    15: ("mouth corners pulled down", lambda p: p["mouth_curve"] < -0.02),
    20: ("lips stretched wide", lambda p: p["mouth_w"] > 0.13 and p["mouth_curve"] < 0.02),
    24: ("lips pressed into a narrow closed mouth",
         lambda p: p["mouth_w"] < 0.09 and p["mouth_open"] <= 0.008 and p["upper_lip"] <= 0.05),
    25: ("lips parted", lambda p: p["mouth_open"] > 0.008 or p["upper_lip"] > 0.05),
    26: ("jaw dropped", lambda p: p["mouth_open"] > 0.07),
}
AUS = tuple(AU_RULES)


def au_labels(params: dict[str, float]) -> dict[int, int]:
  """{AU: 0/1} of a face drawn with `params` (expression_params / blend_params output)."""
  return {au: int(bool(rule(params))) for au, (_, rule) in AU_RULES.items()}


def blend_params(weights: dict[str, float], gains: dict[str, float] | None = None
                 ) -> dict[str, float]:
  """Face parameters of a blend: neutral + sum_label w * (apex - neutral), each parameter's
  displacement times `gains[k]` (default 1), with the same exaggeration as the stills."""
  out = {}
  for k, n in _NEUTRAL.items():
    d = sum(w * ({**_NEUTRAL, **_APEX[lab]}[k] - n) for lab, w in weights.items())
    out[k] = n + _GAIN * d * (1.0 if gains is None else gains.get(k, 1.0))
  return out


class _Style:
  """Per-sample identity and pose draws (fixed over a clip)."""

  def __init__(self, rng: np.random.Generator):
    t = rng.uniform(0, len(_SKIN) - 1)
    i = int(t)
    self.skin = _SKIN[i] + (t - i) * (_SKIN[min(i + 1, len(_SKIN) - 1)] - _SKIN[i])
    self.hair = _HAIR[rng.integers(len(_HAIR))] * rng.uniform(0.8, 1.2)
    self.iris = _IRIS[rng.integers(len(_IRIS))]
    self.face_w = rng.uniform(0.29, 0.35)
    self.face_h = rng.uniform(0.38, 0.44)
    self.eye_dx = rng.uniform(0.12, 0.15)
    self.eye_y = rng.uniform(0.43, 0.47)
    self.mouth_y = rng.uniform(0.71, 0.75)
    self.hair_h = rng.uniform(0.05, 0.16)
    self.angle = rng.uniform(-6, 6)
    self.scale = rng.uniform(0.95, 1.05)
    self.shift = rng.uniform(-0.03, 0.03, size=2)
    self.bg = rng.uniform(0, 255, size=(2, 3))
    self.blobs = [(rng.uniform(0, 1, 2), rng.uniform(0.1, 0.3), rng.uniform(0, 255, 3))
                  for _ in range(3)]
    self.noise = rng.uniform(0.0, 4.0)
    self.line = rng.uniform(5, 30)  # darkness of feature lines


def _p(x: float, y: float, s: int) -> tuple[int, int]:
  return int(round(x * s * _ONE)), int(round(y * s * _ONE))


def _r(v: float, s: int) -> int:
  return max(1, int(round(v * s * _ONE)))


def _curve(x0: float, x1: float, y: float, lift: float, bend: float, n: int = 9
           ) -> np.ndarray:
  """Points of a parabola from x0 to x1 at height y; ends raised by `lift` (screen up = -y)
  relative to the middle, middle pushed by `bend`."""
  xs = np.linspace(x0, x1, n)
  u = np.linspace(-1, 1, n)
  ys = y - lift * u ** 2 + bend * (1 - u ** 2)
  return np.stack([xs, ys], -1)


def _poly(pts: np.ndarray, s: int) -> np.ndarray:
  return np.round(pts * s * _ONE).astype(np.int32).reshape(-1, 1, 2)


def _draw_face(s: int, st: _Style, p: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
  """The face layer (RGB uint8) and its mask on an s x s canvas, frontal and centred."""
  img = np.zeros((s, s, 3), np.uint8)
  mask = np.zeros((s, s), np.uint8)
  aa = cv2.LINE_AA
  skin = tuple(float(c) for c in st.skin)
  line = tuple(float(c) for c in st.skin * 0.15 + st.line)
  cx, cy = 0.5, 0.53
  # Hair cap behind the top of the head, then the head.
  cv2.ellipse(img, _p(cx, cy - 0.03, s), (_r(st.face_w * 1.06, s), _r(st.face_h + st.hair_h * 0.5, s)),
              0, 180, 360, tuple(float(c) for c in st.hair), -1, aa, _SHIFT)
  cv2.ellipse(mask, _p(cx, cy - 0.03, s), (_r(st.face_w * 1.06, s), _r(st.face_h + st.hair_h * 0.5, s)),
              0, 180, 360, 255, -1, aa, _SHIFT)
  cv2.ellipse(img, _p(cx, cy, s), (_r(st.face_w, s), _r(st.face_h, s)), 0, 0, 360, skin, -1,
              aa, _SHIFT)
  cv2.ellipse(mask, _p(cx, cy, s), (_r(st.face_w, s), _r(st.face_h, s)), 0, 0, 360, 255, -1,
              aa, _SHIFT)
  # Ears.
  for side in (-1, 1):
    cv2.ellipse(img, _p(cx + side * st.face_w * 0.98, st.eye_y + 0.05, s),
                (_r(0.035, s), _r(0.06, s)), 0, 0, 360, skin, -1, aa, _SHIFT)
    cv2.ellipse(mask, _p(cx + side * st.face_w * 0.98, st.eye_y + 0.05, s),
                (_r(0.035, s), _r(0.06, s)), 0, 0, 360, 255, -1, aa, _SHIFT)
  th = max(1, round(s / 40))
  # Eyes: sclera, iris, lids.
  ew = 0.062
  eh = 0.028 * p["eye_open"]
  for side in (-1, 1):
    ex = cx + side * st.eye_dx
    ey = st.eye_y
    cv2.ellipse(img, _p(ex, ey, s), (_r(ew, s), _r(eh, s)), 0, 0, 360, (250, 250, 250), -1,
                aa, _SHIFT)
    ir = min(eh, 0.026)
    cv2.circle(img, _p(ex, ey, s), _r(ir, s), tuple(float(c) for c in st.iris), -1, aa, _SHIFT)
    cv2.circle(img, _p(ex, ey, s), _r(ir * 0.45, s), (10, 10, 10), -1, aa, _SHIFT)
    cv2.ellipse(img, _p(ex, ey, s), (_r(ew, s), _r(eh, s)), 0, 0, 360, line, th, aa, _SHIFT)
    if p["eye_squint"] > 0.05:  # raised lower lid: skin covers the bottom of the eye
      lid = _curve(ex - ew * 1.1, ex + ew * 1.1, ey + eh * (1.0 - 1.2 * p["eye_squint"]),
                   lift=-0.012 * p["eye_squint"], bend=0.0)
      bottom = np.array([[ex + ew * 1.2, ey + eh + 0.02], [ex - ew * 1.2, ey + eh + 0.02]])
      cv2.fillPoly(img, [_poly(np.concatenate([lid, bottom]), s)], skin, aa, _SHIFT)
      cv2.polylines(img, [_poly(lid, s)], False, line, th, aa, _SHIFT)
    # Brow: inner end near the nose, outer end at the temple.
    by = ey - 0.075 - p["brow_raise"]
    inner_x = cx + side * (0.055 - p["brow_gap"])
    outer_x = cx + side * (st.eye_dx + 0.075)
    xs = np.linspace(inner_x, outer_x, 9)
    u = np.linspace(0, 1, 9)
    ys = by - p["brow_inner"] * (1 - u) - p["brow_arch"] * 4 * u * (1 - u)
    cv2.polylines(img, [_poly(np.stack([xs, ys], -1), s)], False, line, th + 2, aa, _SHIFT)
  # Nose and, for disgust, wrinkles across its bridge and flared nostrils.
  ny = (st.eye_y + st.mouth_y) / 2 + 0.02
  cv2.polylines(img, [_poly(np.array([[cx, st.eye_y + 0.02], [cx - 0.02, ny], [cx + 0.015, ny + 0.01]]), s)],
                False, line, th, aa, _SHIFT)
  if p["wrinkle"] > 0.05:
    for k in range(3):
      y = st.eye_y + 0.035 + k * 0.025
      w = 0.035 * p["wrinkle"]
      cv2.polylines(img, [_poly(_curve(cx - w, cx + w, y, lift=-0.008, bend=0.0, n=5), s)],
                    False, line, th, aa, _SHIFT)
    for side in (-1, 1):
      cv2.circle(img, _p(cx + side * 0.03, ny + 0.008, s), _r(0.012 * p["wrinkle"], s), line,
                 -1, aa, _SHIFT)
  if p["cheek"] > 0.05:  # smile folds
    for side in (-1, 1):
      x0 = cx + side * (p["mouth_w"] + 0.03)
      y0 = st.mouth_y - p["mouth_curve"]
      pts = np.array([[x0 - side * 0.01, y0 - 0.06], [x0 + side * 0.012, y0 - 0.02],
                      [x0 + side * 0.005, y0 + 0.02 * p["cheek"]]])
      cv2.polylines(img, [_poly(pts, s)], False, line, th, aa, _SHIFT)
  # Mouth.
  my, mw = st.mouth_y, p["mouth_w"]
  lip = (185, 45, 55)
  if p["mouth_o"] > 0.5:
    cv2.ellipse(img, _p(cx, my, s), (_r(mw, s), _r(max(p["mouth_open"], 0.01), s)), 0, 0, 360,
                (40, 10, 10), -1, aa, _SHIFT)
    cv2.ellipse(img, _p(cx, my, s), (_r(mw, s), _r(max(p["mouth_open"], 0.01), s)), 0, 0, 360,
                lip, th + 1, aa, _SHIFT)
  else:
    top = _curve(cx - mw, cx + mw, my, lift=p["mouth_curve"], bend=-0.004)
    bottom = _curve(cx - mw, cx + mw, my, lift=p["mouth_curve"], bend=p["mouth_open"])
    if p["upper_lip"] > 0.05:  # snarl: the upper lip lifts, more on one side
      u = np.linspace(-1, 1, len(top))
      top[:, 1] -= 0.035 * p["upper_lip"] * np.clip(1 - (u + 0.3) ** 2, 0, None)
    if p["mouth_open"] > 0.008 or p["upper_lip"] > 0.05:
      cv2.fillPoly(img, [_poly(np.concatenate([top, bottom[::-1]]), s)], (40, 10, 10), aa, _SHIFT)
      if p["teeth"] > 0.3 or p["upper_lip"] > 0.05:
        tb = top.copy()
        tb[:, 1] += 0.5 * (bottom[:, 1] - top[:, 1]) * (0.55 if p["teeth"] > 0.3 else 0.35)
        cv2.fillPoly(img, [_poly(np.concatenate([top, tb[::-1]]), s)], (240, 240, 235), aa, _SHIFT)
      cv2.polylines(img, [_poly(np.concatenate([top, bottom[::-1]]), s)], True, lip, th,
                    aa, _SHIFT)
    else:  # closed lips
      cv2.polylines(img, [_poly(top, s)], False, lip, th + 1, aa, _SHIFT)
  return img, mask


def _background(s: int, st: _Style) -> np.ndarray:
  """Vertical two-colour gradient with soft colour blobs (computed at 1/4 size, upsampled)."""
  q = max(8, s // 4)
  t = np.linspace(0, 1, q, dtype=np.float32)[:, None, None]
  bg = np.broadcast_to((1 - t) * st.bg[0] + t * st.bg[1], (q, q, 3)).astype(np.float32)
  yy, xx = np.mgrid[0:q, 0:q].astype(np.float32) / q
  for (c, r, col) in st.blobs:
    w = np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * r * r))[..., None] * 0.3
    bg = bg * (1 - w) + col.astype(np.float32) * w
  return cv2.resize(bg, (s, s), interpolation=cv2.INTER_LINEAR)


def render(label: str, intensity: float, style: _Style, size: int,
           rng: np.random.Generator, *, pose_delta: Sequence[float] = (0.0, 0.0, 0.0),
           background: np.ndarray | None = None,
           params: dict[str, float] | None = None) -> np.ndarray:
  """One uint8 [size, size, 3] RGB face of `label` at `intensity` (0..1), or drawn with
  the face `params` when given (label and intensity then unused)."""
  face, mask = _draw_face(size, style, params if params is not None
                          else expression_params(label, intensity))
  m = cv2.getRotationMatrix2D((size / 2, size / 2), style.angle + pose_delta[0], style.scale)
  m[:, 2] += (style.shift + np.asarray(pose_delta[1:])) * size
  face = cv2.warpAffine(face, m, (size, size), flags=cv2.INTER_LINEAR)
  mask = cv2.warpAffine(mask, m, (size, size), flags=cv2.INTER_LINEAR)
  bg = _background(size, style) if background is None else background
  a = (mask.astype(np.float32) / 255.0)[..., None]
  out = bg * (1 - a) + face.astype(np.float32) * a
  out += rng.normal(0.0, style.noise, out.shape).astype(np.float32)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _rng(seed: int, kind: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, kind, index])


def make_image(index: int, label: str, size: int = 112, seed: int = 0) -> np.ndarray:
  """The still of item `index` (deterministic in seed, index and label)."""
  rng = _rng(seed, 0, index)
  style = _Style(rng)
  intensity = 1.0 if label == "neutral" else rng.uniform(0.8, 1.0)
  return render(label, intensity, style, size, rng)


def make_clip(index: int, label: str, num_frames: int = 12, size: int = 112,
              seed: int = 0) -> np.ndarray:
  """uint8 [T, size, size, 3]: neutral onset ramping to the apex, slight head motion."""
  rng = _rng(seed, 1, index)
  style = _Style(rng)
  apex = 1.0 if label == "neutral" else rng.uniform(0.6, 1.0)
  drift = rng.uniform(-1, 1, 3) * np.array([4.0, 0.02, 0.02])
  bg = _background(size, style)
  onset = max(1, num_frames // 6)
  frames = []
  for t in range(num_frames):
    u = np.clip((t - onset) / max(1, num_frames - 1 - onset - 1), 0.0, 1.0)
    ease = u * u * (3 - 2 * u)
    frames.append(render(label, apex * ease, style, size, rng,
                         pose_delta=drift * t / max(1, num_frames - 1), background=bg))
  return np.stack(frames)


def write_mp4(path: str, frames: np.ndarray, fps: int = 8) -> None:
  """Writes uint8 [T, H, W, 3] frames as H.264 (mpeg4 if libx264 is unavailable)."""
  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  with av.open(path, "w") as c:
    st = c.add_stream(codec, rate=fps)
    st.width, st.height = frames.shape[2], frames.shape[1]
    st.pix_fmt = "yuv420p"
    st.codec_context.thread_count = 1
    if codec == "libx264":
      # mbtree (lookahead rate control) makes x264's output differ from run to run.
      st.options = {"crf": "18", "preset": "veryfast", "g": "8", "threads": "1",
                    "x264-params": "mbtree=0"}
    else:
      st.options = {"qscale": "3", "g": "8"}
    for f in frames:
      for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(pkt)
    for pkt in st.encode():
      c.mux(pkt)


def au_subjects(num_subjects: int) -> list[str]:
  """BP4D subject ids taken in turn from parts 1, 2, 3 (so every fold has test subjects)."""
  from input_pipeline import au as au_lib
  parts = au_lib.BP4D_PARTS
  if num_subjects > sum(len(p) for p in parts):
    raise ValueError(f"at most {sum(len(p) for p in parts)} AU subjects (BP4D's 41)")
  out, i = [], 0
  while len(out) < num_subjects:
    part, k = parts[i % 3], i // 3
    if k < len(part):
      out.append(part[k])
    i += 1
  return out


def make_au_sequence(subject_index: int, task: int, num_frames: int, size: int,
                     seed: int = 0) -> tuple[np.ndarray, list[dict[int, int]], dict]:
  """(uint8 [T, size, size, 3], per-frame {AU: 0/1}, task info) of one subject's task.

  Identity from the subject's generator (kind 4), the task's blend, gains, apex and head
  drift from the task's (kind 5): the stills' and clips' generators are untouched.
  """
  style = _Style(_rng(seed, 4, subject_index))
  rng = _rng(seed, 5, subject_index * 1000 + task)
  first = CLASSES[int(rng.integers(len(CLASSES)))]
  weights = {first: 1.0}
  if rng.uniform() < 0.5:
    second = CLASSES[int(rng.integers(len(CLASSES)))]
    if second != first:
      weights[second] = float(rng.uniform(0.3, 0.8))
  gains = {k: float(rng.uniform(0.4, 1.25)) for k in _NEUTRAL}
  apex = float(rng.uniform(0.6, 1.0))
  drift = rng.uniform(-1, 1, 3) * np.array([4.0, 0.02, 0.02])
  bg = _background(size, style)
  frames, labels = [], []
  for t in range(num_frames):
    u = t / max(1, num_frames - 1)
    ease = u * u * (3 - 2 * u)
    params = blend_params({k: w * apex * ease for k, w in weights.items()}, gains)
    frames.append(render("neutral", 0.0, style, size, rng, params=params, background=bg,
                         pose_delta=drift * u))
    labels.append(au_labels(params))
  return np.stack(frames), labels, {"weights": weights, "apex": apex}


def generate_au(root: str, num_subjects: int, num_tasks: int = 4, num_frames: int = 8,
                seed: int = 0, image_size: int = 112) -> dict:
  """Writes the AU sequences in the BP4D layout under `root` (see the module docstring).

  CSV columns are '0' (frame) and '1'..'39' like BP4D's; AUs the faces cannot show are 9
  (not coded). Frames of a task are numbered from a random start, as BP4D's coded
  segments are. Returns {'subjects', 'frames', 'positive_rate'}.
  """
  from input_pipeline import au as au_lib
  from input_pipeline import instructions as instructions_lib
  subjects = au_subjects(num_subjects)
  test_subjects = set(au_lib.fold_subjects("bp4d", 1, "test"))
  items = {"train": [], "test": []}
  label_dir = os.path.join(root, "AUCoding", "AU_OCC")
  os.makedirs(label_dir, exist_ok=True)
  counts = np.zeros(len(AUS))
  total = 0
  for si, subject in enumerate(subjects):
    for ti in range(num_tasks):
      task = f"T{ti + 1}"
      frames, labels, info = make_au_sequence(si, ti, num_frames, image_size, seed)
      split = "test" if subject in test_subjects else "train"
      start = 1 + int(_rng(seed, 6, si * 1000 + ti).integers(0, 500))
      img_dir = os.path.join(root, "img", subject, task)
      os.makedirs(img_dir, exist_ok=True)
      lines = [",".join(str(i) for i in range(40))]
      for k, (img, lab) in enumerate(zip(frames, labels)):
        frame = start + k
        Image.fromarray(img).save(os.path.join(img_dir, f"{frame}.jpg"), format="JPEG",
                                  quality=92)
        lines.append(",".join([str(frame)] + [str(lab.get(a, 9))
                                              for a in range(1, 40)]))
        counts += [lab[a] for a in AUS]
        total += 1
        active = [a for a in AUS if lab[a]]
        rel = f"img/{subject}/{task}/{frame}.jpg"
        inst = instructions_lib.au_list_instruction(active)
        items[split].append({"id": f"au_{subject}_{task}_{frame}", "image": rel,
                             "conversations": list(inst.conversations)})
        if k == len(frames) - 1 and active:   # apex: the AU-grounded reason
          emotion = max(info["weights"], key=info["weights"].get)
          if emotion != "neutral":
            inst = instructions_lib.au_reason_instruction(emotion, active)
            items[split].append({"id": f"why_{subject}_{task}", "image": rel,
                                 "conversations": list(inst.conversations)})
      with open(os.path.join(label_dir, f"{subject}_{task}.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
  for split, its in items.items():   # FERID-style AU questions (fold 1's subject split)
    with open(os.path.join(root, f"au_instructions_{split}.json"), "w") as f:
      json.dump(its, f, indent=1)
  return {"subjects": subjects, "frames": total,
          "positive_rate": {f"AU{a}": float(c / max(total, 1)) for a, c in zip(AUS, counts)}}


def _split_counts(n: int, test_frac: float) -> int:
  return int(round(n * test_frac))


def _question(rng: np.random.Generator, video: bool) -> str:
  opts = list(CLASSES)
  rng.shuffle(opts)
  what = "video" if video else "image"
  return (f"<image>\nWhat is the facial expression of the person in the {what}? "
          f"Choose one from the following options: {{{', '.join(opts)}}}.")


_DESCRIBE = {
    "surprise": "The eyebrows are raised and arched, the eyes are wide open and the mouth "
                "forms an open O.",
    "fear": "The eyebrows are raised and drawn together, the eyes are wide and the mouth is "
            "stretched open.",
    "disgust": "The nose is wrinkled, the upper lip is raised and the eyes are narrowed.",
    "happiness": "The mouth corners are pulled up into a smile and the eyes are squinted.",
    "sadness": "The inner ends of the eyebrows are raised and the mouth corners turn down.",
    "anger": "The eyebrows are lowered and pulled together and the lips are pressed.",
    "neutral": "The face is relaxed, with level eyebrows and a closed, straight mouth.",
}


def generate(root: str, num_images: int = 700, num_clips: int = 140, seed: int = 0, *,
             image_size: int = 112, clip_size: int = 112, clip_frames: int = 12,
             test_fraction: float = 0.2, conversation_fraction: float = 0.25,
             fps: int = 8, num_au_subjects: int = 0, au_tasks: int = 4,
             au_frames: int = 8) -> dict:
  """Writes the synthetic dataset under `root` (see the module docstring); returns a
  summary dict (counts per split and class, seconds taken).

  Classes cycle through the 7 RAF-DB expressions, so every split is balanced up to one.
  Images: the last `test_fraction` of each class's items are `test_`. Clips: 5 folds; fold
  k tests on the clips with index % 5 == k - 1 and trains on the rest. AU sequences:
  `num_au_subjects` subjects x `au_tasks` tasks x `au_frames` frames (`generate_au`).
  """
  t0 = time.time()
  os.makedirs(os.path.join(root, "EmoLabel"), exist_ok=True)
  os.makedirs(os.path.join(root, "Image", "aligned"), exist_ok=True)
  n_test = _split_counts(num_images, test_fraction)
  n_train = num_images - n_test
  label_lines, instructions = [], {"train": [], "test": []}
  for i in range(num_images):
    label = CLASSES[i % len(CLASSES)]
    split = "train" if i < n_train else "test"
    k = i + 1 if split == "train" else i - n_train + 1
    stem = f"train_{k:05d}" if split == "train" else f"test_{k:04d}"
    img = make_image(i, label, image_size, seed)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=92)
    with open(os.path.join(root, "Image", "aligned", f"{stem}_aligned.jpg"), "wb") as f:
      f.write(buf.getvalue())
    label_lines.append(f"{stem}.jpg {CLASSES.index(label) + 1}")
    instructions[split].append(_instruction(f"img_{stem}", "image",
                                            f"Image/aligned/{stem}_aligned.jpg", label,
                                            _rng(seed, 2, i), conversation_fraction))
  with open(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "w") as f:
    f.write("\n".join(label_lines) + ("\n" if label_lines else ""))

  dfew = labels_lib.classes("dfew")
  if num_clips:
    os.makedirs(os.path.join(root, "Clip", "original"), exist_ok=True)
  rows = []
  for i in range(num_clips):
    label = CLASSES[i % len(CLASSES)]
    stem = f"{i + 1:05d}"
    write_mp4(os.path.join(root, "Clip", "original", f"{stem}.mp4"),
              make_clip(i, label, clip_frames, clip_size, seed), fps)
    rows.append((i + 1, labels_lib.label_index("dfew", label) + 1, label))
    split = "test" if i % 5 == 0 else "train"  # fold 1's split for the instruction JSON
    instructions[split].append(_instruction(f"clip_{stem}", "video",
                                            f"Clip/original/{stem}.mp4", label,
                                            _rng(seed, 3, i), conversation_fraction))
  if num_clips:
    for split in ("train", "test"):
      d = os.path.join(root, "EmoLabel_DataSplit", f"{split}(single-labeled)")
      os.makedirs(d, exist_ok=True)
      for fold in range(1, 6):
        with open(os.path.join(d, f"set_{fold}.csv"), "w") as f:
          f.write("video_name,label\n")
          for j, (vid, lab, _) in enumerate(rows):
            if (j % 5 == fold - 1) == (split == "test"):
              f.write(f"{vid},{lab}\n")
  for split, items in instructions.items():
    with open(os.path.join(root, f"ferid_{split}.json"), "w") as f:
      json.dump(items, f, indent=1)
  out = {"root": root, "images": {"train": n_train, "test": n_test}, "clips": num_clips,
         "dfew_ids": {name: dfew.index(name) + 1 for name in dfew}}
  if num_au_subjects:
    out["au"] = generate_au(root, num_au_subjects, au_tasks, au_frames, seed, image_size)
  out["seconds"] = time.time() - t0
  return out


def _instruction(item_id: str, key: str, rel: str, label: str, rng: np.random.Generator,
                 conversation_fraction: float) -> dict:
  conv = [{"from": "human", "value": _question(rng, key == "video")},
          {"from": "gpt", "value": label}]
  if rng.uniform() < conversation_fraction:
    conv += [{"from": "human", "value": "Which facial cues support your answer?"},
             {"from": "gpt", "value": _DESCRIBE[label]}]
  return {"id": item_id, key: rel, "conversations": conv}


def main(argv: Sequence[str] | None = None) -> None:
  import argparse
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("root")
  ap.add_argument("--num_images", type=int, default=700)
  ap.add_argument("--num_clips", type=int, default=140)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--num_au_subjects", type=int, default=0)
  a = ap.parse_args(argv)
  print(json.dumps(generate(a.root, a.num_images, a.num_clips, a.seed,
                            num_au_subjects=a.num_au_subjects), indent=1))


if __name__ == "__main__":
  main()
