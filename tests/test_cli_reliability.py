"""The command line's promises, checked where the user meets them (exit status + message):
read-only modes change nothing on disk, settings are checked before any heavy work, training
never saves non-finite weights, Ctrl-C saves, data roots are created loudly.

One tiny workdir is trained once for the whole file (2 steps, a checkpoint at each); every
other run reuses its generated data.
"""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from emo_jax import main as main_lib
from emo_jax.train import checkpoint as ckpt_lib
from ports import free_port
from resume_testutil import _env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "--config=configs/default.py:test"
NUM_IMAGES = 14    # the smallest synthetic set that still has train and test images
SMALL = [f"--config.data.synthetic.num_images={NUM_IMAGES}"]
NO_END = ["--config.eval.at_end=False", "--config.export.at_end=False", *SMALL]


def tree_digest(root: str) -> dict[str, str]:
  """{relative path: sha1 of the bytes, or 'dir'} of everything under root."""
  out = {}
  for d, dirs, files in os.walk(root):
    for n in dirs:
      out[os.path.relpath(os.path.join(d, n), root)] = "dir"
    for n in files:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = hashlib.sha1(f.read()).hexdigest()
  return out


def cli(args, capsys):
  """emo_jax.main's command-line entry (flag parsing + main) in this process:
  (exit status, stdout, stderr)."""
  from absl import flags
  argv = ["emo_jax.main"] + list(args)
  flags.FLAGS.unparse_flags()
  code, saved_argv = 0, sys.argv
  sys.argv = argv     # the config flag reads its `--config.x` overrides from sys.argv
  try:
    main_lib._parse_flags(argv)
    main_lib.main([argv[0]])
  except SystemExit as e:
    code = e.code
  finally:
    sys.argv = saved_argv
    flags.FLAGS.unparse_flags()
    for name in list(flags.FLAGS):   # override flags are registered anew by each parse
      if name.startswith("config."):
        delattr(flags.FLAGS, name)
  captured = capsys.readouterr()
  return code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, config) after 2 training steps; data in <workdir>/data."""
  wd = str(tmp_path_factory.mktemp("cli") / "wd")
  cfg = default.get_config("test")
  cfg.data.synthetic.num_images = NUM_IMAGES
  cfg.train.num_steps = 2
  cfg.checkpoint.every_steps = 1
  cfg.eval.at_end = False
  cfg.export.at_end = False
  out = main_lib.run(cfg, wd, "train")
  assert out["step"] == 2 and out["trained_steps"] == 2
  assert ckpt_lib.step_folders(ckpt_lib.checkpoint_dir(wd)) == {1: True, 2: True}
  return wd, cfg


def _test_image(wd):
  d = os.path.join(wd, "data", "Image", "aligned")
  return os.path.join(d, sorted(f for f in os.listdir(d) if f.startswith("test_"))[0])


# ------------------------------------------------------------ read-only modes (items 1-4)


def test_predict_uses_committed_step_and_changes_nothing(trained, tmp_path, capsys):
  """Item 1 + 2 + 4: an uncommitted newest step is skipped (not deleted), config.json is
  not rewritten although the command line differs, the tree is byte-for-byte unchanged."""
  wd, _ = trained
  ro = str(tmp_path / "ro")
  shutil.copytree(wd, ro)
  os.remove(os.path.join(ro, "checkpoints", "2", ckpt_lib.COMMIT_MARKER))
  before = tree_digest(ro)
  code, out, err = cli([CONFIG, f"--workdir={ro}", "--mode=predict",
                        f"--input={_test_image(ro)}", "--config.predict.face_mode=aligned",
                        "--config.predict.max_new_tokens=1", *SMALL,
                        "--question=" + " ".join(["How does this person feel?"] * 40),
                        "--config.model.llm.intermediate_size=64",
                        f"--output_dir={tmp_path / 'out'}"], capsys)
  assert code == 0, err
  assert tree_digest(ro) == before
  assert "emotion:" in out and "synthetic faces only" in out
  assert "model.llm.intermediate_size" in err and "using the saved values" in err
  assert "warning: the question is longer than the prompt limit and was truncated" in err


def test_image_placeholder_in_question_fails_before_the_model(trained, capsys, monkeypatch):
  from emo_jax.train import loop

  def no_model(*a, **k):
    raise AssertionError("the model must not be loaded")
  monkeypatch.setattr(loop, "restore_trained", no_model)
  wd, _ = trained
  code, _, err = cli([CONFIG, f"--workdir={wd}", "--mode=predict", f"--input={_test_image(wd)}",
                      "--config.predict.face_mode=aligned", *SMALL,
                      "--question=What does <image> show?"], capsys)
  assert code == 2 and err.startswith("error: --question 'What does <image> show?'")
  assert _test_image(wd) not in err


def test_long_video_summary_is_one_decision():
  """The answer is generated on the window where the summary's emotion is most likely,
  and the summary is the highest mean probability (not the middle window's class)."""
  from emo_jax.train import predict
  classes = ("happiness", "sadness")
  tl = [{"probs": {"happiness": 0.9, "sadness": 0.1}},
        {"probs": {"happiness": 0.2, "sadness": 0.8}},
        {"probs": {"happiness": 0.7, "sadness": 0.3}}]
  emotion, probs, window = predict.summarize(tl, classes)
  assert emotion == "happiness" and window == 0
  assert probs == pytest.approx({"happiness": 0.6, "sadness": 0.4})


def test_eval_and_export_change_nothing(trained, tmp_path, capsys):
  wd, _ = trained
  before = tree_digest(wd)
  code, out, err = cli([CONFIG, f"--workdir={wd}", "--mode=eval", *SMALL,
                        "--config.eval.max_examples=2", "--config.eval.modes=('likelihood',)",
                        f"--output_dir={tmp_path / 'ev'}"], capsys)
  assert code == 0, err
  assert os.path.exists(tmp_path / "ev" / "report.json")
  code, out, err = cli([CONFIG, f"--workdir={wd}", "--mode=export", *SMALL,
                        f"--export_dir={tmp_path / 'ex'}"], capsys)
  assert code == 0, err
  assert os.path.exists(tmp_path / "ex" / "bundle" / "model.safetensors")
  assert tree_digest(wd) == before


@pytest.mark.parametrize("case", ["typo_workdir", "no_checkpoint", "uncommitted_only"])
def test_read_only_mode_without_checkpoint(trained, tmp_path, capsys, case):
  """Item 3: exit 2 with `error:` and nothing created (no data generated)."""
  wd, _ = trained
  target = tmp_path / "wd"
  if case == "no_checkpoint":
    target.mkdir()
  elif case == "uncommitted_only":
    shutil.copytree(os.path.join(wd, "checkpoints", "1"), target / "checkpoints" / "1")
    os.remove(target / "checkpoints" / "1" / ckpt_lib.COMMIT_MARKER)
  before = tree_digest(str(tmp_path))
  for mode in ("predict", "eval", "export"):
    code, _, err = cli([CONFIG, f"--workdir={target}", f"--mode={mode}",
                        f"--input={_test_image(wd)}", "--config.predict.face_mode=aligned",
                        *SMALL], capsys)
    assert code == 2, (mode, err)
    assert err.startswith("error: ") and ("no committed checkpoint" in err
                                          or "does not exist" in err), err
    assert tree_digest(str(tmp_path)) == before, mode


def test_read_only_predict_bad_saved_config_is_clear(trained, tmp_path, capsys):
  wd, _ = trained
  ro = str(tmp_path / "ro")
  shutil.copytree(wd, ro, ignore=shutil.ignore_patterns("data"))
  with open(os.path.join(ro, "config.json"), "w") as f:
    f.write("{not json")
  code, _, err = cli([CONFIG, f"--workdir={ro}", "--mode=export", *SMALL], capsys)
  assert code == 2 and "config.json" in err and err.startswith("error: ")


# ------------------------------------------------------------- settings before heavy setup


@pytest.mark.parametrize("override,want", [
    ("--config.optimizer.lr=nan", "optimizer.lr must be finite"),
    ("--config.train.num_steps=0", "train.num_steps = 0"),
    ("--config.train.num_steps=-3", "train.num_steps = -3"),
    ("--config.train.compute_dtype=float8", "'float8' is not a dtype name"),
    ("--config.data.pipeline.global_batch_size=0", "global_batch_size must be >= 1"),
])
def test_bad_setting_is_one_line_before_any_work(tmp_path, capsys, override, want):
  wd = tmp_path / "wd"
  code, out, err = cli([CONFIG, f"--workdir={wd}", override], capsys)
  assert code == 2
  assert err.strip().splitlines() == [err.strip()] and err.startswith("error: ") and want in err
  assert not wd.exists()     # no config.json, no data, nothing


def test_misspelled_override_subprocess(tmp_path):
  p = subprocess.run([sys.executable, "-m", "emo_jax.main", CONFIG,
                      f"--workdir={tmp_path / 'wd'}", "--config.train.num_stesp=3"],
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert p.returncode == 2
  last = p.stderr.strip().splitlines()[-1]
  assert last == "error: unknown config field '--config.train.num_stesp' (did you mean " \
                 "'num_steps'?)", p.stderr
  assert "Traceback" not in p.stderr and not (tmp_path / "wd").exists()


@pytest.mark.parametrize("how", ["flags", "env"])
def test_coordinator_port_in_use_is_one_line(tmp_path, how):
  """Process 0 of a multi-host run whose coordinator port another program holds (an earlier
  run left behind): one error line, exit 2, before JAX starts the coordination service
  (which would crash the process and leave the other hosts waiting)."""
  with socket.socket() as held:
    held.bind(("127.0.0.1", free_port()))
    held.listen()
    address = f"127.0.0.1:{held.getsockname()[1]}"
    env, extra = _env(), []
    if how == "flags":
      extra = [f"--coordinator_address={address}", "--num_processes=2", "--process_id=0"]
    else:
      env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0")
    p = subprocess.run([sys.executable, "-m", "emo_jax.main", CONFIG,
                        f"--workdir={tmp_path / 'wd'}", *extra],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-3000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the coordinator port ") and "in use" in last, p.stderr
  assert "Traceback" not in p.stderr and not (tmp_path / "wd").exists()


def test_check_coordinator():
  port = free_port()
  main_lib.check_coordinator(f"127.0.0.1:{port}", 0)     # free: no error
  main_lib.check_coordinator(f"10.0.0.2:{port}", 1)      # not process 0: the port is remote
  for bad in ("localhost", "localhost:", ":8476", "host:http", "host:70000"):
    with pytest.raises(main_lib.UserError, match="is not host:port"):
      main_lib.check_coordinator(bad, 1)


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
def test_non_finite_loss_stops_without_saving_it(trained, tmp_path, capsys):
  wd0, _ = trained
  wd = tmp_path / "wd"
  code, out, err = cli([CONFIG, f"--workdir={wd}", f"--config.data.root={wd0}/data",
                        "--config.optimizer.lr=1e30", "--config.optimizer.groups=()",
                        "--config.checkpoint.every_steps=1", *NO_END], capsys)
  assert code == 2, err
  assert err.startswith("error: training stopped:") and "is not finite" not in err
  bad_step = int(err.split(" at step ")[1].split(";")[0])
  steps = ckpt_lib.step_folders(str(wd / "checkpoints"))
  assert all(s < bad_step for s in steps), (steps, bad_step)
  # What was saved is finite.
  import orbax.checkpoint as ocp
  for s in steps:
    flat = ocp.StandardCheckpointer().restore(wd / "checkpoints" / str(s) / "state")
    for k, v in flat.items():
      if np.issubdtype(np.asarray(v).dtype, np.floating):
        assert np.isfinite(np.asarray(v)).all(), (s, k)


def test_rerun_finished_workdir_with_fewer_steps_says_nothing_trained(trained, tmp_path,
                                                                      capsys):
  wd0, _ = trained
  wd = str(tmp_path / "wd")
  shutil.copytree(wd0, wd)
  code, out, err = cli([CONFIG, f"--workdir={wd}", "--config.train.num_steps=1", *NO_END],
                       capsys)
  assert code == 0, err
  assert "nothing to train" in out and "nothing was trained" in err
  assert json.loads(out[out.index("{"):])["trained_steps"] == 0


def test_foreign_data_root_is_refused(tmp_path, capsys):
  root = tmp_path / "my_dataset"
  root.mkdir()
  (root / "labels.txt").write_text("precious\n")
  before = tree_digest(str(root))
  code, _, err = cli([CONFIG, f"--workdir={tmp_path / 'wd'}", f"--config.data.root={root}",
                      *NO_END], capsys)
  assert code == 2 and "holds other files" in err and err.startswith("error: ")
  assert tree_digest(str(root)) == before


def test_data_root_creation_is_announced(tmp_path, caplog):
  from emo_jax.train import assets
  root = str(tmp_path / "fresh")
  with caplog.at_level("WARNING"):
    assets.ensure_default_data(root, num_images=14, num_clips=0, seed=0, image_size=32)
  assert any("creating the synthetic data folder" in r.getMessage() and root in r.getMessage()
             for r in caplog.records)
  assert assets.is_generated(root) and not os.path.exists(os.path.join(root, assets.GENERATING))


def test_sigint_saves_like_sigterm(trained, tmp_path, capsys, monkeypatch):
  """A real SIGINT to this process while step 1 of 2 is prepared (the fixture's own
  settings, so the compiled step comes from the shared cache): the job finishes step 1,
  saves it and exits 0."""
  from emo_jax.train import loop
  wd0, _ = trained
  wd = tmp_path / "wd"
  real, calls = loop.sharding_lib.to_global_batch, []

  def ctrl_c_during_first_batch(*a, **k):
    calls.append(1)
    if len(calls) == 1:
      os.kill(os.getpid(), signal.SIGINT)
    return real(*a, **k)
  monkeypatch.setattr(loop.sharding_lib, "to_global_batch", ctrl_c_during_first_batch)
  code, out, err = cli([CONFIG, f"--workdir={wd}", f"--config.data.root={wd0}/data",
                        "--config.train.num_steps=2", "--config.checkpoint.every_steps=1000",
                        *NO_END], capsys)
  assert code == 0, err
  summary = json.loads(out[out.index("{"):])
  assert summary["preempted"] is True and summary["step"] == 1
  assert ckpt_lib.step_folders(str(wd / "checkpoints")) == {1: True} and len(calls) == 1
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # restored


@pytest.mark.parametrize("spec", ["default:", "default:video", "default:test",
                                  "emo_llama_7b:fsdp", "emo_llama_7b:dp,video", "sweep:",
                                  "posttrain:", "posttrain:test", "posttrain:7b"])
def test_every_shipped_config_passes_validation(spec):
  import importlib
  from emo_jax.train import validate
  module, arg = spec.split(":")
  cfg = importlib.import_module(f"configs.{module}").get_config(arg or None)
  for mode in validate.MODES:
    validate.validate(cfg, mode)
