"""Dataset readers on tiny fixtures written in each release's real layout, plus bad input."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from input_pipeline import datasets
from input_pipeline.datasets import ferplus
from input_pipeline.records import BadInputError, SkipCounter


def _img(path, value=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


def _write(path, text, encoding="utf-8"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding=encoding, newline="") as f:
    f.write(text)


def _load(name, root, split="train", fold=None, **kw):
  skips = SkipCounter()
  recs = datasets.load_records(name, str(root), split=split, fold=fold, skips=skips, **kw)
  return recs, skips


# ------------------------------------------------------------------------------ RAF-DB


def _rafdb(root):
  base = os.path.join(root, "basic")
  lines = ["train_00001.jpg 1", "train_00002.jpg 4", "train_00003.jpg 7", "test_0001.jpg 5",
           "test_0002.jpg 6", "train_00004.jpg 9",  # unknown id
           "train_00005.jpg 2",  # image missing
           "garbage line here"]
  _write(os.path.join(base, "EmoLabel", "list_patition_label.txt"), "\n".join(lines) + "\n")
  for stem in ("train_00001", "train_00002", "train_00003", "test_0001", "test_0002",
               "train_00004"):
    _img(os.path.join(base, "Image", "aligned", f"{stem}_aligned.jpg"))
  return base


@pytest.mark.parametrize("use_parent", [True, False])
def test_rafdb(tmp_path, use_parent):
  base = _rafdb(str(tmp_path))
  root = str(tmp_path) if use_parent else base
  train, skips = _load("rafdb", root, "train")
  assert [(r.id, r.label) for r in train] == [
      ("train_00001", "surprise"), ("train_00002", "happiness"), ("train_00003", "neutral")]
  assert train[0].media == os.path.join(os.path.realpath(base), "Image", "aligned",
                                        "train_00001_aligned.jpg")
  assert all(r.split == "train" and r.dataset == "rafdb" and r.media_type == "image"
             for r in train)
  assert skips.counts == {"unknown_label": 1, "missing_file": 1, "malformed_line": 1}
  test, _ = _load("rafdb", root, "test")
  assert [(r.id, r.label, r.split) for r in test] == [("test_0001", "sadness", "test"),
                                                      ("test_0002", "anger", "test")]
  with pytest.raises(BadInputError) as e:
    datasets.load_records("rafdb", root, split="train", strict=True)
  assert e.value.reason == "unknown_label" and "list_patition_label.txt:6" in str(e.value)


# ------------------------------------------------------------------------------ AffectNet


def _affectnet_row(path, expr, lms=None):
  lms = ";".join(str(float(i)) for i in range(136)) if lms is None else lms
  return [path, "10", "12", "100", "90", lms, str(expr), "0.5", "-0.25"]


@pytest.mark.parametrize("header", [True, False])
def test_affectnet(tmp_path, header):
  root = str(tmp_path)
  rows = [_affectnet_row("1/a.jpg", 1), _affectnet_row("1/b.jpg", 7),
          _affectnet_row("2/c.jpg", 8), _affectnet_row("2/d.jpg", 10),
          _affectnet_row("../../etc/passwd", 0), _affectnet_row("2/e.jpg", 6, lms="1;2;3"),
          _affectnet_row("2/missing.jpg", 2)]
  for name in ("training.csv", "validation.csv"):
    path = os.path.join(root, "Manually_Annotated_file_lists", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
      w = csv.writer(f)
      if header:
        w.writerow(datasets.affectnet.HEADER)
      w.writerows(rows)
  for n in ("1/a.jpg", "1/b.jpg", "2/c.jpg", "2/d.jpg", "2/e.jpg"):
    _img(os.path.join(root, "Manually_Annotated", "Manually_Annotated_Images", n))
  recs, skips = _load("affectnet", root, "train")
  assert [(r.id, r.label) for r in recs] == [("1/a.jpg", "happy"), ("1/b.jpg", "contempt")]
  assert recs[0].crop_box == (10.0, 12.0, 100.0, 90.0)
  assert len(recs[0].landmarks) == 136 and recs[0].landmarks[3] == 3.0
  assert recs[0].extra == {"valence": 0.5, "arousal": -0.25}
  assert skips.counts == {"path_escapes_root": 1, "malformed_row": 1, "missing_file": 1}
  assert skips.notes == {"affectnet_none": 1, "affectnet_non-face": 1}
  val, _ = _load("affectnet", root, "val")
  assert {r.split for r in val} == {"val"} and len(val) == 2
  seven, skips7 = _load("affectnet7", root, "train")
  assert [(r.dataset, r.label) for r in seven] == [("affectnet7", "happy")]
  assert skips7.notes["affectnet7_contempt"] == 1
  with pytest.raises(BadInputError) as e:
    datasets.load_records("affectnet", root, strict=True)
  assert e.value.reason == "path_escapes_root" and "passwd" in str(e.value)


# ------------------------------------------------------------------------------ FERPlus


def test_ferplus_majority_vote_rule():
  # neutral .. contempt, unknown, NF
  assert ferplus.majority_vote([0, 0, 0, 0, 2, 1, 0, 7, 0, 0]) == "contempt"  # 7 > 9 / 2
  assert ferplus.majority_vote([4, 4, 0, 0, 0, 0, 0, 0, 2, 0]) == "unknown"  # 4 !> 5
  assert ferplus.majority_vote([1, 1, 1, 1, 1, 1, 1, 1, 1, 1]) == "unknown"  # all outliers
  assert ferplus.majority_vote([5, 1, 1, 1, 1, 0, 0, 0, 0, 0]) == "neutral"  # 1-votes dropped
  assert ferplus.majority_vote([0, 0, 0, 0, 0, 0, 0, 0, 2, 8]) == "nf"
  assert ferplus.majority_vote([0, 6, 0, 0, 0, 0, 0, 0, 4, 0]) == "happiness"


def _ferplus_csv(root, vote_rows, usages, names, extra_old_row=False):
  px = lambda v: " ".join([str(v)] * 2304)
  old = [["emotion", "pixels", "Usage"]] + [["0", px(10 * i), u] for i, u in enumerate(usages)]
  if extra_old_row:
    old.append(["0", px(1), "Training"])
  new = [["Usage", "Image name"] + list(ferplus.VOTE_COLUMNS[:8]) + ["unknown", "NF"]]
  new += [[u, n] + [str(v) for v in votes] for u, n, votes in zip(usages, names, vote_rows)]
  for fname, rows in (("fer2013.csv", old), ("fer2013new.csv", new)):
    with open(os.path.join(root, fname), "w", newline="") as f:
      csv.writer(f).writerows(rows)


def test_ferplus_csv_pairs_by_row_position(tmp_path):
  root = str(tmp_path)
  votes = [[10, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 9, 1, 0, 0, 0, 0, 0, 0],
           [0, 0, 0, 0, 0, 0, 0, 0, 0, 10], [3, 3, 3, 0, 0, 0, 0, 0, 1, 0],
           [0, 0, 0, 0, 0, 0, 0, 8, 0, 0], [0, 0, 0, 0, 0, 6, 0, 0, 0, 0]]
  usages = ["Training", "Training", "Training", "Training", "PrivateTest", "PublicTest"]
  # Names deliberately out of row order, one empty (NF row): pairing must use the row.
  names = ["fer0000009.png", "fer0000002.png", "", "fer0000005.png", "fer0000001.png",
           "fer0000004.png"]
  _ferplus_csv(root, votes, usages, names)
  train, skips = _load("ferplus", root, "train")
  assert [(r.id, r.label) for r in train] == [("fer0000009", "neutral"),
                                              ("fer0000002", "surprise")]
  assert train[1].pixels.shape == (48, 48) and int(train[1].pixels[0, 0]) == 10  # row 1
  assert train[0].media_type == "pixels" and int(train[0].pixels[5, 5]) == 0
  assert skips.notes == {"ferplus_nf": 1, "ferplus_unknown": 1} and skips.total == 0
  test, _ = _load("ferplus", root, "test")
  assert [(r.label, int(r.pixels[0, 0])) for r in test] == [("contempt", 40)]
  val, _ = _load("ferplus", root, "val")
  assert [r.label for r in val] == ["disgust"]
  _ferplus_csv(root, votes, usages, names, extra_old_row=True)
  with pytest.raises(BadInputError) as e:
    _load("ferplus", root, "train")
  assert e.value.reason == "row_count_mismatch"


def test_ferplus_folders(tmp_path):
  root = str(tmp_path)
  for folder, lines in (
      ("FER2013Train", ['fer0032220.png,"(0, 0, 48, 48)",0,0,0,0,2,1,0,7,0,0',
                        'fer0032221.png,"(0, 0, 48, 48)",0,10,0,0,0,0,0,0,0,0',
                        'fer0032222.png,"(0, 0, 48, 48)",5,5,0,0,0,0,0,0,0,0',
                        'fer0032223.png,"(0, 0, 48, 48)",0,10,0,0']),
      ("FER2013Test", ['fer0000001.png,"(0, 0, 48, 48)",0,0,0,9,0,0,0,0,1,0'])):
    _write(os.path.join(root, folder, "label.csv"), "\n".join(lines) + "\n")
    for line in lines:
      _img(os.path.join(root, folder, line.split(",")[0]))
  train, skips = _load("ferplus", root, "train")
  assert [(r.id, r.label) for r in train] == [("fer0032220", "contempt"),
                                              ("fer0032221", "happiness")]
  assert train[0].extra["votes"] == (0, 0, 0, 0, 2, 1, 0, 7, 0, 0)
  assert skips.counts == {"malformed_row": 1} and skips.notes == {"ferplus_unknown": 1}
  test, _ = _load("ferplus", root, "test")
  assert [(r.label, r.split) for r in test] == [("sadness", "test")]


# ------------------------------------------------------------------------------ DFEW


@pytest.mark.parametrize("sep", ["single-labeled", "single_labeled"])
def test_dfew_clips_and_frames(tmp_path, sep):
  root = str(tmp_path)
  for split, fold_rows in (("train", {1: "12,1\n345,4\n7,9\n", 2: "1,2\n"}),
                           ("test", {1: "6,7\n99,3\n", 2: "12,1\n"})):
    for fold, rows in fold_rows.items():
      _write(os.path.join(root, "EmoLabel_DataSplit", f"{split}({sep})", f"set_{fold}.csv"),
             "video_name,label\n" + rows)
  for stem in ("00012", "00345", "00006", "00007", "00001"):
    _write(os.path.join(root, "Clip", "original", f"{stem}.mp4"), "x")
  train, skips = _load("dfew", root, "train", fold=1)
  assert [(r.id, r.label, r.fold) for r in train] == [("00012", "happy", 1),
                                                      ("00345", "angry", 1)]
  assert train[0].media.endswith(os.path.join("Clip", "original", "00012.mp4"))
  assert skips.counts == {"unknown_label": 1}
  test, skips = _load("dfew", root, "test", fold=1)
  assert [(r.id, r.label) for r in test] == [("00006", "fear")]
  assert skips.counts == {"missing_file": 1}
  assert [r.label for r in _load("dfew", root, "train", fold=2)[0]] == ["sad"]
  # Frame folders, natural order.
  for i in (1, 2, 10, 11):
    _img(os.path.join(root, "Clip", "clip_224x224", "00012", f"00012_{i}.jpg"))
  os.makedirs(os.path.join(root, "Clip", "clip_224x224", "00345"))
  frames, skips = _load("dfew", root, "train", fold=1, media="frames")
  assert [os.path.basename(p) for p in frames[0].media] == [
      "00012_1.jpg", "00012_2.jpg", "00012_10.jpg", "00012_11.jpg"]
  assert frames[0].media_type == "frames" and len(frames) == 1
  assert skips.counts == {"unknown_label": 1, "no_frames": 1}
  with pytest.raises(ValueError):
    _load("dfew", root, "train", fold=6)


# ------------------------------------------------------------------------------ FERV39k


def test_ferv39k(tmp_path):
  root = str(tmp_path)
  _write(os.path.join(root, "4_setups", "All_scenes", "train_All.csv"),
         "Action/Sad/0010 Sad\nDaily/Happy/0003 Happy\nDaily/Bored/0001 Bored\n"
         "../../x/0001 Happy\n")
  _write(os.path.join(root, "4_setups", "All_scenes", "test_All.csv"), "Action/Fear/0002 Fear\n")
  for rel in ("Action/Sad/0010", "Daily/Happy/0003", "Action/Fear/0002"):
    _write(os.path.join(root, "0_7_LabelClips", rel + ".mp4"), "x")
  _img(os.path.join(root, "2_ClipsforFaceCrop", "Action", "Sad", "0010", "1.jpg"))
  train, skips = _load("ferv39k", root, "train")
  assert [(r.id, r.label, r.extra["scene"]) for r in train] == [
      ("Action/Sad/0010", "sad", "Action"), ("Daily/Happy/0003", "happy", "Daily")]
  assert skips.counts == {"unknown_label": 1, "path_escapes_root": 1}
  assert [r.label for r in _load("ferv39k", root, "test")[0]] == ["fear"]
  frames, skips = _load("ferv39k", root, "train", media="frames")
  assert len(frames) == 1 and skips.counts["missing_file"] == 1


# ------------------------------------------------------------------------------ MAFW


@pytest.mark.parametrize("layout", ["split/single/no_caption",
                                    "Train_Test_Set/single/no_caption_new"])
def test_mafw(tmp_path, layout):
  root = str(tmp_path)
  d = os.path.join(root, *layout.split("/"), "set_3")
  # GBK-encoded file with tabs and spaces; one label spelled as a synonym-free typo.
  _write(os.path.join(d, "train.txt"),
         "00151.mp4\tanger\n00152.mp4 Helplessness\n00153   anxiety\n00154.mp4 boredom\n"
         "00155.mp4 disappointment  \n", encoding="gbk")
  with open(os.path.join(d, "train.txt"), "ab") as f:
    f.write("00156.mp4 悲伤\n".encode("gbk"))  # a GBK-only line: forces the fallback
  _write(os.path.join(d, "test.txt"), "00160.mp4 contempt\n")
  for n in ("00151", "00152", "00153", "00155", "00156", "00160"):
    _write(os.path.join(root, "data", "clips", n + ".mp4"), "x")
  train, skips = _load("mafw", root, "train", fold=3)
  assert [(r.id, r.label, r.fold) for r in train] == [
      ("00151", "anger", 3), ("00152", "helplessness", 3), ("00153", "anxiety", 3),
      ("00155", "disappointment", 3)]
  assert skips.counts == {"unknown_label": 2}
  assert [r.label for r in _load("mafw", root, "test", fold=3)[0]] == ["contempt"]
  with pytest.raises(BadInputError) as e:
    _load("mafw", root, "train", fold=1)
  assert e.value.reason == "missing_file"


# ------------------------------------------------------------------------------ FERID


def test_ferid(tmp_path):
  root = str(tmp_path)
  _img(os.path.join(root, "imgs", "a.jpg"))
  _write(os.path.join(root, "vids", "b.mp4"), "x")
  for i in (1, 2):
    _img(os.path.join(root, "vids", "c", f"{i}.jpg"))
  q = ("<image>\nWhat is the facial expression of the person in the image? Choose one from "
       "the following options: {surprise, fear, happiness}.")
  items = [
      {"id": "a", "image": "imgs/a.jpg",
       "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "Fear."}]},
      {"id": "b", "video": "vids/b.mp4",
       "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                         {"from": "gpt", "value": "A smile."},
                         {"from": "human", "value": "Why?"},
                         {"from": "gpt", "value": "Raised mouth corners."}]},
      {"id": "c", "video": "vids/c", "conversations": [{"from": "human", "value": q},
                                                       {"from": "gpt", "value": "surprise"}]},
      {"id": "bad1", "image": "imgs/a.jpg", "conversations": [{"from": "gpt", "value": "x"}]},
      {"id": "bad2", "image": "imgs/a.jpg"},
      {"id": "bad3", "conversations": [{"from": "human", "value": q},
                                       {"from": "gpt", "value": "fear"}]},
      {"id": "esc", "image": "../outside.jpg",
       "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "fear"}]},
      {"id": "gone", "image": "imgs/none.jpg",
       "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "fear"}]},
      "not a record",
  ]
  _write(os.path.join(root, "train.json"), json.dumps(items))
  recs, skips = _load("ferid", root, "train")
  assert [(r.id, r.media_type, r.label) for r in recs] == [
      ("a", "image", "fear"), ("b", "video", None), ("c", "frames", "surprise")]
  assert len(recs[1].conversations) == 4 and recs[1].conversations[3]["from"] == "gpt"
  assert [os.path.basename(p) for p in recs[2].media] == ["1.jpg", "2.jpg"]
  assert skips.counts == {"malformed_record": 4, "path_escapes_root": 1, "missing_file": 1}
  # A malformed JSON file is a counted skip, or an error naming the file when strict.
  _write(os.path.join(root, "test.json"), '[{"id": "x", "image": ')
  recs, skips = _load("ferid", root, "test")
  assert recs == [] and skips.counts == {"malformed_json": 1}
  with pytest.raises(BadInputError) as e:
    datasets.load_records("ferid", os.path.join(root, "test.json"), strict=True)
  assert e.value.reason == "malformed_json" and "test.json" in str(e.value)
  # JSON Lines: one bad line is skipped, the others read.
  _write(os.path.join(root, "lines", "val.jsonl"),
         json.dumps(items[0]) + "\n{oops\n" + json.dumps(items[2]) + "\n")
  recs, skips = _load("ferid", os.path.join(root, "lines"), "val", media_root=root)
  assert [r.id for r in recs] == ["a", "c"] and skips.counts == {"malformed_json": 1}


def test_load_records_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset"):
    datasets.load_records("imagenet", str(tmp_path))
  with pytest.raises(BadInputError) as e:
    datasets.load_records("rafdb", str(tmp_path / "nope"))
  assert e.value.reason == "missing_file"
  with pytest.raises(BadInputError) as e:  # root exists, label file does not
    datasets.load_records("rafdb", str(tmp_path))
  assert e.value.reason == "missing_file" and "list_patition_label.txt" in str(e.value)


def test_skip_counter_report_and_pickle():
  import pickle
  s = SkipCounter()
  s.skip("missing_file", "/a.jpg")
  s.skip("missing_file", "/b.jpg")
  s.note("affectnet_none", 3)
  s2 = pickle.loads(pickle.dumps(s))
  s2.skip("corrupt_image", "/c.jpg", "truncated")
  s.merge(s2)
  assert s.counts == {"missing_file": 4, "corrupt_image": 1}
  assert s.notes == {"affectnet_none": 6}
  rep = s.report()
  assert "missing_file: 4" in rep and "/a.jpg" in rep and "affectnet_none: 6" in rep
