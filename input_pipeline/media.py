"""Media decoding and per-encoder preprocessing: images (PIL), videos (PyAV), frame folders,
face detection and cropping (OpenCV Haar cascade), resize / crop / pad / normalise.

All decode functions return uint8 RGB arrays `[H, W, 3]` or `[F, H, W, 3]`; every decoding
failure raises `BadInputError` (reasons: missing_file, corrupt_image, corrupt_video,
empty_video, no_video_stream, no_frames, no_face) so the pipeline can count it per reason.

Video frames are sampled uniformly: frame i of F is the centre of the i-th of F equal
segments (our choice, as TSN / most FER video code; LLaMA-VID samples at a fixed fps).
Short clips (the container reports at most `SEQUENTIAL_MAX_FRAMES` frames) are decoded
sequentially from the start up to the last sampled frame: cheaper than a demux pass plus
seeks when the whole clip is a few keyframe intervals or less. Longer ones are decoded with
seeking: one cheap demux pass (no decoding) lists packet timestamps and keyframes; then for
each target the decoder seeks to the keyframe before it, unless that keyframe is not ahead of
where the decoder already is, and decodes forward to the target. If timestamps are missing or
a seek lands after its target, the clip is decoded sequentially instead. Either way only the
sampled frames are converted to RGB, through one swscale context per thread (bit-identical
to `frame.to_ndarray(format='rgb24')`, which sets up a new context for every frame).

Geometry and normalisation are separate steps: `geometry` (pad / crop / resize, uint8 out)
is what the pipeline ships; `normalize` (mean / std, float32 out) runs in the model on the
accelerator (emo_jax.models.pixels; equal copies of the statistics below) and, for host-side
users, in `preprocess` / `preprocess_vit` / `preprocess_face` = normalize(geometry(...)).
"""
from __future__ import annotations

import bisect
import io
import os
import threading
from typing import Sequence

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageOps

from input_pipeline.contract import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from input_pipeline.datasets._common import natural_sorted
from input_pipeline.records import BadInputError, Record


# ---------------------------------------------------------------------------------------
# Images


def to_rgb(im: Image.Image) -> Image.Image:
  """RGB of any PIL mode: alpha composited on black, 16-bit / float scaled to 8 bit."""
  if im.mode == "RGB":
    return im
  if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    a = np.asarray(im, dtype=np.float64)
    hi = a.max() if a.size else 0.0
    a = a * (255.0 / hi) if hi > 255 else a
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
  if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
    rgba = im.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")
  return im.convert("RGB")


def load_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] RGB, upright per the EXIF orientation tag; BadInputError if unusable."""
  if not os.path.isfile(path):
    raise BadInputError("missing_file", path)
  return _decode_image(path, path)


def decode_image(data: bytes, name: str) -> np.ndarray:
  """`load_image` of a file's bytes held in memory; `name` labels errors."""
  return _decode_image(io.BytesIO(data), name)


def _decode_image(source, path: str) -> np.ndarray:
  try:
    with Image.open(source) as im:
      im.load()  # decode fully now: truncated files raise here, not later
      im = ImageOps.exif_transpose(im)
      arr = np.asarray(to_rgb(im))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadInputError("corrupt_image", path, str(e)) from None
  if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
    raise BadInputError("corrupt_image", path, f"decoded shape {arr.shape}")
  return arr


def pixels_to_rgb(pixels: np.ndarray) -> np.ndarray:
  """FERPlus CSV pixels (uint8 [H, W] gray) -> uint8 [H, W, 3]."""
  p = np.asarray(pixels, dtype=np.uint8)
  return np.repeat(p[..., None], 3, axis=-1) if p.ndim == 2 else p


# ---------------------------------------------------------------------------------------
# Videos


def sample_indices(num_total: int, num_frames: int) -> np.ndarray:
  """Centres of `num_frames` equal segments of [0, num_total): int [num_frames].

  With fewer frames than asked, indices repeat (every frame is used, in order).
  """
  if num_total <= 0 or num_frames <= 0:
    raise ValueError(f"need num_total > 0 and num_frames > 0, got {num_total}, {num_frames}")
  idx = ((np.arange(num_frames) + 0.5) * num_total / num_frames).astype(np.int64)
  return np.minimum(idx, num_total - 1)


def _open(path: str):
  if not os.path.isfile(path):
    raise BadInputError("missing_file", path)
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise BadInputError("corrupt_video", path, str(e)) from None
  if not container.streams.video:
    has_any = bool(container.streams)
    container.close()
    if has_any:
      raise BadInputError("no_video_stream", path, "the file has streams but no video")
    raise BadInputError("empty_video", path, "no streams (a video written with zero frames)")
  return container


