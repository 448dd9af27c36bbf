"""predict: one image or video (+ an optional question) -> answer, emotion, probability.

    python -m emo_jax.main --config=... --workdir=... --mode=predict --input=face.jpg \\
        [--question="How does this person feel?"]

Prints the model's generated answer to the question (default: the category question over
the classes of `config.predict.dataset`), and the detected emotion with its probability
from the option-likelihood scorer (softmax over the classes' answer log-likelihoods, see
train.evaluate). A video longer than `config.predict.window_secs` is cut into windows of
that length; each window is classified and the per-window timeline is written to
<workdir>/predict/<name>_timeline.{json,png} (or --output_dir). The summary is one
decision: the emotion with the highest mean probability over the windows; the answer is
generated on the window where that emotion is most likely.

The steps: `load_windows` (decode, cut, check faces), `score_windows` (class likelihoods
per window), `summarize`, `generate_answer`, `write_timeline`.

Face handling (config.predict.face_mode): 'detect' requires a face (OpenCV detector) in
the image / in some frame of each window and fails clearly when there is none; with
`crop_to_face` the model sees the crop (real-world photos), without it the whole frame
(the synthetic default was trained on aligned whole-frame faces). 'aligned' skips
detection (the input is already a face crop).

Bad inputs (missing file, not an image / video, unreadable video, no face) raise
PredictError, which the command prints as `error: ...` and exits with status 2.
"""
from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

import numpy as np
from absl import logging

from emo_jax.train import checkpoint as ckpt_lib
from emo_jax.train import evaluate as eval_lib
from emo_jax.train import loop
from emo_jax.train import task as task_lib
from emo_jax.train.errors import UserError
from input_pipeline import instructions as instructions_lib
from input_pipeline import labels as labels_lib
from input_pipeline import media as media_lib
from input_pipeline import paths
from input_pipeline import pipeline as pipeline_lib
from input_pipeline import template as template_lib
from input_pipeline.records import BadInputError, Record

IMAGE_TOKEN = template_lib.IMAGE_TOKEN
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_EXT = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv")


class PredictError(UserError):
  """A bad input to predict; the message says what is wrong with which file, `reason` is
  a short code for programs (e.g. the server's error codes)."""

  def __init__(self, message: str, reason: str = "invalid_media"):
    super().__init__(message)
    self.reason = reason


def media_kind(path: str) -> str:
  if not os.path.exists(path):
    raise PredictError(f"{path}: no such file")
  if not os.path.isfile(path):
    raise PredictError(f"{path}: not a file")
  ext = os.path.splitext(path)[1].lower()
  if ext in IMAGE_EXT:
    return "image"
  if ext in VIDEO_EXT:
    return "video"
  # Unknown extension: sniff. PIL first, then PyAV.
  try:
    media_lib.load_image(path)
    return "image"
  except BadInputError:
    pass
  try:
    media_lib.count_frames(path)
    return "video"
  except (BadInputError, Exception):  # pylint: disable=broad-except
    raise PredictError(f"{path}: neither a readable image nor a readable video") from None


def _video_info(path: str) -> tuple[int, float]:
  import av
  try:
    with av.open(path) as c:
      if not c.streams.video:
        raise PredictError(f"{path}: unreadable video (no video stream)", reason="invalid_video")
      s = c.streams.video[0]
      rate = float(s.average_rate or s.guessed_rate or 25)
  except av.error.FFmpegError as e:
    raise PredictError(f"{path}: unreadable video ({e})", reason="invalid_video") from None
  try:
    n = media_lib.count_frames(path)
  except BadInputError as e:
    raise PredictError(f"{path}: unreadable video ({e})", reason="invalid_video") from None
  if n <= 0:
    raise PredictError(f"{path}: unreadable video (no frames)", reason="invalid_video")
  return n, rate


def _decode_windows(path: str, num_frames: int, n_total: int, fps: float,
                    window_secs: float) -> list[tuple[float, float, np.ndarray]]:
  """[(start_s, end_s, uint8 [F, H, W, 3])]: each window's frames sampled uniformly."""
  import av
  per = max(1, int(round(window_secs * fps)))
  starts = list(range(0, n_total, per))
  want: dict[int, int] = {}
  for w, s in enumerate(starts):
    e = min(s + per, n_total)
    for i in media_lib.sample_indices(e - s, num_frames):
      want.setdefault(s + int(i), w)
  frames: dict[int, np.ndarray] = {}
  try:
    with av.open(path) as c:
      for i, fr in enumerate(c.decode(video=0)):
        if i in want:
          frames[i] = fr.to_ndarray(format="rgb24")
  except av.error.FFmpegError as e:
    raise PredictError(f"{path}: unreadable video ({e})", reason="invalid_video") from None
  out = []
  for w, s in enumerate(starts):
    e = min(s + per, n_total)
    idx = [s + int(i) for i in media_lib.sample_indices(e - s, num_frames)]
    got = [frames[i] for i in idx if i in frames]
    if got:
      out.append((s / fps, e / fps, np.stack(got)))
  if not out:
    raise PredictError(f"{path}: unreadable video (no decodable frames)", reason="invalid_video")
  return out


