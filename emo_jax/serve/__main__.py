"""python -m emo_jax.serve --config=configs/default.py --workdir=./workdir [--bundle=<export>]

Loads the model once (the workdir's latest checkpoint, or an exported bundle directory:
`<export>/bundle` + `<export>/tokenizer`), compiles the serving programs (or reads them
from the compilation cache), and serves the API of emo_jax.serve.api (and the demo page at
/demo) with uvicorn on config.serve.host:config.serve.port (default 127.0.0.1:8000).
"""
from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<file>.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints; compilation cache).")
flags.DEFINE_string("bundle", None, "An export directory (bundle/ + tokenizer/) to serve "
                    "instead of the workdir's checkpoint.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  t0 = time.perf_counter()
  import uvicorn
  from emo_jax.serve import api, engine as engine_lib
  cfg = FLAGS.config
  from emo_jax.convert.safetensors_io import CheckpointError
  settings = engine_lib.serve_config(cfg)
  try:
    engine_lib.check_serve_config(settings)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if settings["opencv_threads"]:
    # Requests are prepared in parallel threads: OpenCV's own pool only contends with them.
    import cv2
    cv2.setNumThreads(settings["opencv_threads"])
  os.makedirs(FLAGS.workdir, exist_ok=True)
  try:
    eng = engine_lib.Engine(cfg, FLAGS.workdir, bundle=FLAGS.bundle)
  except (FileNotFoundError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  application = api.create_app(eng, demo=bool(cfg.serve.demo))
  ready = time.perf_counter() - t0
  logging.info("serve: model loaded in %.1fs, warm-up %.1fs, %d programs; ready after %.1fs",
               eng.load_s, eng.warmup_s, eng.stats["compiles"], ready)
  print(f"emo_jax.serve: ready in {ready:.1f}s on http://{cfg.serve.host}:{cfg.serve.port}",
        flush=True)
  try:
    uvicorn.run(application, host=cfg.serve.host, port=int(cfg.serve.port),
                log_level="warning")
  finally:
    eng.close()


if __name__ == "__main__":
  app.run(main)