def _scan(container, stream) -> tuple[list[int], list[int]] | None:
  """Sorted presentation timestamps of all packets and of keyframes, or None if unknown."""
  pts, keys = [], []
  for packet in container.demux(stream):
    if packet.size == 0:
      continue  # the demuxer's final flush packet
    if packet.pts is None:
      return None
    pts.append(packet.pts)
    if packet.is_keyframe:
      keys.append(packet.pts)
  pts.sort()
  keys.sort()
  return pts, keys


class _SeekFailed(Exception):
  """Seeking is not supported by this input; decode sequentially instead."""


# Clips the container says have at most this many frames are decoded sequentially (no demux
# pass, no seeks): decoding a few dozen small frames costs less than scanning and seeking,
# and a clip this short spans only a few keyframe intervals (often a single one).
SEQUENTIAL_MAX_FRAMES = 64

_local = threading.local()


def _rgb(frame, threads: int = 1) -> np.ndarray:
  """uint8 [H, W, 3] RGB of a decoded frame, bit-identical to
  `frame.to_ndarray(format='rgb24')` (the same swscale conversion and defaults; the slice
  thread count does not change the pixels) but through one VideoReformatter per thread and
  process: to_ndarray gives every new frame a new reformatter, i.e. a new swscale context
  (and thread pool), which costs several times more than converting a small frame."""
  r = getattr(_local, "reformatter", None)
  if r is None or _local.reformatter_pid != os.getpid():  # never reuse one across a fork
    r = _local.reformatter = VideoReformatter()
    _local.reformatter_pid = os.getpid()
  return r.reformat(frame, format="rgb24", threads=threads).to_ndarray()


def _decode_seeking(container, stream, pts: list[int], keys: list[int],
                    idx: np.ndarray, threads: int = 1) -> list[np.ndarray] | None:
  """Frames at pts[idx] by seek + forward decode; None if a seek misbehaved."""
  targets = sorted({pts[i] for i in idx})
  got: dict[int, np.ndarray] = {}
  cur = None  # pts of the last decoded frame
  frames = None
  last = None
  for t in targets:
    k = bisect.bisect_right(keys, t) - 1
    key = keys[k] if k >= 0 else pts[0]
    if frames is None or cur is None or key > cur:
      try:
        container.seek(key, stream=stream, backward=True, any_frame=False)
      except (av.error.FFmpegError, OSError) as e:
        raise _SeekFailed(str(e)) from None
      frames = container.decode(stream)
      first = True
    else:
      first = False
    found = False
    for frame in frames:
      if frame.pts is None:
        return None
      if first and frame.pts > t:
        return None  # the seek landed past the target: do not trust it
      first = False
      cur = frame.pts
      last = frame
      if frame.pts >= t:
        got[t] = _rgb(frame, threads)
        found = True
        break
    if not found:
      if last is None:
        return None
      got[t] = _rgb(last, threads)  # stream ended early (fewer decodable frames than packets)
  return [got[pts[i]] for i in idx]


def _decode_sequential(container, stream, num_frames: int,
                       threads: int = 1) -> list[np.ndarray]:
  """Decodes from the current (start) position; samples by frame index, using
  stream.frames when the container knows it, else holding the decoded (YUV) frames."""
  n = stream.frames
  if n and n > 0:
    want = sample_indices(n, num_frames)
    wanted = set(int(i) for i in want)
    got, last = {}, None
    for i, frame in enumerate(container.decode(stream)):
      last = frame
      if i in wanted:
        got[i] = _rgb(frame, threads)
      if i >= want[-1]:
        break
    if last is None:
      return []
    fill = got[max(got)] if got else _rgb(last, threads)
    return [got.get(int(i), fill) for i in want]
  kept = list(container.decode(stream))
  if not kept:
    return []
  return [_rgb(kept[i], threads) for i in sample_indices(len(kept), num_frames)]


def _configure(container, threads: int):
  stream = container.streams.video[0]
  stream.codec_context.thread_count = max(1, threads)
  if threads > 1:
    stream.thread_type = "AUTO"
  return stream


