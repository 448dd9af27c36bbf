"""The serving engine: one loaded model, concurrent requests batched through compiled programs.

    engine = Engine(config, workdir)              # or Engine(config, workdir, bundle=<export>)
    req = engine.prepare(chat_turns, media, n=1, max_tokens=8, temperature=0.0, top_p=1.0)
    result = engine.submit(req).result()          # a concurrent.futures.Future

`prepare` runs in the caller's thread: it decodes the media (image, or video cut into
windows of `config.predict.window_secs` as `--mode=predict` does), checks for a face when
`config.predict.face_mode='detect'`, tokenizes, and raises `InputError` (a message, an
OpenAI error code, the offending parameter and an HTTP status) for anything unusable, so
bad input never reaches the model. `submit` queues the request (refused when
`config.serve.max_queue` are waiting); one worker thread takes what is queued, waiting at
most `config.serve.max_wait_ms` for more, up to `config.serve.max_batch` generated rows,
and runs it together:

- generation: every choice (`n` per request) is one row of a left-padded batch through one
  jitted prefill + decode loop (`models.generation.generate` with `RowSampling`: per-row
  temperature / top-p / token budget as arrays, so requests with different settings share a
  program). Shapes are bucketed: rows are padded to the next of `config.serve.batch_buckets`
  and prompts to the next of `config.serve.length_buckets`; every program is compiled once at
  start-up (`warmup`) or on first use, never per request. A request's rows are grouped
  with others of the same length bucket only, so its padding does not depend on who it is
  batched with; greedy rows (temperature 0) give the one-at-a-time tokens.
- class probabilities: the option likelihood of `train.evaluate` (the log-likelihood of
  each class word + EOS after the category question, softmax over the classes) for every
  window. The category prompt is run once per window (one row, rows padded to
  `config.serve.score_buckets`) into a KV cache that every class's answer tokens then
  continue, instead of one full forward per class: the same sums as `evaluate.Scorer`
  (tests compare with `--mode=predict`) at a fraction of the cost. A video gets a per-window
  timeline; its overall emotion is the mean of the window probabilities, as in
  `--mode=predict`.

A persistent JAX compilation cache (`config.serve.compilation_cache_dir`, default
`<workdir>/jax_cache`) makes a second start-up skip XLA compilation.
"""
from __future__ import annotations

import base64
import binascii
import collections
import concurrent.futures
import dataclasses
import functools
import os
import re
import tempfile
import threading
import time
from typing import Any, Sequence

import numpy as np
from absl import logging

from emo_jax.convert import bundle as bundle_lib
from emo_jax.models import generation
from emo_jax.train import evaluate as eval_lib
from emo_jax.train import loop
from emo_jax.train import predict as predict_lib
from emo_jax.train import task as task_lib
from input_pipeline import instructions as instructions_lib
from input_pipeline import labels as labels_lib
from input_pipeline import media as media_lib
from input_pipeline import pipeline as pipeline_lib
from input_pipeline import template as template_lib
from input_pipeline.records import BadInputError, Record

IMAGE_MIME = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg",
              "image/webp": ".webp", "image/gif": ".gif", "image/bmp": ".bmp",
              "image/tiff": ".tif"}
VIDEO_MIME = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov",
              "video/x-msvideo": ".avi", "video/x-matroska": ".mkv", "video/mpeg": ".mpg"}
_DATA_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,",
                       re.IGNORECASE)


class InputError(Exception):
  """A request the server refuses: OpenAI error fields and the HTTP status."""

  def __init__(self, message: str, *, code: str, param: str | None = None, status: int = 400,
               type: str = "invalid_request_error"):  # pylint: disable=redefined-builtin
    super().__init__(message)
    self.message, self.code, self.param, self.status, self.type = (message, code, param,
                                                                   status, type)


def apply_compilation_cache(cache_dir: str) -> None:
  """Persists every compiled program under `cache_dir` (reused by the next start-up)."""
  import jax
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


# ----------------------------------------------------------------------------------- media


@dataclasses.dataclass
class Media:
  """A request's media: a file on disk (`temporary` ones are deleted after `prepare`) or an
  uploaded image's bytes in memory (`data`; `path` is then its label)."""
  kind: str          # 'image' | 'video'
  path: str
  label: str         # how messages name it ('the uploaded image' or the client's path)
  temporary: bool = False
  data: bytes | None = None


