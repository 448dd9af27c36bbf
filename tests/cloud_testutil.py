"""A local Google Cloud Storage for tests: `gcp-storage-emulator` on 127.0.0.1, and the
environment that points this project's storage clients at it.

Who talks to `gs://` in a run, and how each is pointed at the emulator:
- tensorstore (orbax's array data): `TENSORSTORE_GCS_HTTP_URL` (its documented endpoint
  override) and `GOOGLE_AUTH_TOKEN_FOR_TESTING` (a fixed bearer token instead of Google
  credentials).
- etils.epath (orbax's directories and metadata, grain's iterator state, everything of
  ours through input_pipeline.paths): epath's gs:// backend is tf.io.gfile when TensorFlow
  is installed. TensorFlow's GCS client cannot be pointed at an emulator: its endpoints
  (https://www.googleapis.com/storage/v1/ and /upload/storage/v1/) are compiled in and no
  environment variable overrides them (only retries, caches and timeouts are settable).
  So the tests switch epath to its fsspec backend (`EPATH_USE_TF=false`), i.e. gcsfs,
  which honours `STORAGE_EMULATOR_HOST`. What tf.io.gfile itself does against a bucket is
  therefore not covered here; it is what real runs use unless EPATH_USE_TF=false.
- TensorBoard events: written locally by tf.summary and uploaded by epath
  (emo_jax.train.writers), so no tf.io.gfile GCS call happens in a run at all.

The emulator runs from this file (`serve`), with two changes to gcp-storage-emulator made
at start-up: media downloads carry the `x-goog-generation` / `x-goog-metageneration`
headers real GCS sends (tensorstore's conditional writes read the generation from them
and fail with "Malformed StorageGeneration" without), and the in-memory store does not
re-serialise its whole object table after every write. With `EMULATOR_HOLD_FILE` set, a
request naming the text in that file waits while the file exists (a test's way to stop a
writer at a known point, e.g. before a checkpoint step).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

from ports import free_port

BUCKET = "bucket"


def client_env(url: str) -> dict[str, str]:
  """Environment variables that send every gs:// access of a process to `url`."""
  return {
      "STORAGE_EMULATOR_HOST": url,          # gcsfs (epath's fsspec backend)
      "TENSORSTORE_GCS_HTTP_URL": url,       # tensorstore (orbax array data)
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",   # tensorstore: no credential lookup
      "EPATH_USE_TF": "false",               # epath: gcsfs instead of tf.io.gfile
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-layout RPC
  }


class Emulator:
  """`python -m gcp_storage_emulator start` in memory, with `BUCKET` created."""

  def __init__(self, log_path: str, hold_file: str | None = None):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._log = open(log_path, "wb")
    env = dict(os.environ, **({"EMULATOR_HOLD_FILE": hold_file} if hold_file else {}))
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(self.port)],
                                 stdout=self._log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while True:
      try:
        urllib.request.urlopen(self.url + "/", timeout=2).read()
        break
      except OSError:
        if self.proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"GCS emulator did not start (see {log_path})")
        time.sleep(0.2)

  @property
  def env(self) -> dict[str, str]:
    return client_env(self.url)

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self._log.close()


def apply_env(env: dict[str, str]) -> dict[str, str | None]:
  """Sets `env` in this process; returns the previous values for `restore_env`."""
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  return old


def restore_env(old: dict[str, str | None]) -> None:
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def serve(port: int) -> None:
  """The emulator in memory on 127.0.0.1:`port` with `BUCKET` (see the module docstring)."""
  import http.server
  import logging
  from gcp_storage_emulator import server as server_lib
  from gcp_storage_emulator import storage as storage_lib
  from gcp_storage_emulator.handlers import objects

  storage_lib.Storage._write_config_to_file = lambda self: None   # in memory: nothing to save

  plain_download = objects.download

  def download(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except Exception:  # pylint: disable=broad-except  (a missing object: 404 below)
      pass
    return plain_download(request, response, storage, *args, **kwargs)

  objects.download = download
  server_lib.HANDLERS = tuple(
      (regex, {m: (download if h is plain_download else h) for m, h in handlers.items()})
      for regex, handlers in server_lib.HANDLERS)
  hold = os.environ.get("EMULATOR_HOLD_FILE")
  if hold:
    plain_handle = server_lib.Router.handle

    def handle(self, method):
      # While the file `hold` exists, a request whose URL names the text in it waits (a
      # stalled bucket: the test can stop writers at a known point); `hold`.engaged says so.
      url = urllib.parse.unquote(self._request_handler.path)
      if os.path.exists(hold):
        try:
          pattern = open(hold).read().strip()
        except OSError:
          pattern = ""
        if pattern and pattern in url:
          open(hold + ".engaged", "w").close()
          while os.path.exists(hold):
            time.sleep(0.05)
      return plain_handle(self, method)

    server_lib.Router.handle = handle
  # The emulator serves one request at a time (http.server.HTTPServer). Its listen backlog
  # of 5 overflows when two hosts' tensorstore and gcsfs clients connect at once, and each
  # dropped SYN costs the client a retransmission timeout (1 s, then 3 s, 7 s, ...): a
  # larger backlog queues them instead. A client that stalls mid-request would block every
  # other one for good; the handler timeout drops it after two minutes.
  http.server.HTTPServer.request_queue_size = 1024
  server_lib.RequestHandler.timeout = 120
  logging.basicConfig(level=logging.CRITICAL)
  server = server_lib.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.run()


if __name__ == "__main__":
  serve(int(sys.argv[1]))
