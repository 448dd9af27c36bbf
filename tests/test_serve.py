"""The server end to end: `python -m emo_jax.serve` on 127.0.0.1 with a tiny random model
(exported as a bundle here), driven by the official `openai` client, and the demo page
driven by headless Chromium (Debian's package; scripts/install_browser.sh installs it).

One server per module. Answers are compared with `--mode=predict` on the same model (the
one-file path), and concurrent (batched) greedy answers with one-at-a-time ones.
"""
import base64
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from configs import default
from ports import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_UPLOAD = 200_000


def _faces(n, size=112):
  """n synthetic faces (different people and expressions) the detector finds."""
  from input_pipeline import media, synthetic
  out, i = [], 0
  while len(out) < n:
    label = synthetic.CLASSES[i % len(synthetic.CLASSES)]
    img = synthetic.make_image(i, label, size=size)
    if media.detect_faces(img):
      out.append(img)
    i += 1
  return out


def _png(path, arr):
  from PIL import Image
  Image.fromarray(arr).save(path)
  return path


def _data_uri(path, mime):
  with open(path, "rb") as f:
    return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


def _config(root):
  cfg = default.get_config("test")
  cfg.data.root = str(root / "data")
  cfg.predict.window_secs = 1.0
  return cfg


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  from emo_jax.convert import bundle
  from emo_jax.train import task
  from input_pipeline import synthetic
  root = tmp_path_factory.mktemp("serve")
  cfg = _config(root)
  paths = task.prepare_data(cfg, str(root / "wd"))
  model = task.build_model(cfg)
  bundle.save_bundle(model, str(root / "export" / "bundle"))
  os.makedirs(root / "export" / "tokenizer")
  for p in paths.values():
    shutil.copy(p, root / "export" / "tokenizer")
  media = root / "media"
  os.makedirs(media)
  faces = _faces(9)
  images = [_png(str(media / f"face{i}.png"), f) for i, f in enumerate(faces)]
  # A 3 s video at 8 fps: three faces held 1 s each -> three 1 s windows.
  synthetic.write_mp4(str(media / "clip.mp4"),
                      np.concatenate([np.repeat(f[None], 8, 0) for f in faces[:3]]), fps=8)
  with open(root / "outside.png", "wb") as f:
    f.write(open(images[0], "rb").read())
  port = free_port()
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                if "device_count" not in f))
  cmd = [sys.executable, "-m", "emo_jax.serve", "--config=configs/default.py:test",
         f"--workdir={root / 'wd'}", f"--bundle={root / 'export'}",
         f"--config.data.root={root / 'data'}", f"--config.serve.port={port}",
         f"--config.serve.media_root={media}", "--config.serve.batch_buckets=(1,8)",
         "--config.serve.score_buckets=(1,8)", f"--config.serve.max_upload_bytes={MAX_UPLOAD}",
         "--config.serve.max_tokens=8", "--config.predict.window_secs=1.0",
         "--config.serve.max_wait_ms=50"]
  log = open(root / "server.log", "w")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 900
  try:
    while True:
      if proc.poll() is not None:
        raise AssertionError(f"the server exited ({proc.returncode}): "
                             + open(root / "server.log").read()[-3000:])
      try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
          if json.load(r)["status"] == "ok":
            break
      except OSError:
        pass
      if time.time() > deadline:
        raise AssertionError("the server did not come up: "
                             + open(root / "server.log").read()[-3000:])
      time.sleep(1)
    yield {"url": url, "root": root, "media": media, "images": images, "cfg": cfg,
           "model": model, "classes": default.get_config().predict.dataset}
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
    log.close()


@pytest.fixture(scope="module")
def client(server):
  import openai
  return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0,
                       timeout=300)


def _image_msg(uri, text="How does this person feel?"):
  return [{"role": "user", "content": [{"type": "text", "text": text},
                                       {"type": "image_url", "image_url": {"url": uri}}]}]


def _emo(completion):
  return completion.model_extra["emo"]


def test_models_and_health(server, client):
  assert [m.id for m in client.models.list().data] == ["emo-llama"]
  with urllib.request.urlopen(server["url"] + "/health") as r:
    h = json.load(r)
  assert h["status"] == "ok" and h["compiles"] == 4     # 2 batch x 2 score buckets, 1 length