def resolve_path(media_root: str, url: str, param: str) -> str:
  """A client path (relative to `media_root`, or absolute / file:// inside it) -> a real
  file path; refuses anything that resolves outside the root (.., symlinks)."""
  if not media_root:
    raise InputError("file paths are not accepted: the server has no media root "
                     "(config.serve.media_root); send the file as a data: URI",
                     code="media_root_unset", param=param)
  p = url[len("file://"):] if url.startswith("file://") else url
  root = os.path.realpath(media_root)
  full = os.path.realpath(os.path.join(root, p))
  if os.path.commonpath([root, full]) != root:
    raise InputError(f"{url}: outside the media root", code="path_outside_media_root",
                     param=param, status=403)
  if not os.path.isfile(full):
    raise InputError(f"{url}: no such file under the media root", code="file_not_found",
                     param=param, status=404)
  return full


def decode_data_uri(url: str, *, max_bytes: int, param: str) -> tuple[str, bytes]:
  """(mime type, bytes) of a base64 `data:` URI; InputError if malformed or too large."""
  m = _DATA_URI.match(url)
  if not m or not m.group(3):
    raise InputError("a data URI must look like data:<mime>;base64,<data>",
                     code="invalid_data_uri", param=param)
  payload = url[m.end():]
  if len(payload) * 3 // 4 > max_bytes:
    raise InputError(f"the upload exceeds config.serve.max_upload_bytes={max_bytes}",
                     code="upload_too_large", param=param, status=413)
  try:
    data = base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError):
    raise InputError("the data URI is not valid base64", code="invalid_data_uri",
                     param=param) from None
  return (m.group(1) or "").lower(), data


def media_from_url(url: str, *, media_root: str, max_bytes: int, tmp_dir: str,
                   param: str) -> Media:
  """An `image_url` / `video_url` value -> Media (a temp file for data URIs)."""
  if not isinstance(url, str) or not url:
    raise InputError("the url must be a non-empty string", code="invalid_url", param=param)
  if url.startswith(("http://", "https://")):
    raise InputError("remote URLs are not fetched; send a data: URI or a path under the "
                     "media root", code="remote_url", param=param)
  if url.startswith("data:"):
    mime, data = decode_data_uri(url, max_bytes=max_bytes, param=param)
    if mime in IMAGE_MIME:
      kind, ext = "image", IMAGE_MIME[mime]
    elif mime in VIDEO_MIME:
      kind, ext = "video", VIDEO_MIME[mime]
    else:
      raise InputError(f"unsupported media type {mime or '(none)'!r}; images: "
                       f"{', '.join(IMAGE_MIME)}; videos: {', '.join(VIDEO_MIME)}",
                       code="unsupported_media_type", param=param, status=415)
    if kind == "image":   # decoded from memory; a video goes to a file for the demuxer
      return Media(kind, "the uploaded image", "the uploaded image", data=data)
    fd, path = tempfile.mkstemp(suffix=ext, prefix="upload_", dir=tmp_dir)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    return Media(kind, path, f"the uploaded {kind}", temporary=True)
  path = resolve_path(media_root, url, param)
  if os.path.getsize(path) > max_bytes:
    raise InputError(f"{url}: larger than config.serve.max_upload_bytes={max_bytes}",
                     code="upload_too_large", param=param, status=413)
  try:
    kind = predict_lib.media_kind(path)
  except predict_lib.PredictError as e:
    raise InputError(str(e).replace(path, url), code="unreadable_media", param=param) from None
  return Media(kind, path, url)


def load_windows(media: Media, predict_cfg, num_frames: int, max_video_frames: int,
                 param: str) -> list[tuple[float, float, np.ndarray]]:
  """[(start_s, end_s, uint8 frames [F, H, W, 3])] as `--mode=predict` cuts them, after the
  face check of `predict_cfg.face_mode`. InputError for anything unusable."""
  try:
    return predict_lib.decode_windows(media.path, media.kind, predict_cfg, num_frames,
                                      max_video_frames, data=media.data)
  except predict_lib.PredictError as e:
    status = 413 if e.reason == "video_too_long" else 400
    raise InputError(str(e).replace(media.path, media.label), code=e.reason, param=param,
                     status=status) from None


# ------------------------------------------------------------------------------- requests


