"""The AU stage on the synthetic AU data: trains a fold's head on a frozen vision tower,
scores it, writes and appends the report, resumes from the saved head."""
import json
import os

import numpy as np
import pytest
from flax import nnx

from configs import default
from emo_jax.train import au_train
from emo_jax.train import task as task_lib


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("au_wd"))
  config = default.get_config("test")
  config.au.folds = (1, 2)          # the second fold reuses the first fold's compiled step
  model = task_lib.build_model(config)
  return config, wd, model


def test_au_stage_trains_scores_and_resumes(setup):
  config, wd, model = setup
  vit_before = nnx.state(model.vision_tower, nnx.Param)
  vit_before = [np.array(x) for x in __import__("jax").tree.leaves(vit_before)]
  os.makedirs(os.path.join(wd, "eval"))
  with open(os.path.join(wd, "eval", "report.md"), "w") as f:
    f.write("# Evaluation\n\nemotion tables\n")
  out = au_train.run(config, wd, model)
  rep = json.load(open(out["report"]))
  assert 0.0 <= out["mean_f1"] <= 1.0 and 0.0 < out["all_positive_mean_f1"] <= 1.0
  assert list(rep["folds"]) == ["1", "2"] and len(rep["aus"]) == 14
  assert rep["mean_f1"] == (rep["folds"]["1"]["mean_f1"] + rep["folds"]["2"]["mean_f1"]) / 2
  log = rep["log"]["1"]
  assert log["steps"] == 3 and log["scored"] == log["test_records"] > 0
  assert abs(sum(log["class_weights"].values()) - 14) < 1e-6
  md = open(os.path.join(wd, "eval", "report.md")).read()
  assert md.startswith("# Evaluation") and "## Action units (synthetic_au)" in md
  # The vision tower is untouched by the AU stage.
  after = [np.array(x) for x in __import__("jax").tree.leaves(nnx.state(model.vision_tower,
                                                                         nnx.Param))]
  for a, b in zip(vit_before, after):
    np.testing.assert_array_equal(a, b)
  # A second run restores the saved head (no training) and scores the same.
  out2 = au_train.run(config, wd, model)
  rep2 = json.load(open(out2["report"]))
  assert "restored" in rep2["log"]["1"] and "restored" in rep2["log"]["2"]
  assert out2["mean_f1"] == out["mean_f1"]
  assert open(os.path.join(wd, "eval", "report.md")).read().count("## Action units") == 1


def test_write_predictions_for_records_without_au_labels(setup, tmp_path):
  config, wd, model = setup
  from input_pipeline import au, datasets, synthetic
  root = str(tmp_path / "stills")
  synthetic.generate(root, num_images=7, num_clips=0, image_size=32)
  recs = datasets.load_records("synthetic", root, split=None, kind="image")
  assert all(r.aus is None for r in recs)
  if not os.path.exists(os.path.join(wd, "au", "fold1", "au_head.safetensors")):
    au_train.run(config, wd, model)
  out = str(tmp_path / "aus.json")
  skipped = au_train.write_predictions(config, wd, recs, out, model=model)
  preds = json.load(open(out))
  assert not skipped and sorted(preds) == sorted(r.id for r in recs)
  assert all(set(v) <= set(au.dataset_aus("synthetic_au")) for v in preds.values())
