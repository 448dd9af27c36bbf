"""gs:// workdirs against a local GCS emulator (tests/cloud_testutil.py says which client is
pointed at it how, and what cannot be: tf.io.gfile's GCS client).

- the path helpers (input_pipeline.paths) and the readers of remote inputs: tokenizer
  files, precomputed priors (written to and read back from the bucket), local copies;
- the `:test` config: train (checkpoints + grain iterator state + TensorBoard events in the
  bucket), resume from the bucket, eval (report + PNGs), predict (a remote image, a remote
  video with a timeline JSON + PNG), export (HF / bundle safetensors, tokenizer) with
  `workdir=gs://bucket/...`, and no local `gs:` folder;
- the default config the same way, with tiny step and example counts.
"""
import json
import os

import numpy as np
import pytest

import cloud_testutil
from configs import default
from input_pipeline import paths

B = f"gs://{cloud_testutil.BUCKET}"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  log = tmp_path_factory.mktemp("gcs") / "emulator.log"
  emu = cloud_testutil.Emulator(str(log))
  old = cloud_testutil.apply_env(dict(emu.env, EMO_JAX_CACHE=str(
      tmp_path_factory.mktemp("cache"))))
  from etils.epath import gpath
  gpath._is_tf_installed.cache_clear()   # pylint: disable=protected-access
  try:
    yield emu
  finally:
    cloud_testutil.restore_env(old)
    gpath._is_tf_installed.cache_clear()   # pylint: disable=protected-access
    emu.stop()


def _names(url: str) -> set[str]:
  """Every object under `url`, as paths relative to it."""
  return set(paths.list_files(url))


def test_path_helpers_on_the_emulator(gcs, tmp_path):
  assert paths.is_remote("gs://b/x") and not paths.is_remote("/tmp/x")
  assert not paths.is_remote("relative/x") and not paths.is_remote("file:///tmp/x")
  assert paths.resolve("gs://b/run/") == "gs://b/run"
  assert paths.resolve("rel") == os.path.abspath("rel")
  assert paths.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
  assert paths.join("/a", "b") == "/a/b"

  paths.write_text(f"{B}/h/x/a.txt", "hello")
  assert paths.read_text(f"{B}/h/x/a.txt") == "hello"
  assert paths.isfile(f"{B}/h/x/a.txt") and not paths.isfile(f"{B}/h/x")
  assert not paths.exists(f"{B}/h/missing.txt")
  with paths.local_copy(f"{B}/h/x/a.txt") as local:
    assert os.path.basename(local) == "a.txt" and open(local).read() == "hello"
  assert not os.path.exists(local)   # the temporary copy is gone

  with paths.staged_dir(f"{B}/h/staged") as d:
    os.makedirs(os.path.join(d, "sub"))
    with open(os.path.join(d, "sub", "w.bin"), "wb") as f:
      f.write(b"\x00\x01" * 1000)
  assert paths.read_bytes(f"{B}/h/staged/sub/w.bin") == b"\x00\x01" * 1000
  copy = paths.local_dir(f"{B}/h/staged")
  assert open(os.path.join(copy, "sub", "w.bin"), "rb").read() == b"\x00\x01" * 1000
  assert paths.local_dir(f"{B}/h/staged") == copy   # made once

  # Tokenizer files read from the bucket give the same ids as the local files.
  from emo_jax.train import assets
  from input_pipeline import tokenizers
  root = str(tmp_path / "tok")
  os.makedirs(root)
  spm = assets.train_llama_tokenizer(root, os.path.join(root, "tokenizer.model"))
  vocab = assets.write_bert_vocab(root, os.path.join(root, "vocab.txt"))
  paths.upload_tree(root, f"{B}/tok")
  text = "How does this person feel? happiness"
  assert tokenizers.LlamaTokenizer(f"{B}/tok/tokenizer.model").encode(text) == \
      tokenizers.LlamaTokenizer(spm).encode(text)
  assert tokenizers.BertTokenizer(f"{B}/tok/vocab.txt").encode(text) == \
      tokenizers.BertTokenizer(vocab).encode(text)


def test_precomputed_priors_in_the_bucket(gcs, tmp_path):
  from emo_jax.models.face_prior import AGE_BINS, GENDERS, RACES
  from input_pipeline import precompute_priors as pp
  rng = np.random.default_rng(0)

  class Runner:   # stands in for the network: fixed random outputs per crop
    batch_size = 2

    def __call__(self, crops):
      n = len(crops)
      return {"face_global": rng.normal(size=(n, 4, 8)), "face_local": rng.normal(size=(n, 3, 8)),
              "landmarks": rng.uniform(size=(n, 68, 2)),
              "age_logits": rng.normal(size=(n, len(AGE_BINS))),
              "gender_logits": rng.normal(size=(n, len(GENDERS))),
              "race_logits": rng.normal(size=(n, len(RACES)))}

  items = [(f"r{i}", np.zeros((1 + i % 2, 8, 8, 3), np.uint8)) for i in range(5)]
  meta = pp.precompute_priors(Runner(), items, f"{B}/priors", num_shards=2)
  assert sorted(_names(f"{B}/priors")) == sorted([pp.INDEX_NAME, *meta["shards"]])
  local = str(tmp_path / "priors_local")
  paths.download_tree(f"{B}/priors", local)
  remote, ref = pp.PriorStore(f"{B}/priors"), pp.PriorStore(local)
  assert sorted(remote.ids()) == [f"r{i}" for i in range(5)]
  for rid in remote.ids():
    a, b = remote[rid], ref[rid]
    assert a["face_global"].shape[0] == 1 + int(rid[1:]) % 2
    for k in pp.PRIOR_FIELDS:
      np.testing.assert_array_equal(a[k], b[k])