def decode_video(path: str, num_frames: int, *, seek: bool = True, threads: int = 1,
                 sequential_max_frames: int = SEQUENTIAL_MAX_FRAMES) -> np.ndarray:
  """`num_frames` uniformly sampled RGB frames of a video file: uint8 [F, H, W, 3].

  Args:
    seek: seek to the keyframe before each target (default) instead of decoding the
      clip sequentially from the start.
    threads: decoder (and RGB conversion) threads (1 suits many parallel data workers).
    sequential_max_frames: with `seek`, a clip whose container reports at most this many
      frames is still decoded sequentially (cheaper for short clips; 0: always seek).
  Raises:
    BadInputError: missing_file, corrupt_video, no_video_stream, empty_video.
  """
  container = _open(path)
  try:
    stream = _configure(container, threads)
    frames = None
    if seek and 0 < (stream.frames or 0) <= sequential_max_frames:
      seek = False  # short clip: sequential decoding is cheaper than scan + seeks
    if seek:
      scan = _scan(container, stream)
      if scan is not None:
        pts, keys = scan
        if not pts:
          raise BadInputError("empty_video", path, "no video packets")
        try:
          frames = _decode_seeking(container, stream, pts, keys,
                                   sample_indices(len(pts), num_frames), threads)
        except _SeekFailed:
          frames = None
      # Fall back: reopen (raw streams cannot even seek back to the start).
      if frames is None:
        container.close()
        container = _open(path)
        stream = _configure(container, threads)
    if frames is None:
      frames = _decode_sequential(container, stream, num_frames, threads)
    if not frames:
      raise BadInputError("empty_video", path, "no decodable frames")
    return np.stack(frames)
  except av.error.FFmpegError as e:
    raise BadInputError("corrupt_video", path, str(e)) from None
  finally:
    container.close()


def count_frames(path: str) -> int:
  """Number of video packets (= frames for the usual codecs), without decoding."""
  container = _open(path)
  try:
    scan = _scan(container, container.streams.video[0])
    if scan is None:
      return sum(1 for _ in container.decode(video=0))
    return len(scan[0])
  except av.error.FFmpegError as e:
    raise BadInputError("corrupt_video", path, str(e)) from None
  finally:
    container.close()


def load_frames(paths: Sequence[str], num_frames: int) -> np.ndarray:
  """`num_frames` uniformly sampled images of a frame list: uint8 [F, H, W, 3].

  Frames of another size than the first are resized to it.
  """
  if not paths:
    raise BadInputError("no_frames", None, "empty frame list")
  chosen = [paths[i] for i in sample_indices(len(paths), num_frames)]
  cache: dict[str, np.ndarray] = {}
  out = []
  for p in chosen:
    if p not in cache:
      cache[p] = load_image(p)
    img = cache[p]
    if out and img.shape != out[0].shape:
      img = cv2.resize(img, (out[0].shape[1], out[0].shape[0]), interpolation=cv2.INTER_AREA)
    out.append(img)
  return np.stack(out)


def load_frame_folder(folder: str, num_frames: int) -> np.ndarray:
  """Like load_frames on the folder's images in natural order ('2.jpg' < '10.jpg')."""
  if not os.path.isdir(folder):
    raise BadInputError("missing_file", folder)
  names = natural_sorted(n for n in os.listdir(folder)
                         if n.lower().endswith((".jpg", ".jpeg", ".png", ".bmp")))
  return load_frames([os.path.join(folder, n) for n in names], num_frames)


def load_media(record: Record, num_frames: int = 1, *, seek: bool = True,
               threads: int = 1) -> np.ndarray:
  """The record's frames, uint8 [F, H, W, 3] (an image is F = 1; `crop_box` applied)."""
  t = record.media_type
  if t == "image":
    out = load_image(record.media)[None]
  elif t == "pixels":
    if record.pixels is None:
      raise BadInputError("corrupt_image", record.id, "pixels record without pixels")
    out = pixels_to_rgb(record.pixels)[None]
  elif t == "video":
    out = decode_video(record.media, num_frames, seek=seek, threads=threads)
  elif t == "frames":
    out = load_frames(list(record.media), num_frames)
  else:
    raise ValueError(f"unknown media_type {t!r}")
  if record.crop_box is not None:
    out = np.stack([crop_box(f, record.crop_box, margin=0.0, square=False) for f in out])
  return out


# ---------------------------------------------------------------------------------------
# Geometry and normalisation


def pad_to_square(img: np.ndarray, fill: Sequence[int] | None = None) -> np.ndarray:
  """Centres the image on a square canvas (LLaVA's `image_aspect_ratio='pad'`).

  fill: RGB of the margin; default the CLIP mean as uint8, as LLaVA's expand2square.
  """
  h, w = img.shape[:2]
  if h == w:
    return img
  s = max(h, w)
  fill = tuple(int(m * 255) for m in CLIP_MEAN) if fill is None else tuple(fill)
  out = np.empty((s, s, 3), dtype=img.dtype)
  out[...] = np.asarray(fill, dtype=img.dtype)
  y, x = (s - h) // 2, (s - w) // 2
  out[y:y + h, x:x + w] = img
  return out