def _faces(frames: np.ndarray, path: str, cfg) -> np.ndarray:
  """Checks for a face (and crops to it when configured). Raises PredictError."""
  if cfg.face_mode == "aligned":
    return frames
  if cfg.face_mode != "detect":
    raise ValueError(f"config.predict.face_mode must be 'detect' or 'aligned', "
                     f"got {cfg.face_mode!r}")
  crops, found = [], []
  for f in frames:
    try:
      crops.append(media_lib.crop_face(f, margin=cfg.get("face_margin", 0.2), path=path))
      found.append(True)
    except BadInputError:
      crops.append(None)
      found.append(False)
  if not any(found):
    raise PredictError(f"{path}: no face found (detector: OpenCV Haar cascade); pass a face "
                       "image or --config.predict.face_mode=aligned for pre-cropped faces",
                       reason="no_face")
  if not cfg.get("crop_to_face", True):
    return frames
  first = next(c for c in crops if c is not None)
  side = first.shape[0]
  fill = [c if c is not None else first for c in crops]
  import cv2
  return np.stack([cv2.resize(c, (side, side), interpolation=cv2.INTER_AREA) for c in fill])


def timeline_figure(timeline: list[dict], classes, figsize=(8, 3.5)):
  """The per-window class probabilities of a video as a matplotlib figure (closed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  t = [(w["start"] + w["end"]) / 2 for w in timeline]
  fig, ax = plt.subplots(figsize=figsize)
  for c in classes:
    ax.plot(t, [w["probs"][c] for w in timeline], marker="o", label=c)
  ax.set_xlabel("time (s)")
  ax.set_ylabel("probability")
  ax.set_ylim(0, 1)
  ax.set_title("emotion per window")
  ax.legend(fontsize=7, ncol=4, loc="upper right")
  fig.tight_layout()
  plt.close(fig)
  return fig


def _timeline_png(timeline: list[dict], classes, path: str) -> str:
  eval_lib.write_png(timeline_figure(timeline, classes), path)
  return path


# --------------------------------------------------------------------------- the steps


def load_windows(config, input_path: str) -> tuple[str, list[tuple[float, float, np.ndarray]]]:
  """('image' | 'video', [(start_s, end_s, uint8 frames)]) with faces checked: one window
  for an image or a short video, windows of `config.predict.window_secs` for a long one.
  Raises PredictError (before any model work)."""
  kind = media_kind(input_path)
  return kind, decode_windows(input_path, kind, config.predict,
                              config.data.pipeline.num_frames)


def decode_windows(path: str, kind: str, predict_cfg, num_frames: int,
                   max_video_frames: int | None = None, data: bytes | None = None
                   ) -> list[tuple[float, float, np.ndarray]]:
  """The windows of a file whose kind is known, faces checked as `predict_cfg.face_mode`
  says; a video of more than `max_video_frames` frames is refused (PredictError with
  reason 'video_too_long'). `data`: an image's bytes held in memory (`path` then only
  names it in messages)."""
  if kind == "image":
    try:
      img = media_lib.load_image(path) if data is None else media_lib.decode_image(data, path)
      windows = [(0.0, 0.0, img[None])]
    except BadInputError as e:
      raise PredictError(f"{path}: not a readable image ({e.reason}: {e.detail})",
                         reason="invalid_image") from None
  else:
    n, fps = _video_info(path)
    if max_video_frames is not None and n > max_video_frames:
      raise PredictError(f"{path}: {n} frames, more than the limit of {max_video_frames}",
                         reason="video_too_long")
    if n / fps > predict_cfg.window_secs * 1.5:
      windows = _decode_windows(path, num_frames, n, fps, predict_cfg.window_secs)
    else:
      try:
        windows = [(0.0, n / fps, media_lib.decode_video(path, num_frames))]
      except BadInputError as e:
        raise PredictError(f"{path}: unreadable video ({e.reason}: {e.detail})",
                           reason="invalid_video") from None
  return [(s, e, _faces(f, path, predict_cfg)) for s, e, f in windows]


def check_question(question: str | None) -> str | None:
  """The user's question, stripped; PredictError for one the prompt cannot hold."""
  if question is None:
    return None
  q = question.strip()
  if not q:
    raise PredictError("--question is empty")
  if IMAGE_TOKEN in q:
    raise PredictError(f"--question {question!r} contains the literal {IMAGE_TOKEN} "
                       "placeholder; the image is put in front of the question for you, "
                       "remove it from the question")
  return q