def test_image_matches_predict(server, client, tmp_path):
  """One image: the answer and class probabilities equal --mode=predict's on the model."""
  from emo_jax.train import predict
  img = server["images"][0]
  c = client.chat.completions.create(model="emo-llama", messages=_image_msg(
      _data_uri(img, "image/png")), max_tokens=8)
  assert len(c.choices) == 1 and c.choices[0].finish_reason in ("stop", "length")
  emo = _emo(c)
  want = predict.predict(server["cfg"], str(tmp_path), img, model=server["model"],
                         question="How does this person feel?")
  assert c.choices[0].message.content == want["answer"]
  assert emo["emotion"] == want["emotion"]
  assert set(emo["probs"]) == set(want["probs"])
  for k, v in want["probs"].items():
    assert abs(emo["probs"][k] - v) < 1e-4, (k, emo["probs"][k], v)
  assert emo["probability"] == max(emo["probs"].values()) and emo["timeline"] is None
  assert c.usage.prompt_tokens > 0 and c.usage.completion_tokens <= 8


def test_video_by_path_has_timeline(server, client):
  c = client.chat.completions.create(model="emo-llama", messages=[{"role": "user", "content": [
      {"type": "video_url", "video_url": {"url": "clip.mp4"}},
      {"type": "text", "text": "Describe the expression."}]}], max_tokens=4)
  emo = _emo(c)
  assert [w["start"] for w in emo["timeline"]] == [0.0, 1.0, 2.0]
  for w in emo["timeline"]:
    assert abs(sum(w["probs"].values()) - 1) < 1e-5 and w["emotion"] in w["probs"]
  mean = {k: np.mean([w["probs"][k] for w in emo["timeline"]]) for k in emo["probs"]}
  for k in mean:
    assert abs(mean[k] - emo["probs"][k]) < 1e-6
  assert isinstance(c.choices[0].message.content, str)


def test_streaming_equals_plain(server, client):
  msg = _image_msg(_data_uri(server["images"][1], "image/png"))
  plain = client.chat.completions.create(model="emo-llama", messages=msg, max_tokens=8)
  chunks = list(client.chat.completions.create(model="emo-llama", messages=msg, max_tokens=8,
                                               stream=True))
  text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
  assert text == plain.choices[0].message.content
  deltas = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
  assert len(deltas) >= 2 or len(plain.choices[0].message.content) <= 1
  assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
  assert chunks[-1].model_extra["emo"]["probs"] == _emo(plain)["probs"]


def test_n_choices(server, client):
  msg = _image_msg(_data_uri(server["images"][2], "image/png"))
  greedy = client.chat.completions.create(model="emo-llama", messages=msg, n=3, max_tokens=6)
  assert [ch.index for ch in greedy.choices] == [0, 1, 2]
  assert len({ch.message.content for ch in greedy.choices}) == 1    # greedy: all the same
  sampled = client.chat.completions.create(model="emo-llama", messages=msg, n=4, max_tokens=6,
                                           temperature=1.5)
  assert len(sampled.choices) == 4
  assert len({ch.message.content for ch in sampled.choices}) > 1   # a random tiny model


def test_concurrent_requests_equal_one_at_a_time(server, client):
  questions = ["How does this person feel?", "Describe the face.", "What is the emotion?",
               "Is this person happy?", "Tell me about the expression.", "Why?",
               "What do you see?", "Name the feeling shown."]
  msgs = [_image_msg(_data_uri(p, "image/png"), text=q)
          for p, q in zip(server["images"][1:9], questions)]

  def ask(m):
    c = client.chat.completions.create(model="emo-llama", messages=m, max_tokens=8)
    return c.choices[0].message.content, _emo(c)["probs"]

  alone = [ask(m) for m in msgs]
  with urllib.request.urlopen(server["url"] + "/health") as r:
    before = json.load(r)
  with concurrent.futures.ThreadPoolExecutor(8) as ex:
    together = list(ex.map(ask, msgs))
  with urllib.request.urlopen(server["url"] + "/health") as r:
    after = json.load(r)
  assert after["requests"] - before["requests"] == 8
  assert after["batches"] - before["batches"] < 8          # some requests ran together
  assert after["largest_batch"] > 1 and after["compiles"] == before["compiles"]
  assert len({a for a, _ in alone}) > 1     # rows differ, so a mix-up would show
  for (a_text, a_p), (t_text, t_p) in zip(alone, together):
    assert a_text == t_text
    for k in a_p:
      assert abs(a_p[k] - t_p[k]) < 1e-5


def _post(url, body: bytes):
  req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=120) as r:
      return r.status, json.load(r)
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


