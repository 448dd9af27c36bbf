"""AUs on the language side: instruction data, the AU prompt sentence in the pipeline, the
multi-task affective evaluation's parsers and scores (and one run on a tiny model)."""
import json
import os

import numpy as np
import pytest

from input_pipeline import au, instructions, pipeline, synthetic
from input_pipeline.records import Record, SkipCounter
from input_pipeline import datasets


def test_au_instructions_and_yes_no_parser():
  inst = instructions.au_list_instruction([12, 6])
  assert inst.conversations[0]["value"] == (
      "<image>\nWhich facial action units are active in the image?")
  assert au.parse_au_list(inst.conversations[1]["value"]) == (6, 12)
  why = instructions.au_reason_instruction("happiness", [6, 12])
  assert why.conversations[0]["value"].endswith("Why does this person look happy?")
  assert au.parse_au_list(why.conversations[1]["value"]) == (6, 12)
  j = instructions.judgement_instruction("Is AU4 active?", False)
  assert j.conversations[1]["value"] == "no" and j.label_index == 1
  assert [instructions.parse_yes_no(t) for t in ("Yes, it is.", "No.", "not at all", "maybe")] \
      == [0, 1, 1, -1]
  # A record with AUs and no emotion label gets the AU-list question.
  r = Record(dataset="disfa", split="test", id="x", media="a.png", media_type="image",
             aus=(1, 0, -1, 0, 0, 1, 0, 0))
  got = instructions.instruction_for_record(r)
  assert au.parse_au_list(got.conversations[1]["value"]) == (1, 12)


def test_synthetic_au_instruction_json(tmp_path):
  root = str(tmp_path)
  synthetic.generate_au(root, num_subjects=3, num_tasks=2, num_frames=4, image_size=32)
  skips = SkipCounter()
  recs = {r.id: r for r in datasets.load_records("synthetic_au", root, split=None, fold=1)}
  items = json.load(open(os.path.join(root, "au_instructions_test.json")))
  items += json.load(open(os.path.join(root, "au_instructions_train.json")))
  ferid = datasets.load_records("ferid", os.path.join(root, "au_instructions_train.json"),
                                split=None, media_root=root, skips=skips)
  assert ferid and not skips.counts
  lists = [i for i in items if i["id"].startswith("au_")]
  for item in lists:   # the answer names exactly the frame's active AUs
    rid = item["id"][3:]
    if rid in recs:
      want = au.active_aus(recs[rid].aus, au.dataset_aus("synthetic_au"))
      assert au.parse_au_list(item["conversations"][1]["value"]) == want
  assert any(i["id"].startswith("why_") for i in items)


def _builder(tmp_path, au_prompt):
  from emo_jax.train import assets
  from input_pipeline.tokenizers import BertTokenizer, LlamaTokenizer
  root = str(tmp_path / "data")
  paths = assets.ensure_default_data(root, num_images=14, num_clips=0, image_size=32)
  cfg = pipeline.PipelineConfig(global_batch_size=1, num_frames=1, tokens_per_frame=2,
                                max_length=400, bucket_lengths=(400,), qformer_max_length=24,
                                image_size=32, face_size=32, au_prompt=au_prompt)
  tok = LlamaTokenizer(paths["tokenizer"])
  return pipeline.ExampleBuilder(cfg, tok, BertTokenizer(paths["qformer_vocab"])), tok, root


def test_pipeline_puts_the_au_sentence_in_the_prompt(tmp_path):
  pred_file = str(tmp_path / "aus.json")
  builder, tok, root = _builder(tmp_path, "")
  recs = datasets.load_records("synthetic", root, split="test", kind="image")
  with open(pred_file, "w") as f:
    json.dump({recs[0].id: [6, 12]}, f)
  plain = builder(recs[0], np.random.default_rng(0))
  with_au, _, _ = _builder(tmp_path, pred_file)
  ex = with_au(recs[0], np.random.default_rng(0))
  sentence = au.au_sentence([6, 12])
  text = tok.decode([int(t) for t, m in zip(ex["input_ids"], ex["attention_mask"])
                     if t >= 0 and m])
  plain_text = tok.decode([int(t) for t, m in zip(plain["input_ids"], plain["attention_mask"])
                           if t >= 0 and m])
  assert sentence in text and sentence not in plain_text
  assert text.index(sentence) < text.index("What is the facial expression")
  # An id missing from the predictions is a counted skip.
  out = with_au(recs[1], np.random.default_rng(0))
  assert out[pipeline.SKIP_KEY][0] == "missing_au_prediction"


def test_affect_scores_parse_and_score():
  from emo_jax.train import affect_eval
  classes = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
  s = affect_eval.score("emotion_open", [(3, classes), (4, classes), (0, classes)],
                        ["They look happy.", "angry", "no idea"])
  assert s["war"] == pytest.approx(1 / 3) and s["num_unparsed"] == 1
  s = affect_eval.score("emotion_judge", [0, 1, 0, 1], ["yes", "no", "no", "hmm"])
  assert s["accuracy"] == 0.5 and s["num_unparsed"] == 1
  aus = (1, 6, 12)
  truths = [np.array([0, 1, 1], np.int8), np.array([1, 0, -1], np.int8)]
  s = affect_eval.score("au_open", truths, ["AU6 and AU12", "lip corner puller"], aus)
  # AU1: FN 1 -> 0; AU6: TP 1 -> 1; AU12: TP 1 (second frame uncoded) -> 1.
  assert s["f1"] == {"AU1": 0.0, "AU6": 1.0, "AU12": 1.0}
  assert s["mean_f1"] == pytest.approx(2 / 3)
  md = affect_eval.markdown({"step": 1, "tasks": {"au_open": s}})
  assert "Action units" in md


@pytest.mark.slow
def test_affect_eval_runs_on_a_tiny_model(tmp_path):
  from configs import default
  from emo_jax.train import affect_eval, task as task_lib
  config = default.get_config("test")
  config.au.affect_eval.update(enabled=True, max_examples=2, max_new_tokens=3)
  model = task_lib.build_model(config)
  out = affect_eval.run(config, str(tmp_path), model, step=0)
  assert set(out["tasks"]) == set(affect_eval.TASKS)
  rep = json.load(open(out["report"]))
  assert rep["tasks"]["emotion_judge"]["num_samples"] == 4
  assert os.path.exists(os.path.join(str(tmp_path), "eval", "affect_report.md"))