class _Prompts:
  """Builds model examples for one input: the category question (scoring) and the
  user's question (generation), with the pipeline's own ExampleBuilder."""

  def __init__(self, config, input_path: str, kind: str, tok, qtok, question: str | None):
    model_cfg = task_lib.model_config(config)
    self.pcfg = task_lib.pipeline_config(config, model_cfg, shuffle=False,
                                         shuffle_options=False, face_mode="aligned")
    self.builder = pipeline_lib.ExampleBuilder(self.pcfg, tok, qtok, strict=True)
    self.dataset = config.predict.dataset
    self.classes = labels_lib.classes(self.dataset)
    self.input_path = input_path
    self.media_type = "image" if kind == "image" else "video"
    self.name = os.path.splitext(os.path.basename(input_path))[0]
    self.category = f"{IMAGE_TOKEN}\n" + instructions_lib.QUESTION_TEMPLATE.format(
        media=instructions_lib.media_word(self.media_type), options=", ".join(self.classes))
    self.user = self.category if not question else f"{IMAGE_TOKEN}\n{question}"
    tokd = template_lib.tokenize_conversation(
        [{"from": "human", "value": self.user}], tok,
        num_visual_slots=self.pcfg.num_visual_slots, max_length=self.pcfg.max_length,
        path=input_path)
    if tokd.truncated:
      logging.warning("the question is longer than the prompt limit (max_length %d tokens "
                      "with %d visual slots): it was truncated", self.pcfg.max_length,
                      self.pcfg.num_visual_slots)
      print("warning: the question is longer than the prompt limit and was truncated "
            f"(config.data.pipeline.max_length={self.pcfg.max_length})", file=sys.stderr)
    if question and len(qtok.encode(question)) > self.pcfg.qformer_max_length:
      print("warning: the Q-Former sees only the first "
            f"{self.pcfg.qformer_max_length - 2} tokens of the question "
            "(config.data.pipeline.qformer_max_length)", file=sys.stderr)

  def element(self, frames: np.ndarray, q: str, a: str | None) -> dict:
    conv = [{"from": "human", "value": q}] + ([{"from": "gpt", "value": a}] if a else [])
    rec = Record(dataset=self.dataset, split="test", id=self.name, media=self.input_path,
                 media_type=self.media_type, conversations=tuple(conv))
    try:
      return self.builder(dict(record=rec, frames=frames), np.random.default_rng(0))
    except BadInputError as e:
      raise PredictError(f"{self.input_path}: {e}") from None


def score_windows(scorer, prompts: _Prompts, windows, pad_id: int) -> list[dict]:
  """Per window: the class probabilities (softmax over the classes' answer
  log-likelihoods after the category question) and the most likely class."""
  classes = prompts.classes
  timeline = []
  for start, end, frames in windows:
    exs = [prompts.element(frames, prompts.category, c) for c in classes]
    lp = scorer.answer_logp(eval_lib.collate(exs, len(classes), prompts.pcfg.bucket_lengths,
                                             pad_id))[:len(classes)]
    p = np.exp(lp - lp.max())
    p = p / p.sum()
    k = int(np.argmax(p))
    timeline.append({"start": round(start, 3), "end": round(end, 3), "emotion": classes[k],
                     "probability": float(p[k]),
                     "probs": {c: float(v) for c, v in zip(classes, p)}})
  return timeline


def summarize(timeline: list[dict], classes) -> tuple[str, dict[str, float], int]:
  """One decision for the whole input: the emotion with the highest mean probability over
  the windows, its mean probabilities, and the window that shows it most strongly (the
  one the answer is generated on)."""
  mean_p = np.mean([[w["probs"][c] for c in classes] for w in timeline], axis=0)
  emotion = classes[int(np.argmax(mean_p))]
  window = int(np.argmax([w["probs"][emotion] for w in timeline]))
  return emotion, {c: float(v) for c, v in zip(classes, mean_p)}, window


