"""gs:// workdirs against a local GCS emulator (tests/cloud_testutil.py says which client is
pointed at it how, and what cannot be: tf.io.gfile's GCS client).

- the path helpers (input_pipeline.paths) and the readers of remote inputs: tokenizer
  files, precomputed priors (written to and read back from the bucket), local copies;
- the `:test` config: train (checkpoints + grain iterator state + TensorBoard events in the
  bucket), then --mode=eval (report + PNGs) and --mode=export (HF / bundle safetensors,
  tokenizer), which restore the model from the bucket, and predict (a remote image, a
  remote video with a timeline JSON + PNG), with `workdir=gs://bucket/...` and no local
  `gs:` folder; resuming from the bucket is in tests/test_rehearsal.py;
- the default config the same way, with eval and export at the end of training and tiny
  step and example counts.
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
  from emo_jax.jobs import precompute_priors as pp
  from input_pipeline.contract import AGE_BINS, GENDERS, RACES
  from input_pipeline.prior_store import INDEX_NAME, PriorStore
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
  assert sorted(_names(f"{B}/priors")) == sorted([INDEX_NAME, *meta["shards"]])
  local = str(tmp_path / "priors_local")
  paths.download_tree(f"{B}/priors", local)
  remote, ref = PriorStore(f"{B}/priors"), PriorStore(local)
  assert sorted(remote.ids()) == [f"r{i}" for i in range(5)]
  for rid in remote.ids():
    a, b = remote[rid], ref[rid]
    assert a["face_global"].shape[0] == 1 + int(rid[1:]) % 2
    for k in pp.PRIOR_FIELDS:
      np.testing.assert_array_equal(a[k], b[k])


def _run_all_modes(cfg, workdir, tmp_path):
  """train, then eval and export (at the end of training, or else as --mode=eval /
  --mode=export, which restore the model from the bucket), predict on a remote image and a
  remote long video; returns the train + eval + export summary and the predict results."""
  from emo_jax import main as main_lib
  from input_pipeline import synthetic
  cwd = os.getcwd()
  os.chdir(tmp_path)   # a URL that went through os.path would make a local 'gs:' here
  try:
    out = main_lib.run(cfg, workdir, "train")
    if not cfg.eval.at_end:
      out.update(main_lib.run(cfg, workdir, "eval"))
    if not cfg.export.at_end:
      out.update(main_lib.run(cfg, workdir, "export"))
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
  assert exp["paths"]["bundle"] == f"{workdir}/export/bundle"
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
  cfg.eval.at_end = cfg.export.at_end = False   # eval / export modes read the bucket
  wd = f"{B}/runs/test"
  out, image_res, video_res = _run_all_modes(cfg, wd, tmp_path)
  assert out["step"] == 4 and not out["preempted"]
  assert 0 <= out["eval"]["summary"]["likelihood"]["synthetic_images"]["war"] <= 1
  _check_workdir(wd, out, image_res, video_res, 4)
  assert json.loads(paths.read_text(f"{wd}/export/export.json"))["step"] == 4
  steps = {n.split("/")[1] for n in _names(wd) if n.startswith("checkpoints/")}
  assert steps == {"2", "4"}


def test_default_config_gs_workdir(gcs, tmp_path):
  cfg = default.get_config()
  cfg.train.num_steps = 2
  cfg.train.log_every = 1
  cfg.checkpoint.every_steps = 2
  cfg.eval.max_examples = 16
  # The AU stage on one fold, two steps, a few sequences (its reports still go to the bucket).
  cfg.au.folds = (1,)
  cfg.au.train.num_steps = 2
  cfg.au.synthetic.update(num_subjects=6, num_tasks=1, num_frames=2)
  wd = f"{B}/runs/default"
  out, image_res, video_res = _run_all_modes(cfg, wd, tmp_path)
  assert out["step"] == 2
  _check_workdir(wd, out, image_res, video_res, 2)
  assert {"eval/au_report.json", "eval/au_report.md"} <= set(_names(wd))


def test_data_roots(monkeypatch, tmp_path):
  """Datasets stay local: a cloud workdir's synthetic data goes to the local cache, a URL
  data root is a clear error, and the 7B config's dataset roots are relative to data.root
  (the folder the launcher's data step fills)."""
  from configs import emo_llama_7b
  from emo_jax.train import task
  from input_pipeline import datasets as datasets_lib
  monkeypatch.setenv("EMO_JAX_CACHE", str(tmp_path / "cache"))
  cfg = default.get_config("test")
  root = task.data_root(cfg, "gs://b/run")
  assert root.startswith(str(tmp_path / "cache" / "synthetic")) and "n70" in root
  assert task.data_root(cfg, str(tmp_path / "wd")) == str(tmp_path / "wd" / "data")
  cfg.data.root = "gs://b/fer"
  with pytest.raises(ValueError, match="local folder as --config.data.root"):
    task.data_root(cfg, "gs://b/run")

  seen = []
  monkeypatch.setattr(datasets_lib, "load_records",
                      lambda name, ds_root, **kw: seen.append((name, ds_root, kw)) or [object()])
  big = emo_llama_7b.get_config()
  big.data.root = "~/data"
  task.train_records(big, "gs://b/run", None)
  home = os.path.expanduser("~")
  assert seen[0][:2] == ("rafdb", os.path.join(home, "data", "RAF-DB", "basic"))
  assert seen[1][:2] == ("ferid", os.path.join(home, "data", "FERID", "ferid_train.json"))
  assert seen[1][2]["media_root"] == os.path.join(home, "data")