def resize(img: np.ndarray, size: int | tuple[int, int], *,
           out: np.ndarray | None = None) -> np.ndarray:
  """Resize to (h, w) (an int: square); area filter when shrinking, bicubic when growing.

  out: write the result into this [h, w, C] array (of img's dtype) and return it; without
    it a new array is returned, or img itself when it already has the size.
  """
  h, w = (size, size) if isinstance(size, int) else size
  if img.shape[:2] == (h, w):
    if out is None:
      return img
    out[...] = img
    return out
  shrink = h * w < img.shape[0] * img.shape[1]
  interp = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
  if out is None:
    return cv2.resize(img, (w, h), interpolation=interp)
  # Into a preallocated frame of the output: no per-frame allocation and copy.
  res = cv2.resize(img, (w, h), dst=out, interpolation=interp)
  if res is not out and not np.shares_memory(res, out):
    out[...] = res  # cv2 could not write in place (layout); keep the contract
  return out


def resize_shortest_center_crop(img: np.ndarray, size: int) -> np.ndarray:
  """CLIP processor geometry: shortest side to `size`, then the central size x size crop."""
  h, w = img.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  img = resize(img, (nh, nw))
  y, x = (nh - size) // 2, (nw - size) // 2
  return img[y:y + size, x:x + size]


ASPECTS = ("pad", "crop", "resize")


def geometry_is_resize(height: int, width: int, aspect: str) -> bool:
  """True when `geometry(x, s, aspect)` equals `geometry(x, s, 'resize')` for frames of this
  size: always for 'resize', and for square frames with 'pad' (nothing to pad) or 'crop'
  (the shortest side is the whole frame)."""
  if aspect not in ASPECTS:
    raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
  return aspect == "resize" or height == width


def geometry(frames: np.ndarray, size: int, aspect: str = "pad", *,
             fill: Sequence[int] | None = None) -> np.ndarray:
  """[F, H, W, 3] (or [H, W, 3]) images -> [F, size, size, 3] of the same dtype (uint8 from
  the decoders): the encoder geometry, no normalisation. This is what the pipeline ships;
  the model normalises (emo_jax.models.pixels).

  aspect: 'pad' (pad to square with `fill`, then resize; LLaMA-VID's setting), 'crop'
    (shortest side then centre crop; the CLIP processor) or 'resize' (stretch).
  fill: RGB of the 'pad' margin; default the CLIP mean as uint8 (LLaVA's expand2square).
  Frames that already are size x size come back as they are (the same array, no copy).
  """
  if aspect not in ASPECTS:
    raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
  if frames.ndim == 3:
    frames = frames[None]
  if frames.shape[1:3] == (size, size):
    return frames  # square already at size: every aspect is the identity
  out = np.empty((frames.shape[0], size, size) + frames.shape[3:], frames.dtype)
  square = frames.shape[1] == frames.shape[2]
  for i, f in enumerate(frames):
    if aspect == "resize" or square:
      resize(f, size, out=out[i])
    elif aspect == "pad":
      resize(pad_to_square(f, fill), size, out=out[i])
    else:
      out[i] = resize_shortest_center_crop(f, size)
  return out