@dataclasses.dataclass
class Request:
  """A prepared request: examples built, settings checked."""
  gen_example: dict
  score_examples: list[dict]                # per window: the category prompt
  windows: list[tuple[float, float]]
  kind: str
  question: str
  n: int
  max_tokens: int
  temperature: float
  top_p: float
  prompt_tokens: int
  future: concurrent.futures.Future = dataclasses.field(
      default_factory=concurrent.futures.Future)
  cancelled: bool = False
  enqueued: float = 0.0


@dataclasses.dataclass
class Result:
  answers: list[str]
  answer_ids: list[list[int]]
  finish_reasons: list[str]
  prompt_tokens: int
  emotion: str
  probability: float
  probs: dict[str, float]
  timeline: list[dict] | None
  batch_rows: int                            # generated rows in the batch it ran in


def serve_config(config):
  """config.serve with defaults filled from the data / predict sections."""
  s = config.serve
  lengths = tuple(s.length_buckets) or tuple(config.data.pipeline.bucket_lengths)
  return dict(
      model_name=s.model_name, media_root=s.media_root,
      max_upload_bytes=int(s.max_upload_bytes), max_video_frames=int(s.max_video_frames),
      max_prompt_tokens=int(s.max_prompt_tokens) or max(lengths),
      max_queue=int(s.max_queue), request_timeout_s=float(s.request_timeout_s),
      max_wait_ms=float(s.max_wait_ms), batch_buckets=tuple(sorted(s.batch_buckets)),
      score_buckets=tuple(sorted(s.score_buckets)), length_buckets=tuple(sorted(lengths)),
      max_tokens=int(s.max_tokens), max_n=int(s.max_n), warmup=bool(s.warmup),
      prepare_concurrency=int(s.prepare_concurrency),
      opencv_threads=int(s.opencv_threads))


def check_serve_config(s: dict) -> None:
  """ValueError (one line) for a setting the server cannot run with."""
  def need(ok: bool, what: str) -> None:
    if not ok:
      raise ValueError(f"config.serve.{what}")
  for k in ("max_upload_bytes", "max_video_frames", "max_prompt_tokens", "max_queue",
            "max_tokens", "max_n", "prepare_concurrency"):
    need(s[k] >= 1, f"{k}={s[k]} must be at least 1")
  need(s["request_timeout_s"] > 0, f"request_timeout_s={s['request_timeout_s']} must be > 0")
  need(s["max_wait_ms"] >= 0, f"max_wait_ms={s['max_wait_ms']} must be >= 0")
  need(s["opencv_threads"] >= 0, f"opencv_threads={s['opencv_threads']} must be >= 0 "
       "(0 = OpenCV's default)")
  for k in ("batch_buckets", "score_buckets", "length_buckets"):
    need(bool(s[k]) and min(s[k]) >= 1 and len(set(s[k])) == len(s[k]),
         f"{k}={s[k]} must be distinct positive sizes")
  need(s["max_n"] <= s["batch_buckets"][-1],
       f"max_n={s['max_n']} exceeds the largest batch bucket {s['batch_buckets'][-1]}")
  need(s["max_prompt_tokens"] <= s["length_buckets"][-1],
       f"max_prompt_tokens={s['max_prompt_tokens']} exceeds the largest length bucket "
       f"{s['length_buckets'][-1]}")


