"""Serving throughput and latency: `python -m emo_jax.serve` under 1, 4 and 16 concurrent
clients vs sequential predict-style calls with the model already loaded; cold start with an
empty and with a warm compilation cache. Writes benchmarks/results/serve.{json,md}.

The model is the tiny default (configs/default.py; the `test` preset only shrinks the
synthetic data set that trains the tokenizers), random weights exported as a bundle, or a
trained workdir's checkpoint with --workdir. Every request is one synthetic face image
(PNG data URI) with the user's question, greedy, max_tokens = config.predict.max_new_tokens;
it gets the answer and the class probabilities (option likelihood over 7 classes).

Sequential baselines, in this process, the model loaded once:
- `engine, one at a time`: the serving engine's compiled programs, one request per call
  (prepare + run_batch of one, no HTTP): what a loop over inputs costs without batching.
- `predict.predict(model=...)`: today's one-file predict function called per input; it
  builds its jitted functions anew each call, so every call compiles (a few calls only).
Server levels: C client threads each send requests back to back over HTTP (127.0.0.1)
until the level's request count is done; requests/s = count / wall time.

  python benchmarks/bench_serve.py                 # the measurements in the README
  python benchmarks/bench_serve.py --quick         # a smoke run
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
  sys.path[0] = _REPO

import numpy as np  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
QUESTION = "How does this person feel?"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _faces(n: int, out_dir: str) -> list[str]:
  from PIL import Image
  from input_pipeline import media, synthetic
  paths, i = [], 0
  while len(paths) < n:
    label = synthetic.CLASSES[i % len(synthetic.CLASSES)]
    img = synthetic.make_image(i, label, size=112)
    if media.detect_faces(img):
      p = os.path.join(out_dir, f"face{len(paths)}.png")
      Image.fromarray(img).save(p)
      paths.append(p)
    i += 1
  return paths


def _body(path: str, max_tokens: int) -> bytes:
  with open(path, "rb") as f:
    uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
  return json.dumps({"model": "emo-llama", "max_tokens": max_tokens, "messages": [
      {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                   {"type": "image_url", "image_url": {"url": uri}}]}]}).encode()


def _post(url: str, body: bytes) -> dict:
  req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=600) as r:
    return json.load(r)


def _start_server(args, root, port, cache_dir, log_path):
  env = dict(os.environ, PYTHONPATH=_REPO, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "emo_jax.serve", f"--config={args.config}",
         f"--workdir={args.workdir or os.path.join(root, 'wd')}",
         f"--config.data.root={os.path.join(root, 'data')}", f"--config.serve.port={port}",
         f"--config.serve.compilation_cache_dir={cache_dir}", "--config.serve.demo=False"]
  if args.buckets:
    cmd += [f"--config.serve.batch_buckets=({args.buckets},)",
            f"--config.serve.score_buckets=({args.buckets},)"]
  if not args.workdir:
    cmd.append(f"--bundle={os.path.join(root, 'export')}")
  t0 = time.perf_counter()
  log = open(log_path, "w")
  proc = subprocess.Popen(cmd, cwd=_REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  while True:
    if proc.poll() is not None:
      raise RuntimeError("server exited: " + open(log_path).read()[-2000:])
    try:
      with urllib.request.urlopen(url + "/health", timeout=5) as r:
        if json.load(r)["status"] == "ok":
          return proc, url, time.perf_counter() - t0
    except OSError:
      time.sleep(0.5)


def _stop(proc):
  proc.terminate()
  try:
    proc.wait(timeout=30)
  except subprocess.TimeoutExpired:
    proc.kill()


def _cpu_s(pid: int) -> float:
  """User + system CPU seconds of a process so far (all its threads)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _level(url: str, bodies: list[bytes], clients: int, count: int, pid: int) -> dict:
  lat: list[float] = []
  cpu0, load0 = _cpu_s(pid), os.getloadavg()[0]

  def worker(k: int):
    out = []
    for j in range(k, count, clients):
      t = time.perf_counter()
      _post(url, bodies[j % len(bodies)])
      out.append(time.perf_counter() - t)
    return out

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as ex:
    for r in ex.map(worker, range(clients)):
      lat += r
  wall = time.perf_counter() - t0
  cpu = _cpu_s(pid) - cpu0
  with urllib.request.urlopen(url + "/health") as r:
    health = json.load(r)
  return {"clients": clients, "requests": count, "wall_s": wall, "rps": count / wall,
          "server_cpu_ms_per_request": 1000 * cpu / count,
          "loadavg_1min": [load0, os.getloadavg()[0]],
          "p50_ms": 1000 * float(np.percentile(lat, 50)),
          "p95_ms": 1000 * float(np.percentile(lat, 95)), "health": health}