def _run_all_modes(cfg, workdir, tmp_path):
  """train (+ eval + export at the end), predict on a remote image and a remote long video;
  returns the train summary and the predict results."""
  from emo_jax import main as main_lib
  from input_pipeline import synthetic
  cwd = os.getcwd()
  os.chdir(tmp_path)   # a URL that went through os.path would make a local 'gs:' here
  try:
    out = main_lib.run(cfg, workdir, "train")
    assert not os.path.exists(tmp_path / "gs:")
  finally:
    os.chdir(cwd)
  # Remote predict inputs: an aligned face image and a 3 s clip (1 s windows -> timeline).
  frames = np.concatenate([synthetic.make_clip(i, lab, 8, 64) for i, lab in
                           enumerate(("happiness", "sadness", "surprise"))])
  video = str(tmp_path / "long.mp4")
  synthetic.write_mp4(video, frames, fps=8)
  from PIL import Image
  img = str(tmp_path / "face.png")
  Image.fromarray(frames[0]).save(img)
  paths.copy_file(video, f"{workdir}_inputs/long.mp4")
  paths.copy_file(img, f"{workdir}_inputs/face.png")
  cfg = cfg.copy_and_resolve_references()
  cfg.predict.face_mode = "aligned"
  cfg.predict.window_secs = 1.0
  image_res = main_lib.run(cfg, workdir, "predict", input_path=f"{workdir}_inputs/face.png")
  video_res = main_lib.run(cfg, workdir, "predict", input_path=f"{workdir}_inputs/long.mp4")
  return out, image_res, video_res


def _check_workdir(workdir, out, image_res, video_res, steps):
  names = _names(workdir)
  assert "config.json" in names
  assert json.loads(paths.read_text(f"{workdir}/config.json"))["train"]["num_steps"] == steps
  assert f"checkpoints/{steps}/commit_success.txt" in names
  assert any(n.startswith(f"checkpoints/{steps}/state/") for n in names)
  assert any(n.startswith(f"checkpoints/{steps}/data/") for n in names)  # grain iterator
  assert any(n.startswith("events.out.tfevents") for n in names)         # TensorBoard
  for mode in ("generate", "likelihood"):
    png = f"eval/confusion_synthetic_images_{mode}.png"
    assert png in names and paths.read_bytes(f"{workdir}/{png}")[:4] == b"\x89PNG"
  report = json.loads(paths.read_text(f"{workdir}/eval/report.json"))
  assert report["step"] == steps and "eval/report.md" in names
  assert out["export"]["hf"] == f"{workdir}/export/hf_llama"
  assert any(n.startswith("export/hf_llama/") and n.endswith(".safetensors") for n in names)
  assert any(n.startswith("export/bundle/") and n.endswith(".safetensors") for n in names)
  assert {"export/tokenizer/tokenizer.model", "export/tokenizer/vocab.txt",
          "export/export.json"} <= names
  exp = json.loads(paths.read_text(f"{workdir}/export/export.json"))
  assert exp["step"] == steps and exp["paths"]["bundle"] == f"{workdir}/export/bundle"
  assert image_res["input"] == f"{workdir}_inputs/face.png"
  assert abs(sum(image_res["probs"].values()) - 1) < 1e-5
  assert len(video_res["timeline"]) == 3
  assert video_res["timeline_json"] == f"{workdir}/predict/long_timeline.json"
  saved = json.loads(paths.read_text(video_res["timeline_json"]))
  assert saved["input"] == f"{workdir}_inputs/long.mp4" and len(saved["timeline"]) == 3
  assert paths.read_bytes(video_res["timeline_png"])[:4] == b"\x89PNG"


def test_test_config_gs_workdir(gcs, tmp_path):
  cfg = default.get_config("test")
  cfg.train.num_steps = 4
  cfg.checkpoint.every_steps = 2
  cfg.eval.max_examples = 8
  wd = f"{B}/runs/test"
  out, image_res, video_res = _run_all_modes(cfg, wd, tmp_path)
  assert out["step"] == 4 and not out["preempted"]
  _check_workdir(wd, out, image_res, video_res, 4)
  steps = {n.split("/")[1] for n in _names(wd) if n.startswith("checkpoints/")}
  assert steps == {"2", "4"}

  # Resume from the bucket: two more steps start from the saved step 4.
  from emo_jax import main as main_lib
  from emo_jax.train import loop
  cfg6 = cfg.copy_and_resolve_references()
  cfg6.train.num_steps = 6
  cfg6.eval.at_end = cfg6.export.at_end = False
  again = main_lib.run(cfg6, wd, "train")
  assert again["step"] == 6
  _, _, step = loop.restore_trained(cfg6, wd)
  assert step == 6
  # --mode=eval / --mode=export read the model back from the bucket.
  ev = main_lib.run(cfg6, wd, "eval")["eval"]
  assert 0 <= ev["summary"]["likelihood"]["synthetic_images"]["war"] <= 1
  assert json.loads(paths.read_text(f"{wd}/eval/report.json"))["step"] == 6
  exp = main_lib.run(cfg6, wd, "export")["export"]
  assert json.loads(paths.read_text(f"{wd}/export/export.json"))["step"] == 6
  assert exp["bundle"] == f"{wd}/export/bundle"


def test_default_config_gs_workdir(gcs, tmp_path):
  cfg = default.get_config()
  cfg.train.num_steps = 2
  cfg.train.log_every = 1
  cfg.checkpoint.every_steps = 2
  cfg.eval.max_examples = 16
  wd = f"{B}/runs/default"
  out, image_res, video_res = _run_all_modes(cfg, wd, tmp_path)
  assert out["step"] == 2
  _check_workdir(wd, out, image_res, video_res, 2)