def normalize(frames: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 [..., H, W, 3] -> float32 (x / 255 - mean) / std.

  One affine per channel with cv2.transform, frame by frame (several times faster than
  numpy broadcasting over a length-3 last axis); the constants are those of
  emo_jax.models.pixels.normalize_pixels, the same computation on the device.
  """
  std64 = np.asarray(std, np.float64)
  m = np.zeros((3, 4), np.float32)
  m[np.arange(3), np.arange(3)] = (1.0 / (255.0 * std64)).astype(np.float32)
  m[:, 3] = (-np.asarray(mean, np.float64) / std64).astype(np.float32)
  shape = frames.shape
  flat = frames.reshape((-1,) + shape[-3:]) if frames.ndim >= 3 else frames.reshape(1, 1, -1, 3)
  out = np.empty(flat.shape, np.float32)
  for i, f in enumerate(flat):
    out[i] = cv2.transform(f.astype(np.float32), m)
  return out.reshape(shape)


def preprocess(frames: np.ndarray, size: int = 224, *, aspect: str = "pad",
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
               ) -> np.ndarray:
  """uint8 [F, H, W, 3] (or [H, W, 3]) -> normalised float32 [F, size, size, 3]:
  `normalize(geometry(...))`, the host-side equivalent of what the model does with the
  pipeline's uint8 pixels. 'pad' fills with the mean colour.

  aspect: 'pad' (pad to square with the mean colour, then resize; LLaMA-VID's setting),
    'crop' (shortest side then centre crop; the CLIP processor) or 'resize' (stretch).
  """
  fill = tuple(int(m * 255) for m in mean)
  return normalize(geometry(frames, size, aspect, fill=fill), mean, std)


def preprocess_vit(frames: np.ndarray, size: int = 224, aspect: str = "pad") -> np.ndarray:
  """ViT input: CLIP mean/std (EVA-CLIP and CLIP share them)."""
  return preprocess(frames, size, aspect=aspect, mean=CLIP_MEAN, std=CLIP_STD)


def preprocess_face(crops: np.ndarray, size: int = 224) -> np.ndarray:
  """Face-network input: square resize of face crops, ImageNet mean/std (FaceXFormer)."""
  return preprocess(crops, size, aspect="resize", mean=IMAGENET_MEAN, std=IMAGENET_STD)


# ---------------------------------------------------------------------------------------
# Faces

CASCADE_FILE = "haarcascade_frontalface_default.xml"


def _cascade() -> cv2.CascadeClassifier:
  """The Haar cascade that opencv-python(-headless) 4.x ships, one per thread."""
  c = getattr(_local, "cascade", None)
  if c is None:
    path = os.path.join(cv2.data.haarcascades, CASCADE_FILE)
    c = cv2.CascadeClassifier(path)
    if c.empty():
      raise RuntimeError(f"cannot load the OpenCV face cascade {path} (opencv 5.x ships none;"
                         " install opencv-python-headless 4.x)")
    _local.cascade = c
  return c


def detect_faces(img: np.ndarray, *, min_size: float = 0.08, scale_factor: float = 1.1,
                 min_neighbors: int = 5, max_side: int = 640
                 ) -> list[tuple[int, int, int, int]]:
  """Frontal faces as (x, y, w, h) boxes in pixels, largest first.

  min_size: smallest face side as a fraction of the image's shorter side.
  max_side: larger images are downscaled for detection (boxes are mapped back).
  """
  h, w = img.shape[:2]
  scale = min(1.0, max_side / max(h, w))
  gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
  if scale < 1.0:
    gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
  gray = cv2.equalizeHist(gray)
  side = max(12, int(min(gray.shape) * min_size))
  found = _cascade().detectMultiScale(gray, scaleFactor=scale_factor,
                                      minNeighbors=min_neighbors, minSize=(side, side))
  boxes = [tuple(int(round(v / scale)) for v in b) for b in np.asarray(found).reshape(-1, 4)]
  return sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)


def crop_box(img: np.ndarray, box: Sequence[float], *, margin: float = 0.0,
             square: bool = True) -> np.ndarray:
  """img[y:y+h, x:x+w] grown by `margin` x side on each side (square around the centre if
  `square`); parts outside the image are black."""
  x, y, w, h = (float(v) for v in box)
  if w <= 0 or h <= 0:
    raise BadInputError("no_face", None, f"empty box {tuple(box)}")
  cx, cy = x + w / 2, y + h / 2
  if square:
    w = h = max(w, h)
  w, h = w * (1 + 2 * margin), h * (1 + 2 * margin)
  x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
  x1, y1 = x0 + max(1, int(round(w))), y0 + max(1, int(round(h)))
  H, W = img.shape[:2]
  out = np.zeros((y1 - y0, x1 - x0) + img.shape[2:], img.dtype)
  sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
  if sx1 > sx0 and sy1 > sy0:
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
  return out


def crop_face(img: np.ndarray, *, margin: float = 0.2, path: str | None = None,
              **detect_kw) -> np.ndarray:
  """The largest detected face with `margin`, square; BadInputError('no_face') if none."""
  boxes = detect_faces(img, **detect_kw)
  if not boxes:
    raise BadInputError("no_face", path, "the face detector found no face")
  return crop_box(img, boxes[0], margin=margin)


def crop_face_frames(frames: np.ndarray, *, margin: float = 0.2, path: str | None = None,
                     probes: int = 3, **detect_kw) -> np.ndarray:
  """One face box for a whole clip (a stable crop): the largest face found on up to
  `probes` evenly spaced frames, applied to every frame. BadInputError('no_face') if none."""
  best = None
  for i in sample_indices(len(frames), min(probes, len(frames))):
    boxes = detect_faces(frames[i], **detect_kw)
    if boxes and (best is None or boxes[0][2] * boxes[0][3] > best[2] * best[3]):
      best = boxes[0]
  if best is None:
    raise BadInputError("no_face", path, "the face detector found no face in the clip")
  return np.stack([crop_box(f, best, margin=margin) for f in frames])