def generate_answer(scorer, prompts: _Prompts, frames: np.ndarray, tok) -> str:
  """The model's free answer to the user's question (greedy) on one window's frames."""
  batch = eval_lib.collate([prompts.element(frames, prompts.user, None)], 1,
                           prompts.pcfg.bucket_lengths, tok.pad_id)
  ids = scorer.generate(batch)[0].tolist()
  if tok.eos_id in ids:
    ids = ids[:ids.index(tok.eos_id)]
  return tok.decode([i for i in ids if i >= 0]).strip()


def write_timeline(timeline: list[dict], classes, input_path: str, window_secs: float,
                   out_dir: str, name: str) -> tuple[str, str]:
  """<out_dir>/<name>_timeline.{json,png} (out_dir may be a cloud URL)."""
  paths.makedirs(out_dir)
  jpath = paths.join(out_dir, f"{name}_timeline.json")
  paths.write_text(jpath, json.dumps({"input": input_path, "window_secs": window_secs,
                                      "timeline": timeline}, indent=1))
  ppath = _timeline_png(timeline, classes, paths.join(out_dir, f"{name}_timeline.png"))
  return jpath, ppath


def synthetic_only(config) -> bool:
  """True when every training set of the config is the generated synthetic data and no
  pretrained weights were loaded (the embedded default)."""
  train = [dict(d) for d in config.data.train]
  init = config.get("init") or {}
  return bool(train) and all(d.get("name") == "synthetic" for d in train) and not any(
      v for k, v in init.items() if k != "allow_pickle")


SYNTHETIC_NOTE = ("note: this model was trained on synthetic faces only; its answer and "
                  "probabilities on real photos mean nothing")


# ---------------------------------------------------------------------------- predict


def predict(config, workdir: str, input_path: str, *, question: str | None = None,
            model=None, out_dir: str | None = None) -> dict:
  """Runs the model of `workdir` on one file; prints and returns the result. A long
  video's timeline goes to `out_dir` (default <workdir>/predict). The input, the workdir and
  `out_dir` may be cloud URLs (a remote input is read from a temporary local copy)."""
  if paths.is_remote(input_path) and not paths.isfile(input_path):
    raise PredictError(f"{input_path}: no such file")
  with paths.local_copy(input_path) as media_path:
    try:
      return _predict(config, workdir, media_path, question=question, model=model,
                      out_dir=out_dir, shown_path=input_path)
    except PredictError as e:   # name the user's path, not the temporary copy
      raise PredictError(str(e).replace(media_path, input_path)) from None


def _predict(config, workdir: str, input_path: str, *, question: str | None, model,
             out_dir: str | None, shown_path: str) -> dict:
  kind, windows = load_windows(config, input_path)   # input errors before the model
  question = check_question(question)
  out_dir = out_dir or paths.join(workdir, "predict")
  if model is None:
    ckpt_lib.require_checkpoint(workdir)
    if len(windows) > 1:
      ckpt_lib.check_writable(out_dir, "--output_dir")
  tok, qtok = task_lib.tokenizers(task_lib.prepare_data(config, workdir, generate=False))
  prompts = _Prompts(config, input_path, kind, tok, qtok, question)
  if model is None:
    _, model, _ = loop.restore_trained(config, workdir)
  scorer = eval_lib.Scorer(model, max_new_tokens=config.predict.max_new_tokens,
                           eos_id=tok.eos_id, pad_id=tok.pad_id)

  timeline = score_windows(scorer, prompts, windows, tok.pad_id)
  emotion, probs, w = summarize(timeline, prompts.classes)
  answer = generate_answer(scorer, prompts, windows[w][2], tok)
  result: dict[str, Any] = {"input": shown_path, "kind": kind,
                            "question": prompts.user[len(IMAGE_TOKEN) + 1:],
                            "answer": answer, "emotion": emotion,
                            "probability": probs[emotion], "probs": probs}
  print(f"answer: {answer}")
  print(f"emotion: {emotion} (probability {probs[emotion]:.3f})")
  if len(timeline) > 1:
    result["answer_window"] = {"start": timeline[w]["start"], "end": timeline[w]["end"]}
    print(f"(answer generated on {timeline[w]['start']:g}-{timeline[w]['end']:g} s, the "
          f"window where {emotion} is most likely)")
    jpath, ppath = write_timeline(timeline, prompts.classes, shown_path,
                                  config.predict.window_secs, out_dir, prompts.name)
    result.update(timeline=timeline, timeline_json=jpath, timeline_png=ppath)
    print(f"timeline: {len(timeline)} windows -> {jpath}, {ppath}")
  if synthetic_only(config):
    result["note"] = SYNTHETIC_NOTE
    print(SYNTHETIC_NOTE)
  logging.info("predict: %s", result)
  return result