@pytest.mark.parametrize("case,status,code", [
    ("not_an_image", 400, "invalid_image"),
    ("undecodable_video", 400, "invalid_video"),
    ("no_face", 400, "no_face"),
    ("outside_root_relative", 403, "path_outside_media_root"),
    ("outside_root_absolute", 403, "path_outside_media_root"),
    ("oversized", 413, "upload_too_large"),
    ("malformed_json", 400, "invalid_json"),
    ("remote_url", 400, "remote_url"),
    ("system_message", 400, "unsupported_role"),
    ("prompt_too_long", 400, "prompt_too_long"),
    ("bad_n", 400, "invalid_n"),
])
def test_bad_input_gets_openai_error(server, case, status, code, tmp_path):
  root = server["root"]
  if case == "not_an_image":
    body = _image_msg("data:image/png;base64," + base64.b64encode(b"plain text").decode())
  elif case == "undecodable_video":
    body = [{"role": "user", "content": [{"type": "video_url", "video_url": {
        "url": "data:video/mp4;base64," + base64.b64encode(os.urandom(4096)).decode()}}]}]
  elif case == "no_face":
    wall = _png(str(tmp_path / "wall.png"), np.full((96, 96, 3), 128, np.uint8))
    body = _image_msg(_data_uri(wall, "image/png"))
  elif case == "outside_root_relative":
    body = _image_msg("../outside.png")
  elif case == "outside_root_absolute":
    body = _image_msg(str(root / "outside.png"))
  elif case == "oversized":
    body = _image_msg("data:image/png;base64," + base64.b64encode(
        os.urandom(MAX_UPLOAD + 1000)).decode())
  elif case == "remote_url":
    body = _image_msg("https://example.com/face.png")
  elif case == "system_message":
    body = [{"role": "system", "content": "Be brief."}] + _image_msg(
        _data_uri(server["images"][0], "image/png"))
  elif case == "prompt_too_long":
    body = _image_msg(_data_uri(server["images"][0], "image/png"), text="why? " * 400)
  elif case == "bad_n":
    body = _image_msg(_data_uri(server["images"][0], "image/png"))
  extra = {"n": 99} if case == "bad_n" else {}
  if case == "malformed_json":
    raw = b'{"model": "emo-llama", "messages": [}'
  else:
    raw = json.dumps({"model": "emo-llama", "messages": body, "max_tokens": 4,
                      **extra}).encode()
  got, err = _post(server["url"], raw)
  assert got == status, err
  assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
  assert err["error"]["code"] == code and err["error"]["message"]
  if case in ("outside_root_relative", "outside_root_absolute"):
    assert str(root) not in err["error"]["message"] or case.endswith("absolute")
  # ... and the server keeps serving.
  ok, res = _post(server["url"], json.dumps({"messages": _image_msg(
      _data_uri(server["images"][0], "image/png")), "max_tokens": 2}).encode())
  assert ok == 200 and res["choices"][0]["message"]["content"] is not None


def test_openai_client_raises_on_bad_input(server, client):
  import openai
  with pytest.raises(openai.BadRequestError) as e:
    client.chat.completions.create(model="emo-llama", messages=_image_msg(
        "data:image/png;base64," + base64.b64encode(b"GIF89a not really").decode()))
  assert e.value.body["code"] == "invalid_image"
  with pytest.raises(openai.NotFoundError):
    client.chat.completions.create(model="gpt-4o", messages=_image_msg(
        _data_uri(server["images"][0], "image/png")))


