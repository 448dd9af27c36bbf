"""One rule for every dataset reader, fuzzed: undecodable label files are a
BadInputError('bad_encoding') naming the file; FERID's odd JSON (a directory named like
the file, deep nesting, an unknown label) gives a clear error or a counted skip; and a
sample listed twice is counted ('duplicate', or 'conflicting_labels' when the labels
differ) in every reader, never kept twice."""
import json
import os

import pytest

from input_pipeline import datasets
from input_pipeline.records import BadInputError, SkipCounter

BAD_BYTES = b"\xff\xfe\xff\x80\xff bad bytes \xff\n"   # neither UTF-8 nor GBK


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
  return path


# Per reader: (files of a tiny layout {relative path: text}, the label file to corrupt, load
# kwargs). Two rows name the same sample; `dup_rows(same)` gives those rows.
def _layout(name, same_label: bool):
  a, b = ("1", "1") if same_label else ("1", "2")
  if name == "rafdb":
    return ({"EmoLabel/list_patition_label.txt": f"train_00001.jpg {a}\ntrain_00001.jpg {b}\n"
                                                 "train_00002.jpg 3\n"},
            "EmoLabel/list_patition_label.txt", {})
  if name == "dfew":
    f = "EmoLabel_DataSplit/train(single-labeled)/set_1.csv"
    return {f: f"video_name,label\n1,{a}\n1,{b}\n2,3\n"}, f, {"fold": 1}
  if name == "ferv39k":
    f = "4_setups/All_scenes/train_All.csv"
    la, lb = ("Happy", "Happy") if same_label else ("Happy", "Sad")
    return ({f: f"Action/x/0001 {la}\nAction/x/0001 {lb}\nAction/x/0002 Fear\n"}, f, {})
  if name == "mafw":
    f = "split/single/no_caption/set_1/train.txt"
    la, lb = ("anger", "anger") if same_label else ("anger", "fear")
    return {f: f"00001.mp4 {la}\n00001.mp4 {lb}\n00002.mp4 fear\n"}, f, {"fold": 1}
  if name == "affectnet":
    f = "Manually_Annotated_file_lists/training.csv"
    row = "1/a.jpg,0,0,10,10,,{e},0.1,0.2\n"
    return ({f: row.format(e=a) + row.format(e=b) + "2/b.jpg,0,0,10,10,,3,0.1,0.2\n"}, f, {})
  if name == "ferplus":
    f = "FER2013Train/label.csv"
    va, vb = ("10,0", "10,0") if same_label else ("10,0", "0,10")
    rest = ",0,0,0,0,0,0,0,0"
    box = '"(0, 0, 48, 48)"'
    return ({f: f"a.png,{box},{va}{rest}\na.png,{box},{vb}{rest}\n"
                f"b.png,{box},0,0,10{rest[:-2]}\n"}, f, {})
  if name == "ferid":
    f = "train.json"
    conv = [{"from": "human", "value": "<image>\nHow?"}, {"from": "gpt", "value": "Fine."}]
    la, lb = ("fear", "fear") if same_label else ("fear", "anger")
    items = [{"id": "1", "image": "x.jpg", "conversations": conv, "label": la},
             {"id": "1b", "image": "x.jpg", "conversations": conv, "label": lb},
             {"id": "2", "image": "y.jpg", "conversations": conv, "label": "happy"}]
    return {f: json.dumps(items)}, f, {}
  raise AssertionError(name)


READERS = ["rafdb", "dfew", "ferv39k", "mafw", "affectnet", "ferplus", "ferid"]


def _make(tmp_path, name, same_label=True):
  files, label_file, kw = _layout(name, same_label)
  for rel, text in files.items():
    _write(os.path.join(tmp_path, rel), text)
  return str(tmp_path), os.path.join(tmp_path, label_file), dict(kw, check_files=False)


@pytest.mark.parametrize("name", READERS)
@pytest.mark.parametrize("bad", ["latin1", "utf16", "random"])
def test_fuzz_undecodable_label_file_is_bad_encoding(tmp_path, name, bad):
  root, label_file, kw = _make(tmp_path, name)
  text = open(label_file, encoding="utf-8").read()
  data = {"latin1": text.encode("latin-1") + "é\n".encode("latin-1") + BAD_BYTES,
          "utf16": text.encode("utf-16"),
          "random": BAD_BYTES * 7}[bad]
  with open(label_file, "wb") as f:
    f.write(data)
  with pytest.raises(BadInputError) as e:
    datasets.load_records(name, root, "train", skips=SkipCounter(), **kw)
  assert e.value.reason == "bad_encoding" and label_file in str(e.value)


@pytest.mark.parametrize("name", READERS)
@pytest.mark.parametrize("same_label", [True, False])
def test_fuzz_duplicates_are_counted(tmp_path, name, same_label):
  root, _, kw = _make(tmp_path, name, same_label)
  skips = SkipCounter()
  recs = datasets.load_records(name, root, "train", skips=skips, **kw)
  media = [r.media for r in recs]
  assert len(media) == len(set(media)), media     # never kept twice
  if same_label:
    assert len(recs) == 2 and skips.counts.get("duplicate") == 1, skips.counts
  else:
    assert len(recs) == 1 and skips.counts.get("conflicting_labels") == 2, skips.counts
  assert ("duplicate" if same_label else "conflicting_labels") in skips.report()
  with pytest.raises(BadInputError):      # strict: the first one is an error
    datasets.load_records(name, root, "train", strict=True, **kw)


def _ferid_item(**kw):
  conv = [{"from": "human", "value": "<image>\nHow?"}, {"from": "gpt", "value": "Fine."}]
  return dict({"id": "1", "image": "x.jpg", "conversations": conv}, **kw)


@pytest.mark.parametrize("case,reason", [
    ("dir_named_json", "not_a_file"),
    ("root_dir_named_json", "not_a_file"),
    ("deep_nesting", "malformed_json"),
    ("deep_nesting_jsonl", "malformed_json"),
    ("unknown_label", "unknown_label"),
    ("label_not_string", "unknown_label"),
    ("top_level_object", "malformed_json"),
])
def test_fuzz_ferid(tmp_path, case, reason):
  root = str(tmp_path / "ferid")
  os.makedirs(root)
  target = root
  if case == "dir_named_json":
    os.makedirs(os.path.join(root, "train.json"))
  elif case == "root_dir_named_json":
    target = os.path.join(root, "train.json")
    os.makedirs(target)
    _write(os.path.join(target, "train.json"), json.dumps([_ferid_item()]))
  elif case == "deep_nesting":
    _write(os.path.join(root, "train.json"), "[" * 200000 + "]" * 200000)
  elif case == "deep_nesting_jsonl":
    _write(os.path.join(root, "train.jsonl"),
           json.dumps(_ferid_item()) + "\n" + "[" * 200000 + "]" * 200000 + "\n")
  elif case == "unknown_label":
    _write(os.path.join(root, "train.json"), json.dumps([_ferid_item(label="hapy")]))
  elif case == "label_not_string":
    _write(os.path.join(root, "train.json"), json.dumps([_ferid_item(label=3)]))
  elif case == "top_level_object":
    _write(os.path.join(root, "train.json"), json.dumps({"data": []}))
  skips = SkipCounter()
  try:
    datasets.load_records("ferid", target, "train", skips=skips, check_files=False)
  except BadInputError as e:
    assert e.reason == reason and target in str(e), e
    return
  assert skips.counts.get(reason) == 1, skips.counts
  with pytest.raises(BadInputError) as e:
    datasets.load_records("ferid", target, "train", strict=True, check_files=False)
  assert e.value.reason == reason