def _cpu_budget(eng, images: list[str], max_tokens: int, levels: list[dict]) -> dict:
  """Where a request's CPU time goes, measured in this process with the server's OpenCV
  setting: preparing it (image decode, face check, tokenizing) and the model's share of a
  batch of 1 and of the largest bucket. On C cores, a server whose only cost were these
  could answer at most C * 1000 / (prepare + model share) requests/s (HTTP free, nothing
  else running); the measured server CPU per request gives the bound with HTTP included."""
  import cv2
  from emo_jax.serve import engine as engine_lib
  threads = eng.s["opencv_threads"]
  before = cv2.getNumThreads()
  if threads:
    cv2.setNumThreads(threads)
  big = eng.s["batch_buckets"][-1]
  n = 2 * big
  try:
    c0 = time.process_time()
    reqs = [eng.prepare([{"from": "human", "value": QUESTION}],
                        engine_lib.Media("image", images[j % len(images)], "bench"),
                        max_tokens=max_tokens) for j in range(n)]
    prepare = 1000 * (time.process_time() - c0) / n
  finally:
    cv2.setNumThreads(before)
  model = {}
  for b in (1, big):
    eng.run_batch(reqs[:b])                      # compiles this bucket (untimed)
    c0 = time.process_time()
    for k in range(0, n, b):
      eng.run_batch(reqs[k:k + b])
    model[str(b)] = 1000 * (time.process_time() - c0) / n
  cores = os.cpu_count() or 1
  out = {"cores": cores, "opencv_threads": threads, "prepare_cpu_ms": prepare,
         "model_cpu_ms_per_request": model,
         "ceiling_rps_http_free": cores * 1000 / (prepare + model[str(big)])}
  if levels:
    top = max(levels, key=lambda lv: lv["clients"])
    out["ceiling_rps_with_http"] = cores * 1000 / top["server_cpu_ms_per_request"]
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/default.py:test")
  p.add_argument("--workdir", default="", help="a trained workdir (default: random bundle)")
  p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
  p.add_argument("--levels", default="1,4,16")
  p.add_argument("--sequential", type=int, default=24, help="engine one-at-a-time calls")
  p.add_argument("--predict_calls", type=int, default=3)
  p.add_argument("--buckets", default="", help="batch and score buckets, e.g. 1,4,16 "
                 "(default: the config's)")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default=os.path.join(RESULTS, "serve"))
  args = p.parse_args(argv)
  if args.quick:
    args.requests, args.sequential, args.predict_calls, args.levels = 8, 4, 1, "1,4"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from ml_collections import config_flags  # noqa: F401  (the config file loader below)
  from absl import flags  # noqa: F401
  from emo_jax.convert import bundle
  from emo_jax.serve import engine as engine_lib
  from emo_jax.train import predict, task
  import importlib.util
  cfg_path, _, cfg_arg = args.config.partition(":")
  spec = importlib.util.spec_from_file_location("bench_cfg", os.path.join(_REPO, cfg_path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config(cfg_arg or None)
  root = tempfile.mkdtemp(prefix="bench_serve_")
  cfg.data.root = os.path.join(root, "data")
  if args.buckets:
    cfg.serve.batch_buckets = cfg.serve.score_buckets = tuple(
        int(x) for x in args.buckets.split(","))
  max_tokens = int(cfg.predict.max_new_tokens)
  if not args.workdir:
    paths = task.prepare_data(cfg, root)
    model = task.build_model(cfg)
    bundle.save_bundle(model, os.path.join(root, "export", "bundle"))
    os.makedirs(os.path.join(root, "export", "tokenizer"))
    for q in paths.values():
      shutil.copy(q, os.path.join(root, "export", "tokenizer"))
  images = _faces(16, root)
  bodies = [_body(q, max_tokens) for q in images]
  result = {"config": args.config, "buckets": list(cfg.serve.batch_buckets), "model": "trained workdir" if args.workdir else
            "random weights (bundle)", "max_tokens": max_tokens, "question": QUESTION,
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                     "python": platform.python_version()}}

  # Cold starts: an empty compilation cache, then the same cache again.
  cache = os.path.join(root, "jax_cache")
  starts = {}
  for name in ("empty_cache", "warm_cache"):
    proc, url, secs = _start_server(args, root, _free_port(), cache,
                                    os.path.join(root, f"server_{name}.log"))
    starts[name] = secs
    if name == "empty_cache":
      _stop(proc)
  result["cold_start_s"] = starts
  print(f"cold start: {starts}", flush=True)

  # Server under load (the warm-cache server).
  levels = []
  try:
    _post(url, bodies[0])
    for c in (int(x) for x in args.levels.split(",")):
      lv = _level(url, bodies, c, max(args.requests, c), proc.pid)
      print(f"{c:>2} clients: {lv['rps']:.2f} req/s, p50 {lv['p50_ms']:.0f} ms, "
            f"p95 {lv['p95_ms']:.0f} ms", flush=True)
      levels.append(lv)
  finally:
    _stop(proc)
  result["server"] = levels

  # Sequential baselines in this process, the model loaded once.
  # No persistent cache here (predict.predict below must compile as it does today) and no
  # warm-up of unused buckets: the untimed first call compiles what one-at-a-time uses.
  cfg.serve.compilation_cache_dir = "none"
  cfg.serve.warmup = False
  eng = engine_lib.Engine(cfg, root if not args.workdir else args.workdir,
                          bundle=None if args.workdir else os.path.join(root, "export"),
                          start=False)
  lat, cpu = [], 0.0
  load0 = os.getloadavg()[0]
  for j in range(args.sequential + 1):
    t, c0 = time.perf_counter(), time.process_time()
    media = engine_lib.Media("image", images[j % len(images)], "bench")
    req = eng.prepare([{"from": "human", "value": QUESTION}], media, max_tokens=max_tokens)
    eng.run_batch([req])
    if j:                              # the first call is a warm-up
      lat.append(time.perf_counter() - t)
      cpu += time.process_time() - c0
  result["sequential_engine"] = {"requests": len(lat), "rps": len(lat) / sum(lat),
                                 "cpu_ms_per_request": 1000 * cpu / len(lat),
                                 "loadavg_1min": [load0, os.getloadavg()[0]],
                                 "p50_ms": 1000 * float(np.percentile(lat, 50)),
                                 "p95_ms": 1000 * float(np.percentile(lat, 95))}
  print(f"sequential engine: {result['sequential_engine']}", flush=True)
  result["cpu_budget"] = _cpu_budget(eng, images, max_tokens, levels)
  print(f"CPU budget: {result['cpu_budget']}", flush=True)
  from flax import nnx
  m = nnx.merge(eng.graphdef, eng.state)
  lat = []
  for j in range(args.predict_calls):
    t = time.perf_counter()
    predict.predict(cfg, root, images[j % len(images)], question=QUESTION, model=m)
    lat.append(time.perf_counter() - t)
  result["sequential_predict"] = {"requests": len(lat), "rps": len(lat) / sum(lat),
                                  "p50_ms": 1000 * float(np.percentile(lat, 50))}
  print(f"sequential predict(): {result['sequential_predict']}", flush=True)
  base = result["sequential_engine"]["rps"]
  result["speedup_vs_sequential_engine"] = {str(lv["clients"]): lv["rps"] / base
                                            for lv in levels}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(_markdown(result))
  print(_markdown(result))
  shutil.rmtree(root, ignore_errors=True)
  return result


def _markdown(r: dict) -> str:
  lines = ["# Serving benchmark (benchmarks/bench_serve.py)", "",
           f"Config `{r['config']}` ({r['model']}), batch buckets {r['buckets']}, one "
           "synthetic face image per request, "
           f"greedy, max_tokens={r['max_tokens']}, answer + class probabilities. "
           f"CPU: {r['host']['cpus']} cores ({r['host']['machine']}).", "",
           "| how | clients | requests/s | p50 ms | p95 ms | x sequential engine | CPU ms / request "
           "| load avg |", "|---|---|---|---|---|---|---|---|"]
  se = r["sequential_engine"]
  sp = r["sequential_predict"]
  lines.append(f"| predict.predict(model=...) per input (compiles each call) | 1 | "
               f"{sp['rps']:.3f} | {sp['p50_ms']:.0f} | - | {sp['rps'] / se['rps']:.3f} | - | - |")
  lines.append(f"| engine, one request at a time (no HTTP) | 1 | {se['rps']:.2f} | "
               f"{se['p50_ms']:.0f} | {se['p95_ms']:.0f} | 1.00 | "
               f"{se['cpu_ms_per_request']:.1f} | {se['loadavg_1min'][0]:.0f} |")
  for lv in r["server"]:
    lines.append(f"| server (HTTP, batched) | {lv['clients']} | {lv['rps']:.2f} | "
                 f"{lv['p50_ms']:.0f} | {lv['p95_ms']:.0f} | "
                 f"{r['speedup_vs_sequential_engine'][str(lv['clients'])]:.2f} | "
                 f"{lv['server_cpu_ms_per_request']:.1f} | {lv['loadavg_1min'][0]:.0f} |")
  lines += ["", "CPU ms / request: CPU time of the serving process (all threads: HTTP, "
            "decoding, face detection, model) per request, or of this process for the "
            "sequential engine; less sensitive than wall time to other load on the machine "
            "(load avg: the 1-minute load average when the level started)."]
  cb = r.get("cpu_budget")
  if cb:
    seq = se["rps"]
    big = max(cb["model_cpu_ms_per_request"], key=int)
    lines += ["", f"Where a request's CPU goes (in process, OpenCV threads "
              f"{cb['opencv_threads'] or 'default'}): preparing it (decode, face check, "
              f"tokenize) {cb['prepare_cpu_ms']:.1f} ms; the model's share "
              f"{cb['model_cpu_ms_per_request']['1']:.1f} ms at batch 1, "
              f"{cb['model_cpu_ms_per_request'][big]:.1f} ms at batch {big}. "
              f"On {cb['cores']} cores a server spending only that could answer at most "
              f"{cb['ceiling_rps_http_free']:.0f} requests/s "
              f"({cb['ceiling_rps_http_free'] / seq:.2f}x the sequential engine) with HTTP "
              "free and no client on the machine"
              + (f"; with the measured server CPU per request at the largest level (HTTP "
                 f"included) at most {cb['ceiling_rps_with_http']:.0f} requests/s "
                 f"({cb['ceiling_rps_with_http'] / seq:.2f}x)"
                 if "ceiling_rps_with_http" in cb else "") + "."]
  cs = r["cold_start_s"]
  lines += ["", "Cold start (process start to /health answering, model load + compiling "
            "every bucket):", "",
            f"- empty compilation cache: {cs['empty_cache']:.1f} s",
            f"- warm compilation cache: {cs['warm_cache']:.1f} s", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