def _chrome():
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  for path in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
    if not os.path.exists(path):
      raise AssertionError(f"{path} is missing: run scripts/install_browser.sh")
  opts = webdriver.ChromeOptions()
  opts.binary_location = "/usr/bin/chromium"
  import tempfile
  for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,1400",
            f"--user-data-dir={tempfile.mkdtemp(prefix='chromium_')}",
            # Only loopback: every other host name resolves to nothing.
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
    opts.add_argument(a)
  return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def test_demo_page_in_headless_chromium(server, tmp_path):
  from selenium.common.exceptions import StaleElementReferenceException
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support import expected_conditions as EC
  from selenium.webdriver.support.ui import WebDriverWait
  shots = os.environ.get("EMO_SCREENSHOT_DIR") or str(tmp_path)
  driver = _chrome()
  try:
    driver.get(server["url"] + "/demo/")
    wait = WebDriverWait(driver, 180)
    upload = wait.until(EC.presence_of_element_located(
        (By.CSS_SELECTOR, "#image_input input[type=file]")))
    upload.send_keys(server["images"][0])
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#image_input img")))
    driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(
        "How does this person feel?")
    driver.find_element(By.CSS_SELECTOR, "#submit").click()
    wait.until(lambda d: "Emotion:" in d.find_element(By.ID, "status").text)
    status = driver.find_element(By.ID, "status").text
    answer = driver.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")
    chart = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#probs img")))
    assert chart.size["width"] > 100 and chart.size["height"] > 50
    classes = default.get_config().predict.dataset
    assert any(c in status for c in __import__("input_pipeline.labels", fromlist=["x"]
                                               ).classes(classes))
    assert isinstance(answer, str)
    driver.save_screenshot(os.path.join(shots, "demo_image.png"))
    assert os.path.getsize(os.path.join(shots, "demo_image.png")) > 10_000
    # Bad input: a clear message on the page, no answer.
    wall = _png(str(tmp_path / "wall.png"), np.full((96, 96, 3), 128, np.uint8))
    preview = (By.CSS_SELECTOR, "#image_input img")
    old_src = {e.get_attribute("src") for e in driver.find_elements(*preview)}
    driver.find_element(By.CSS_SELECTOR, "#image_input button[aria-label*='lear']").click() \
        if driver.find_elements(By.CSS_SELECTOR, "#image_input button[aria-label*='lear']") \
        else None
    driver.find_element(By.CSS_SELECTOR, "#image_input input[type=file]").send_keys(wall)
    # Submit once the page shows the new image (its upload has finished), however slow.
    WebDriverWait(driver, 180, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: any(e.get_attribute("src") not in old_src for e in d.find_elements(*preview)))
    driver.find_element(By.CSS_SELECTOR, "#submit").click()
    wait.until(lambda d: "no face found" in d.find_element(By.ID, "status").text)
    driver.save_screenshot(os.path.join(shots, "demo_bad_input.png"))
    # A video: the answer, the chart and the per-window timeline plot.
    driver.find_element(By.CSS_SELECTOR, "#video_input input[type=file]").send_keys(
        str(server["media"] / "clip.mp4"))
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#video_input video")))
    driver.find_element(By.CSS_SELECTOR, "#submit").click()
    wait.until(lambda d: "3 windows" in d.find_element(By.ID, "status").text)
    plot = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#timeline img")))
    assert plot.size["width"] > 100
    driver.execute_script("arguments[0].scrollIntoView();", plot)
    driver.save_screenshot(os.path.join(shots, "demo_video.png"))
  finally:
    driver.quit()


def test_batch_chunks_use_buckets_without_much_padding():
  from emo_jax.serve.engine import Engine
  for buckets in ((1, 4, 16), (1, 2, 4, 8, 16), (1, 8)):
    for n in range(1, 40):
      items = [(i % 2, i) for i in range(n)]          # two length buckets
      chunks = list(Engine._chunks(items, lambda x: x[0], buckets))
      assert sorted(x for c in chunks for x in c) == sorted(items)
      for c in chunks:
        assert len({x[0] for x in c}) == 1             # one length bucket per call
        assert len(c) <= buckets[-1]
        padded = next(b for b in buckets if b >= len(c))
        assert padded - len(c) <= len(c) / 3


@pytest.mark.parametrize("override, message", [
    ({"prepare_concurrency": 0}, "prepare_concurrency=0 must be at least 1"),
    ({"batch_buckets": ()}, "batch_buckets=() must be distinct positive sizes"),
    ({"score_buckets": (4, 0)}, "score_buckets=(0, 4) must be distinct positive sizes"),
    ({"max_wait_ms": -1.0}, "max_wait_ms=-1.0 must be >= 0"),
    ({"request_timeout_s": 0.0}, "request_timeout_s=0.0 must be > 0"),
    ({"opencv_threads": -2}, "opencv_threads=-2 must be >= 0"),
    ({"max_n": 32}, "max_n=32 exceeds the largest batch bucket 16"),
    ({"max_prompt_tokens": 10_000}, "max_prompt_tokens=10000 exceeds the largest length"),
])
def test_nonsense_serve_settings_are_refused(override, message):
  from emo_jax.serve import engine
  cfg = default.get_config("test")
  engine.check_serve_config(engine.serve_config(cfg))     # the shipped settings pass
  cfg.serve.update(override)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    engine.check_serve_config(engine.serve_config(cfg))


def test_server_command_refuses_a_nonsense_setting_before_loading(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "emo_jax.serve", "--config=configs/default.py:test",
       f"--workdir={tmp_path / 'wd'}", "--config.serve.prepare_concurrency=0"],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.serve.prepare_concurrency=0 must be at least 1")
  assert not (tmp_path / "wd").exists()       # nothing written
