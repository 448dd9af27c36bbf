"""The HTTP API (FastAPI): OpenAI-compatible chat completions over the serving engine.

    POST /v1/chat/completions   OpenAI chat format; one image or video per conversation
    GET  /v1/models             the served model
    GET  /health                status, queue length, batching counters

A user message's content is a string or a list of parts: `{"type": "text", "text": ...}`,
`{"type": "image_url", "image_url": {"url": ...}}` and `{"type": "video_url",
"video_url": {"url": ...}}`, where the url is a base64 `data:` URI (its MIME type says
image or video) or a path under `config.serve.media_root` (relative, absolute or
`file://`; nothing outside the root is opened). The media goes in the first user message;
there is exactly one per conversation. Settings: `temperature` (default 0: greedy, unlike
OpenAI's 1), `top_p`, `max_tokens` (or `max_completion_tokens`), `n`, `stream` (server-sent
events: the answer is sent token by token once its batch has finished decoding). System
messages, tools, stop sequences and logprobs are refused rather than ignored.

Besides the OpenAI fields the response carries `emo`: {"emotion", "probability", "probs"
(class -> probability, option likelihood over the classes of config.predict.dataset),
"timeline" (videos: per-window {start, end, emotion, probability, probs}) }.

Every refusal is a 4xx (5xx for server faults) with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`; the server keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from emo_jax.serve.engine import Engine, InputError, media_from_url

REFUSED_FIELDS = ("tools", "tool_choice", "functions", "function_call", "stop",
                  "response_format", "logit_bias", "audio", "modalities", "prediction")


def error_body(message: str, type: str = "invalid_request_error",  # pylint: disable=redefined-builtin
               param: str | None = None, code: str | None = None) -> dict:
  return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _number(body: dict, key: str, default, kind):
  v = body.get(key, default)
  if v is None:
    v = default
  if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
    raise InputError(f"{key} must be an integer", code="invalid_type", param=key)
  if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
    raise InputError(f"{key} must be a number", code="invalid_type", param=key)
  return v


def parse_messages(messages: Any, engine: Engine) -> tuple[list[dict], Any]:
  """OpenAI messages -> (LLaVA turns, Media). InputError for anything else (an uploaded
  file written before the error is removed)."""
  found: list = []
  try:
    return _parse_messages(messages, engine, found)
  except InputError:
    for m in found:
      if m.temporary and os.path.exists(m.path):
        os.unlink(m.path)
    raise


def _parse_messages(messages: Any, engine: Engine, found: list) -> tuple[list[dict], Any]:
  if not isinstance(messages, list) or not messages:
    raise InputError("messages must be a non-empty list", code="invalid_messages",
                     param="messages")
  turns, media = [], None
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(m, dict):
      raise InputError(f"{where} must be an object", code="invalid_messages", param=where)
    role, content = m.get("role"), m.get("content")
    if role not in ("user", "assistant"):
      raise InputError(f"{where}: role {role!r} is not supported (user and assistant "
                       "turns only; the model's template has its own system prompt)",
                       code="unsupported_role", param=f"{where}.role")
    texts = []
    if isinstance(content, str):
      texts.append(content)
    elif isinstance(content, list):
      for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
          texts.append(part["text"])
        elif kind in ("image_url", "video_url"):
          if role != "user" or turns:
            raise InputError(f"{pw}: the image or video must be in the first user message",
                             code="invalid_messages", param=pw)
          if media is not None:
            raise InputError(f"{pw}: one image or video per conversation",
                             code="too_many_media", param=pw)
          ref = part.get(kind)
          url = ref.get("url") if isinstance(ref, dict) else ref
          media = media_from_url(url, media_root=engine.s["media_root"],
                                 max_bytes=engine.s["max_upload_bytes"],
                                 tmp_dir=engine._tmp, param=pw)  # pylint: disable=protected-access
          found.append(media)
        else:
          raise InputError(f"{pw}: unsupported content part (text, image_url, video_url)",
                           code="invalid_content", param=pw)
    else:
      raise InputError(f"{where}.content must be a string or a list of parts",
                       code="invalid_content", param=f"{where}.content")
    want = "user" if len(turns) % 2 == 0 else "assistant"
    if role != want:
      raise InputError(f"{where}: expected a {want} message (turns alternate, starting "
                       "with the user)", code="invalid_messages", param=where)
    turns.append({"from": "human" if role == "user" else "gpt", "value": "\n".join(texts)})
  if media is None:
    raise InputError("the first user message needs an image_url or video_url part (the "
                     "model answers about a face)", code="missing_media", param="messages")
  return turns, media


def create_app(engine: Engine, *, demo: bool = False) -> FastAPI:
  app = FastAPI(title="emo_jax", version="1")
  model_name = engine.s["model_name"]
  created = int(time.time())
  # A data URI is base64 (4/3 the bytes) inside JSON: leave room for that and the text.
  max_body = engine.s["max_upload_bytes"] * 4 // 3 + (1 << 20)
  preparing = asyncio.Semaphore(engine.s["prepare_concurrency"])

  @app.exception_handler(InputError)
  async def _input_error(_, e: InputError):
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(_, e):
    return JSONResponse(error_body(str(e.detail), "invalid_request_error", None,
                                   "not_found" if e.status_code == 404 else str(e.status_code)),
                        status_code=e.status_code)

  @app.exception_handler(RequestValidationError)
  async def _validation_error(_, e):
    return JSONResponse(error_body(f"invalid request: {e.errors()}", code="invalid_request"),
                        status_code=400)

  @app.exception_handler(Exception)
  async def _server_error(_, e):
    return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error",
                                   None, "internal_error"), status_code=500)

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model_name, "queue": engine.queue_length(),
            **engine.stats}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model",
                                        "created": created, "owned_by": "emo_jax"}]}

  async def read_body(request: Request) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
      raise InputError(f"the request body ({declared} bytes) exceeds the limit of {max_body} "
                       "bytes (config.serve.max_upload_bytes)", code="upload_too_large",
                       status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
      size += len(chunk)
      if size > max_body:
        raise InputError(f"the request body exceeds the limit of {max_body} bytes "
                         "(config.serve.max_upload_bytes)", code="upload_too_large",
                         status=413)
      chunks.append(chunk)
    try:
      body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise InputError(f"the request body is not valid JSON ({e})", code="invalid_json") \
          from None
    if not isinstance(body, dict):
      raise InputError("the request body must be a JSON object", code="invalid_json")
    return body

  @app.post("/v1/chat/completions")
  async def chat(request: Request):
    body = await read_body(request)
    if body.get("model") not in (None, model_name):
      raise InputError(f"the model {body.get('model')!r} does not exist; this server serves "
                       f"{model_name!r}", code="model_not_found", param="model", status=404)
    for k in REFUSED_FIELDS:
      if body.get(k) not in (None, [], False):
        raise InputError(f"{k} is not supported by this server", code="unsupported_parameter",
                         param=k)
    if body.get("logprobs"):
      raise InputError("logprobs is not supported by this server",
                       code="unsupported_parameter", param="logprobs")
    n = _number(body, "n", 1, int)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
      max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, int)
    temperature = float(_number(body, "temperature", 0.0, float))
    top_p = float(_number(body, "top_p", 1.0, float))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
      raise InputError("stream must be a boolean", code="invalid_type", param="stream")
    turns, media = parse_messages(body.get("messages"), engine)
    async with preparing:   # decoding and tokenizing take CPU from the model: a few at once
      req = await run_in_threadpool(engine.prepare, turns, media, n=n,
                                    max_tokens=max_tokens, temperature=temperature,
                                    top_p=top_p)
    fut = engine.submit(req)
    try:
      res = await asyncio.wait_for(asyncio.wrap_future(fut), engine.s["request_timeout_s"])
    except asyncio.TimeoutError:
      req.cancelled = True
      raise InputError(f"the request took longer than config.serve.request_timeout_s="
                       f"{engine.s['request_timeout_s']}", code="timeout", status=504,
                       type="timeout") from None
    rid = "chatcmpl-" + uuid.uuid4().hex
    now = int(time.time())
    emo = {"emotion": res.emotion, "probability": res.probability, "probs": res.probs,
           "timeline": res.timeline, "question": req.question}
    usage = {"prompt_tokens": res.prompt_tokens,
             "completion_tokens": sum(len(a) for a in res.answer_ids),
             "total_tokens": res.prompt_tokens + sum(len(a) for a in res.answer_ids)}
    if not stream:
      return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
              "choices": [{"index": i, "message": {"role": "assistant", "content": a},
                           "finish_reason": f, "logprobs": None}
                          for i, (a, f) in enumerate(zip(res.answers, res.finish_reasons))],
              "usage": usage, "emo": emo}

    def chunk(choices, **extra) -> str:
      return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk",
                                    "created": now, "model": model_name, "choices": choices,
                                    **extra}) + "\n\n"

    def events():
      for i, ids in enumerate(res.answer_ids):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                      "finish_reason": None}])
        answer, sent = res.answers[i], ""
        # Token by token; a prefix whose text is not a prefix of the answer (a multi-byte
        # character split over tokens) waits for the next token.
        for text in engine.decode_prefixes(ids) + [answer]:
          if len(text) > len(sent) and answer.startswith(text):
            yield chunk([{"index": i, "delta": {"content": text[len(sent):]},
                          "finish_reason": None}])
            sent = text
        yield chunk([{"index": i, "delta": {}, "finish_reason": res.finish_reasons[i]}])
      yield chunk([], usage=usage, emo=emo)
      yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")

  if demo:
    from emo_jax.serve import demo as demo_lib
    app = demo_lib.mount(app, engine)
  return app