class Engine:
  """The model, its tokenizers and example builder, the compiled programs, the queue."""

  def __init__(self, config, workdir: str, *, bundle: str | None = None, start: bool = True):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.s = serve_config(config)
    check_serve_config(self.s)
    cache = config.serve.compilation_cache_dir or os.path.join(self.workdir, "jax_cache")
    if cache != "none":
      apply_compilation_cache(cache)
    t0 = time.perf_counter()
    if bundle:
      bdir = os.path.join(bundle, "bundle") if os.path.isdir(os.path.join(bundle, "bundle")) \
          else bundle
      model = bundle_lib.load_bundle(bdir)
      tdir = os.path.join(bundle, "tokenizer")
      paths = {"tokenizer": config.data.tokenizer or os.path.join(tdir, "tokenizer.model"),
               "qformer_vocab": config.data.qformer_vocab or os.path.join(tdir, "vocab.txt")}
      for k, p in paths.items():
        if not os.path.exists(p):
          raise FileNotFoundError(f"{p} not found: the bundle's tokenizer ({k}); set "
                                  f"config.data.{'tokenizer' if k == 'tokenizer' else k}")
      self.step = None
    else:
      _, model, self.step = loop.restore_trained(config, workdir)
      paths = task_lib.prepare_data(config, workdir)
    self.load_s = time.perf_counter() - t0
    self.tok, qtok = task_lib.tokenizers(paths)
    self.model_cfg = model.config
    self.pcfg = task_lib.pipeline_config(
        config, self.model_cfg, shuffle=False, shuffle_options=False, face_mode="aligned",
        max_length=max(self.s["length_buckets"]), bucket_lengths=self.s["length_buckets"])
    self.builder = pipeline_lib.ExampleBuilder(self.pcfg, self.tok, qtok, strict=True)
    self.classes = labels_lib.classes(config.predict.dataset)
    self.predict_cfg = config.predict
    self.max_new = self.s["max_tokens"]
    graphdef, self.state = nnx.split(model)
    self.graphdef = graphdef
    # Each class's answer tokens (as the template tokenizes an answer: the word, then EOS),
    # right-padded to the longest: [C, A] ids and mask.
    answers = [self.tok.encode(c) + [self.tok.eos_id] for c in self.classes]
    a = max(len(x) for x in answers)
    self.answer_ids = np.asarray([x + [self.tok.pad_id] * (a - len(x)) for x in answers],
                                 np.int32)
    self.answer_mask = np.asarray([[1] * len(x) + [0] * (a - len(x)) for x in answers],
                                  np.int32)
    eos, pad, max_new = self.tok.eos_id, self.tok.pad_id, self.max_new

    @functools.partial(jax.jit, compiler_options=generation.decode_compiler_options())
    def gen(state, batch, rows, rng):
      m = nnx.merge(graphdef, state)
      embeds, mask = m.embed_multimodal(batch)
      return generation.generate(m.language_model, inputs_embeds=embeds, attention_mask=mask,
                                 max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad,
                                 rows=rows, rng=rng)

    @jax.jit
    def option_logp(state, batch, ans_ids, ans_mask):
      """Summed log-likelihood [B, C] of each answer [C, A] after each prompt row."""
      m = nnx.merge(graphdef, state)
      lm = m.language_model
      embeds, mask = m.embed_multimodal(batch)
      b, t = mask.shape
      c, a = ans_ids.shape
      cache = lm.init_cache(b, t + a)
      last, cache = lm(inputs_embeds=embeds, attention_mask=mask, cache=cache,
                       logits_to_keep=1)
      cache = {"k": jnp.repeat(cache["k"], c, axis=1), "v": jnp.repeat(cache["v"], c, axis=1),
               "index": cache["index"], "mask": jnp.repeat(cache["mask"], c, axis=0),
               "positions": jnp.repeat(cache["positions"], c, axis=0)}
      ids = jnp.tile(ans_ids, (b, 1))                         # [B*C, A], row = (prompt, class)
      am = jnp.tile(ans_mask, (b, 1)).astype(jnp.float32)
      logits, _ = lm(ids, attention_mask=jnp.tile(ans_mask, (b, 1)), cache=cache)
      # Token 0 is predicted by the prompt's last position, token j > 0 by answer token j-1.
      pred = jnp.concatenate([jnp.repeat(last, c, axis=0), logits[:, :-1]], axis=1)
      logp = jax.nn.log_softmax(pred.astype(jnp.float32), axis=-1)
      tok = jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]
      return (tok * am).sum(-1).reshape(b, c)

    self._gen = gen
    self._option_logp = option_logp
    self._rng_counter = 0
    self._tmp = tempfile.mkdtemp(prefix="emo_serve_")
    self._cv = threading.Condition()
    self._pending: collections.deque[Request] = collections.deque()
    self._preparing = 0
    self._stop = False
    self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "compiles": 0}
    self._compiled: set = set()
    self.warmup_s = 0.0
    if self.s["warmup"]:
      t0 = time.perf_counter()
      self.warmup()
      self.warmup_s = time.perf_counter() - t0
    self._worker = threading.Thread(target=self._loop, name="emo-serve-batcher", daemon=True)
    if start:
      self._worker.start()

  # ---------------------------------------------------------------------------- prompts

  def category_question(self, kind: str) -> str:
    return instructions_lib.QUESTION_TEMPLATE.format(
        media=instructions_lib.media_word(kind), options=", ".join(self.classes))

  def _example(self, frames: np.ndarray, kind: str, turns: Sequence[dict], param: str) -> dict:
    rec = Record(dataset=self.predict_cfg.dataset, split="test", id="request", media="request",
                 media_type=kind, conversations=tuple(turns))
    try:
      return self.builder(dict(record=rec, frames=frames), np.random.default_rng(0))
    except (BadInputError, ValueError) as e:
      raise InputError(f"cannot build the model input: {e}", code="invalid_prompt",
                       param=param) from None

  def _prompt_length(self, turns: Sequence[dict]) -> int:
    t = template_lib.tokenize_conversation(
        turns, self.tok, num_visual_slots=self.pcfg.num_visual_slots, max_length=1 << 30,
        template=self.builder.template)
    return len(t.input_ids)

  def _check_settings(self, n, max_tokens, temperature, top_p) -> None:
    if not 1 <= n <= self.s["max_n"]:
      raise InputError(f"n must be between 1 and {self.s['max_n']} (config.serve.max_n)",
                       code="invalid_n", param="n")
    if max_tokens is not None and not 1 <= max_tokens <= self.max_new:
      raise InputError(f"max_tokens must be between 1 and {self.max_new} "
                       "(config.serve.max_tokens)", code="invalid_max_tokens",
                       param="max_tokens")
    if not 0.0 <= temperature <= 2.0:
      raise InputError("temperature must be between 0 and 2", code="invalid_temperature",
                       param="temperature")
    if not 0.0 < top_p <= 1.0:
      raise InputError("top_p must be in (0, 1]", code="invalid_top_p", param="top_p")

  def prepare(self, turns: Sequence[dict], media: Media, **settings) -> Request:
    """Checks settings, decodes the media, builds the examples (InputError if unusable).

    `turns`: LLaVA-style [{'from': 'human' | 'gpt', 'value': text}, ...] ending with a human
    turn; the first gets the media placeholder here. Empty first question: the category
    question over the classes of config.predict.dataset. Settings: n, max_tokens,
    temperature, top_p.

    While requests are being prepared, the batcher waits (up to max_wait_ms) for them to
    join the next batch; with none in preparation it runs what is queued at once."""
    with self._cv:
      self._preparing += 1
    try:
      return self._prepare(turns, media, **settings)
    finally:
      with self._cv:
        self._preparing -= 1
        self._cv.notify_all()

  def _prepare(self, turns: Sequence[dict], media: Media, *, n: int = 1,
               max_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0
               ) -> Request:
    try:
      self._check_settings(n, max_tokens, temperature, top_p)
      if not turns or turns[-1]["from"] != "human":
        raise InputError("the last message must be the user's", code="invalid_messages",
                         param="messages")
      cat_q = self.category_question(media.kind)
      turns = [dict(t) for t in turns]
      question = turns[0]["value"].strip() or cat_q
      turns[0]["value"] = "<image>\n" + question
      n_prompt = self._prompt_length(turns)
      if n_prompt > self.s["max_prompt_tokens"]:
        raise InputError(f"the prompt has {n_prompt} tokens (visual slots included), more "
                         f"than config.serve.max_prompt_tokens={self.s['max_prompt_tokens']}",
                         code="prompt_too_long", param="messages")
      windows = load_windows(media, self.predict_cfg, self.pcfg.num_frames,
                             self.s["max_video_frames"], "messages")
    finally:
      if media.temporary and os.path.exists(media.path):
        os.unlink(media.path)
    max_tokens = self.max_new if max_tokens is None else max_tokens
    gen_frames = windows[0][2] if len(windows) == 1 else windows[len(windows) // 2][2]
    gen_ex = self._example(gen_frames, media.kind, turns, "messages")
    cat_turns = [{"from": "human", "value": "<image>\n" + cat_q}]
    score = [gen_ex if (len(windows) == 1 and turns == cat_turns) else
             self._example(frames, media.kind, cat_turns, "messages")
             for _, _, frames in windows]
    return Request(gen_example=gen_ex, score_examples=score,
                   windows=[(s, e) for s, e, _ in windows], kind=media.kind,
                   question=question if len(turns) == 1 else turns[-1]["value"], n=n,
                   max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                   prompt_tokens=n_prompt)

  # ------------------------------------------------------------------------------ queue

  def submit(self, req: Request) -> concurrent.futures.Future:
    with self._cv:
      if len(self._pending) >= self.s["max_queue"]:
        raise InputError(f"the server is busy: {len(self._pending)} requests queued "
                         f"(config.serve.max_queue={self.s['max_queue']}); retry later",
                         code="queue_full", status=429, type="server_busy")
      req.enqueued = time.perf_counter()
      self._pending.append(req)
      self._cv.notify_all()
    return req.future

  def queue_length(self) -> int:
    return len(self._pending)

  def close(self) -> None:
    import shutil
    with self._cv:
      self._stop = True
      self._cv.notify_all()
    if self._worker.is_alive():
      self._worker.join(timeout=30)
    shutil.rmtree(self._tmp, ignore_errors=True)

  def _take_batch(self) -> list[Request] | None:
    with self._cv:
      while not self._pending and not self._stop:
        self._cv.wait()
      if self._stop:
        return None
      batch = [self._pending.popleft()]
      rows = batch[0].n
      deadline = time.perf_counter() + self.s["max_wait_ms"] / 1000
      while rows < self.s["batch_buckets"][-1]:
        if not self._pending:
          left = deadline - time.perf_counter()
          if left <= 0 or self._stop or not self._preparing:
            break
          self._cv.wait(timeout=left)
          continue
        if rows + self._pending[0].n > self.s["batch_buckets"][-1]:
          break
        nxt = self._pending.popleft()
        batch.append(nxt)
        rows += nxt.n
    return [r for r in batch if not r.cancelled]

  def _loop(self) -> None:
    while True:
      batch = self._take_batch()
      if batch is None:
        return
      if not batch:
        continue
      try:
        results = self.run_batch(batch)
        for r, res in zip(batch, results):
          r.future.set_result(res)
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("serve: a batch of %d requests failed", len(batch))
        for r in batch:
          if not r.future.done():
            r.future.set_exception(e)

  # ---------------------------------------------------------------------------- running

  def _bucket(self, n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
      if n <= b:
        return b
    raise ValueError(f"{n} rows exceed the largest bucket {buckets[-1]}")

  def _length_bucket(self, ex: dict) -> int:
    return pipeline_lib.bucket_length(len(ex["input_ids"]), self.s["length_buckets"])

  def _generate(self, rows: list[tuple[dict, float, float, int]]) -> np.ndarray:
    """Token ids [len(rows), max_tokens] for rows of one length bucket (<= largest batch
    bucket), padded to a batch bucket."""
    import jax
    size = self._bucket(len(rows), self.s["batch_buckets"])
    length = self._length_bucket(rows[0][0])
    batch = eval_lib.collate([r[0] for r in rows], size, [length], self.tok.pad_id)
    pad = size - len(rows)
    rs = generation.RowSampling(
        temperature=np.asarray([r[1] for r in rows] + [0.0] * pad, np.float32),
        top_p=np.asarray([r[2] for r in rows] + [1.0] * pad, np.float32),
        max_new_tokens=np.asarray([r[3] for r in rows] + [1] * pad, np.int32))
    self._rng_counter += 1
    self._note_compile(("gen", size, length))
    out = self._gen(self.state, task_lib.model_batch(eval_lib.left_pad(batch)), rs,
                    jax.random.key(self._rng_counter))
    return np.asarray(out)[:len(rows)]

  def _score(self, exs: list[dict]) -> np.ndarray:
    """Class log-likelihoods [len(exs), C] after category prompts of one length bucket,
    rows padded to a score bucket."""
    size = self._bucket(len(exs), self.s["score_buckets"])
    length = self._length_bucket(exs[0])
    self._note_compile(("score", size, length))
    batch = eval_lib.collate(exs, size, [length], self.tok.pad_id)
    out = self._option_logp(self.state, task_lib.model_batch(eval_lib.left_pad(batch)),
                            self.answer_ids, self.answer_mask)
    return np.asarray(out)[:len(exs)]

  def _note_compile(self, key) -> None:
    if key not in self._compiled:
      self._compiled.add(key)
      self.stats["compiles"] += 1

  @staticmethod
  def _chunks(items: list, key, buckets: Sequence[int]):
    """Items grouped by `key` (the length bucket), each group cut into calls whose row
    counts are batch buckets: the largest bucket that fits, or the remainder padded up to
    a bucket when that pads at most a third of the rows (padding rows cost compute too)."""
    groups: dict[int, list] = {}
    for it in items:
      groups.setdefault(key(it), []).append(it)
    for _, g in sorted(groups.items()):
      s = 0
      while s < len(g):
        left = len(g) - s
        up = next((b for b in buckets if b >= left), buckets[-1])
        down = max([b for b in buckets if b <= left], default=left)
        take = min(left, up) if up - left <= left / 3 else down
        yield g[s:s + take]
        s += take

  def run_batch(self, batch: Sequence[Request]) -> list[Result]:
    """Runs requests together (any number: rows are chunked to the buckets)."""
    # Generation rows: (example, temperature, top_p, max_tokens, request index).
    gen_rows = [(r.gen_example, r.temperature, r.top_p, r.max_tokens, i)
                for i, r in enumerate(batch) for _ in range(r.n)]
    gen_out: dict[int, list[list[int]]] = {i: [] for i in range(len(batch))}
    for chunk in self._chunks(gen_rows, lambda x: self._length_bucket(x[0]),
                              self.s["batch_buckets"]):
      ids = self._generate([c[:4] for c in chunk])
      for c, row in zip(chunk, ids):
        gen_out[c[4]].append(row[:c[3]].tolist())
    # Score rows: (category prompt, request, window) -> log-likelihood of every class.
    score_rows = [(ex, i, w) for i, r in enumerate(batch)
                  for w, ex in enumerate(r.score_examples)]
    lp: dict[tuple[int, int], np.ndarray] = {}
    for chunk in self._chunks(score_rows, lambda x: self._length_bucket(x[0]),
                              self.s["score_buckets"]):
      for c, v in zip(chunk, self._score([c[0] for c in chunk])):
        lp[c[1:]] = v
    self.stats["batches"] += 1
    self.stats["requests"] += len(batch)
    self.stats["largest_batch"] = max(self.stats["largest_batch"], len(gen_rows))
    out = []
    for i, r in enumerate(batch):
      timeline = []
      for w, (start, end) in enumerate(r.windows):
        v = np.asarray(lp[(i, w)], np.float64)
        p = np.exp(v - v.max())
        p = p / p.sum()
        k = int(np.argmax(p))
        timeline.append({"start": round(start, 3), "end": round(end, 3),
                         "emotion": self.classes[k], "probability": float(p[k]),
                         "probs": {c: float(x) for c, x in zip(self.classes, p)}})
      mean_p = np.mean([[w["probs"][c] for c in self.classes] for w in timeline], axis=0)
      k = int(np.argmax(mean_p))
      answers, ids_out, reasons = [], [], []
      for ids in gen_out[i]:
        if self.tok.eos_id in ids:
          ids = ids[:ids.index(self.tok.eos_id)]
          reasons.append("stop")
        else:
          reasons.append("length")
        ids = [t for t in ids if t >= 0]
        ids_out.append(ids)
        answers.append(self.tok.decode(ids).strip())
      out.append(Result(answers=answers, answer_ids=ids_out, finish_reasons=reasons,
                        prompt_tokens=r.prompt_tokens, emotion=self.classes[k],
                        probability=float(mean_p[k]),
                        probs={c: float(x) for c, x in zip(self.classes, mean_p)},
                        timeline=timeline if r.kind == "video" else None,
                        batch_rows=len(gen_rows)))
    return out

  def decode_prefixes(self, ids: Sequence[int]) -> list[str]:
    """The text after each token (for streaming deltas)."""
    return [self.tok.decode(list(ids[:k + 1])).strip() for k in range(len(ids))]

  def warmup(self) -> None:
    """Compiles every (batch bucket, length bucket) program now, on a blank image."""
    frames = np.zeros((1, 8, 8, 3), np.uint8)
    for length in self.s["length_buckets"]:
      turns = [{"from": "human", "value": "<image>\n" + self.category_question("image")}]
      ex = self._example(frames, "image", turns, "warmup")
      if len(ex["input_ids"]) > length:
        continue     # no prompt this short exists
      for size in self.s["batch_buckets"]:
        self._generate_fixed(ex, size, length)
      for size in self.s["score_buckets"]:
        self._score([ex] * size)

  def _generate_fixed(self, ex: dict, size: int, length: int) -> None:
    import jax
    batch = eval_lib.collate([ex], size, [length], self.tok.pad_id)
    rs = generation.RowSampling(temperature=np.zeros(size, np.float32),
                                top_p=np.ones(size, np.float32),
                                max_new_tokens=np.ones(size, np.int32))
    self._note_compile(("gen", size, length))
    np.asarray(self._gen(self.state, task_lib.model_batch(eval_lib.left_pad(batch)), rs,
                         jax.random.key(0)))
