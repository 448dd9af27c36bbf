"""predict and export end to end on a tiny trained workdir (trained here, 6 steps).

Export: the HF directory loads in transformers and gives emo_jax's logits (LoRA merged);
the PEFT adapter on the un-merged base gives them too; the bundle reloads to identical
multimodal logits. Predict: image -> answer + emotion + probability, long video ->
timeline JSON + PNG, and bad inputs exit non-zero with a clear message.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from emo_jax import main as main_lib
from emo_jax.train import export as export_lib
from emo_jax.train import loop
from emo_jax.train import predict as predict_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_root):
  cfg = default.get_config("test")
  cfg.data.root = str(data_root)
  cfg.model.trainable = ("vision", "qformer", "projectors", "face", "lora")
  cfg.model.lora_rank = 4
  cfg.model.lora_alpha = 8.0
  cfg.eval.at_end = False
  cfg.export.at_end = False
  cfg.predict.window_secs = 1.0
  return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("pe")
  cfg = _config(root / "data")
  wd = str(root / "wd")
  out = main_lib.run(cfg, wd, "train")
  assert out["step"] == cfg.train.num_steps
  _, model, step = loop.restore_trained(cfg, wd)
  assert step == cfg.train.num_steps
  # LoRA B moved away from its zero init, so the merged export differs from the base.
  bs = [np.abs(np.asarray(m.lora_b[...])).max()
        for _, m in __import__("emo_jax.models.lora", fromlist=["x"]).lora_modules(
            model.language_model)]
  assert bs and max(bs) > 0
  return cfg, wd, model


def _ids(vocab, b=2, t=11, seed=0):
  return np.random.default_rng(seed).integers(3, vocab, size=(b, t)).astype(np.int32)


def test_export_hf_peft_bundle(trained, tmp_path):
  import torch
  import transformers
  import peft
  cfg, wd, model = trained
  out = export_lib.export(cfg, wd, out_dir=str(tmp_path / "export"))   # restores itself
  ids = _ids(cfg.model.llm.vocab_size)
  ours = np.asarray(model.language_model(jnp.asarray(ids)))

  hf = transformers.LlamaForCausalLM.from_pretrained(out["hf"], torch_dtype=torch.float32)
  with torch.no_grad():
    theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=2e-4)

  # PEFT: the adapter on the base LLM without LoRA (B zeroed = base weights).
  from emo_jax.convert import llama_hf
  from emo_jax.models import lora as lora_lib
  base = nnx.clone(model.language_model)
  for _, m in lora_lib.lora_modules(base):
    m.lora_b[...] = jnp.zeros_like(m.lora_b[...])
  llama_hf.save_llama(base, str(tmp_path / "base"))
  base_hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base"),
                                                          torch_dtype=torch.float32)
  with torch.no_grad():
    base_logits = base_hf(torch.from_numpy(ids).long()).logits.numpy()
  assert np.abs(base_logits - ours).max() > 1e-4     # the adapter matters
  pm = peft.PeftModel.from_pretrained(base_hf, out["peft"])
  with torch.no_grad():
    peft_logits = pm(torch.from_numpy(ids).long()).logits.numpy()
  np.testing.assert_allclose(peft_logits, ours, atol=2e-4, rtol=2e-4)

  # Bundle: the whole model reloads to identical multimodal logits.
  from emo_jax.convert import bundle
  from emo_jax.train import task
  re = bundle.load_bundle(out["bundle"])
  rng = np.random.default_rng(1)
  mc = task.model_config(cfg)
  T = 24
  ids = _ids(cfg.model.llm.vocab_size, 2, T)
  ids[:, 2:2 + mc.tokens_per_frame] = mc.image_token_id
  batch = {"frames": rng.normal(size=(2, 1, 48, 48, 3)).astype(np.float32),
           "frame_mask": np.ones((2, 1), bool),
           "face_crops": rng.normal(size=(2, 1, 32, 32, 3)).astype(np.float32),
           "qformer_ids": _ids(50, 2, 6), "qformer_mask": np.ones((2, 6), np.int32),
           "input_ids": ids, "attention_mask": np.ones((2, T), np.int32)}
  # Every variable comes back bitwise; logits agree to fp32 rounding (the trained model's
  # arrays are FSDP-sharded over the 8 test devices, the reloaded ones are not).
  ours_state = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState))))
  re_state = dict(nnx.to_flat_state(nnx.state(re, nnx.Not(nnx.RngState))))
  assert ours_state.keys() == re_state.keys()
  for k in ours_state:
    np.testing.assert_array_equal(np.asarray(re_state[k].get_value()),
                                  np.asarray(ours_state[k].get_value()), err_msg=str(k))
  np.testing.assert_allclose(np.asarray(re(batch)), np.asarray(model(batch)), atol=1e-5,
                             rtol=1e-5)
  assert os.path.exists(os.path.join(out["tokenizer"], "tokenizer.model"))


def _synthetic_test_image(cfg):
  """A synthetic test image in which the OpenCV detector finds the face."""
  from input_pipeline import media
  d = os.path.join(cfg.data.root, "Image", "aligned")
  for f in sorted(f for f in os.listdir(d) if f.startswith("test_")):
    if media.detect_faces(media.load_image(os.path.join(d, f))):
      return os.path.join(d, f)
  raise AssertionError("the detector finds no face in any synthetic test image")


def test_predict_image_and_long_video(trained, tmp_path, capsys):
  cfg, wd, model = trained
  res = predict_lib.predict(cfg, wd, _synthetic_test_image(cfg), model=model)
  printed = capsys.readouterr().out
  assert f"emotion: {res['emotion']}" in printed and "answer:" in printed
  assert res["emotion"] in default.get_config().predict.dataset or res["emotion"] in res["probs"]
  assert 0 < res["probability"] <= 1 and abs(sum(res["probs"].values()) - 1) < 1e-5
  assert res["probability"] == max(res["probs"].values())

  # A 3 s clip (24 frames at 8 fps) with 1 s windows -> a 3-window timeline.
  from input_pipeline import synthetic
  frames = np.concatenate([synthetic.make_clip(i, lab, 8, 64) for i, lab in
                           enumerate(("happiness", "sadness", "surprise"))])
  video = str(tmp_path / "long.mp4")
  synthetic.write_mp4(video, frames, fps=8)
  cfg = cfg.copy_and_resolve_references()
  cfg.predict.face_mode = "aligned"   # synthetic clips are aligned faces (no detector here)
  res = predict_lib.predict(cfg, wd, video, question="How does this person feel?",
                            model=model)
  assert len(res["timeline"]) == 3
  assert [w["start"] for w in res["timeline"]] == [0.0, 1.0, 2.0]
  with open(res["timeline_json"]) as f:
    saved = json.load(f)
  assert len(saved["timeline"]) == 3 and os.path.getsize(res["timeline_png"]) > 1000
  assert res["question"] == "How does this person feel?"


def _cli(wd, path, capsys):
  """emo_jax.main's command-line entry in this process: (exit status, stderr). Input
  errors are found before the model is restored, so no trained workdir is needed."""
  from absl import flags
  argv = ["emo_jax.main", "--config=configs/default.py:test", f"--workdir={wd}",
          "--mode=predict", f"--input={path}"]
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  try:
    main_lib.main([argv[0]])
    code = 0
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "not_an_image", "unreadable_video", "no_face"])
def test_predict_bad_inputs_exit_nonzero(tmp_path, capsys, case):
  wd = str(tmp_path / "wd")
  if case == "missing":
    path, want = str(tmp_path / "nope.jpg"), "no such file"
  elif case == "not_an_image":
    path, want = str(tmp_path / "x.jpg"), "not a readable image"
    with open(path, "w") as f:
      f.write("this is text, not a JPEG")
  elif case == "unreadable_video":
    path, want = str(tmp_path / "x.mp4"), "unreadable video"
    with open(path, "wb") as f:
      f.write(os.urandom(2048))
  else:
    from PIL import Image
    path, want = str(tmp_path / "wall.png"), "no face found"
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(path)
  code, err = _cli(wd, path, capsys)
  assert code != 0 and code is not None
  assert want in err and path in err


def test_predict_cli_subprocess_exit_status(tmp_path):
  wd = str(tmp_path / "wd")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "emo_jax.main", "--config=configs/default.py:test",
                      f"--workdir={wd}", "--mode=predict", f"--input={tmp_path}/missing.png"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 2
  assert "error:" in p.stderr and "no such file" in p.stderr
