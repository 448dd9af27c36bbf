"""BP4D / DISFA readers on fixtures in their real layouts (and naming variants), the folds,
9 = not coded, DISFA's intensity threshold and the per-fold class weights."""
import os

import numpy as np
import pytest

from input_pipeline import au
from input_pipeline import datasets
from input_pipeline.records import BadInputError, SkipCounter

BP4D = au.DATASET_AUS["bp4d"]


def _touch(path, data=b"x"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def _jpg(path):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


def _bp4d_csv(path, rows):
  """rows: [(frame, {au: value})]; the real files have columns 0..39 (0 = frame)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(",".join(str(i) for i in range(40)) + "\n")
    for frame, vals in rows:
      f.write(",".join([str(frame)] + [str(vals.get(i, 0)) for i in range(1, 40)]) + "\n")


# F007 is in part 3 (fold 1's test set), F001 in part 1, M011 in part 2.
ROWS_F007 = [(2440, {1: 1, 12: 1, 6: 1}), (2441, {1: 9, 2: 9, 12: 1, 24: 9}),
             (2442, {a: 9 for a in BP4D}),            # nothing coded -> protocol note
             (2443, {4: 3}),                          # bad value -> counted skip
             (2444, {17: 1})]                         # no image -> missing_file


@pytest.mark.parametrize("layout", ["megraphau", "jaanet"])
def test_bp4d_frames_labels_and_9(tmp_path, layout):
  root = str(tmp_path)
  _bp4d_csv(f"{root}/AUCoding/AU_OCC/F007_T1.csv", ROWS_F007)
  _bp4d_csv(f"{root}/AUCoding/AU_OCC/F001_T3.csv", [(1, {2: 1})])
  _bp4d_csv(f"{root}/AUCoding/AU_OCC/X999_T1.csv", [(1, {})])   # malformed name
  _bp4d_csv(f"{root}/AUCoding/AU_OCC/F099_T1.csv", [(1, {})])   # no fold holds F099
  for frame in (2440, 2441, 2442, 2443):
    name = f"{frame}.jpg" if layout == "megraphau" else f"{frame:04d}.jpg"
    top = "img" if layout == "megraphau" else "BP4D"
    _jpg(f"{root}/{top}/F007/T1/{name}")
  _jpg(f"{root}/img/F001/T3/1.jpg" if layout == "megraphau" else f"{root}/BP4D/F001/T3/0001.jpg")
  skips = SkipCounter()
  test = datasets.load_records("bp4d", root, split="test", fold=1, skips=skips)
  assert [r.id for r in test] == ["F007_T1_2440", "F007_T1_2441"]
  want0 = tuple(1 if a in (1, 6, 12) else 0 for a in BP4D)
  want1 = tuple(-1 if a in (1, 2, 24) else (1 if a == 12 else 0) for a in BP4D)
  assert test[0].aus == want0 and test[1].aus == want1
  assert all(r.split == "test" and r.fold == 1 and r.media_type == "image" for r in test)
  assert os.path.basename(test[0].media) == "2440.jpg"
  assert skips.counts == {"bad_au_value": 1, "missing_file": 1, "malformed_name": 1}
  assert skips.notes == {"au_not_coded": 1, "subject_not_in_folds": 1}
  train = datasets.load_records("bp4d", root, split="train", fold=1)
  assert [(r.id, r.split) for r in train] == [("F001_T3_1", "train")]
  # Fold 3 tests part 1: F001 moves to the test split.
  assert [r.split for r in datasets.load_records("bp4d", root, split=None, fold=3)
          if r.id.startswith("F001")] == ["test"]
  with pytest.raises(BadInputError, match="bad_au_value"):
    datasets.load_records("bp4d", root, split="test", fold=1, strict=True)


def test_bp4d_video_names(tmp_path):
  root = str(tmp_path)
  _bp4d_csv(f"{root}/AUCoding/AU_OCC/F007_T5.csv", [(3, {1: 1})])
  _bp4d_csv(f"{root}/AUCoding/AU_OCC/F015_T1.csv", [(1, {2: 1})])
  _bp4d_csv(f"{root}/AUCoding/AU_OCC/F006_T2.csv", [(1, {2: 1})])
  _touch(f"{root}/2F07_09.avi")                 # raw release name: _09 = T5
  _touch(f"{root}/videos/F015_T1.mp4")          # renamed copy
  skips = SkipCounter()
  recs = datasets.load_records("bp4d", root, split="test", fold=1, media="video", skips=skips)
  assert [(r.id, os.path.basename(r.media), r.extra["frame"]) for r in recs] == [
      ("F007_T5_3", "2F07_09.avi", 3), ("F015_T1_1", "F015_T1.mp4", 1)]
  assert skips.counts == {"missing_file": 1}    # F006 T2 has no video


def test_bp4d_missing_column_skips_file(tmp_path):
  root = str(tmp_path)
  path = f"{root}/AU_OCC/F007_T1.csv"            # AU_OCC directly under the root
  os.makedirs(os.path.dirname(path))
  with open(path, "w") as f:
    f.write("0,1,2\n1,1,0\n")
  skips = SkipCounter()
  assert datasets.load_records("bp4d", root, split="test", skips=skips) == []
  assert skips.counts == {"missing_au_column": 1}


def _disfa_labels(root, subject_dir, file_fmt, n, values):
  for a in au.DISFA_CODED_AUS:
    lines = values.get(a, [f"{f},0" for f in range(1, n + 1)])
    _touch(os.path.join(root, "ActionUnit_Labels", subject_dir, file_fmt.format(a=a)),
           ("\n".join(lines) + "\n").encode())


def test_disfa_threshold_variants_and_frames(tmp_path):
  root = str(tmp_path)
  # SN003 (part 3 -> fold 1 test), written with the usual names; AU12 intensities 0..3.
  _disfa_labels(root, "SN003", "SN003_au{a}.txt", 4, {
      12: ["1,0", "2,1", "3,2", "4,3"],
      25: ["1,5", "2,2", "3,x", "4,1"],       # bad line: AU25 of frame 3 uncoded
      26: ["1,0", "2,0", "4,0"]})             # frame 3 missing: AU26 uncoded
  # SN29 folder and zero-padded AU numbers: a naming variant.
  _disfa_labels(root, "SN29", "SN29_au{a:02d}.txt", 2, {1: ["1,4", "2,0"]})
  for f in range(4):
    _jpg(f"{root}/img/SN003/{f}.png")
  _jpg(f"{root}/img/SN029/0.png")              # frame 2 of SN029 has no image
  skips = SkipCounter()
  recs = datasets.load_records("disfa", root, split="test", fold=1, skips=skips)
  aus = au.DATASET_AUS["disfa"]
  i12, i25, i26, i1 = aus.index(12), aus.index(25), aus.index(26), aus.index(1)
  by_id = {r.id: r for r in recs}
  assert sorted(by_id) == ["SN003_1", "SN003_2", "SN003_3", "SN003_4", "SN029_1"]
  assert [by_id[f"SN003_{f}"].aus[i12] for f in (1, 2, 3, 4)] == [0, 0, 1, 1]
  assert [by_id[f"SN003_{f}"].aus[i25] for f in (1, 2, 3, 4)] == [1, 1, -1, 0]
  assert by_id["SN003_3"].aus[i26] == -1 and by_id["SN003_2"].aus[i26] == 0
  assert by_id["SN029_1"].aus[i1] == 1
  assert os.path.basename(by_id["SN003_1"].media) == "0.png"   # label 1 <-> image 0
  assert skips.counts == {"bad_au_value": 1, "missing_file": 1}


def test_disfa_videos_any_case_and_missing_au_file(tmp_path):
  root = str(tmp_path)
  _disfa_labels(root, "SN003", "SN003_au{a}.txt", 2, {})
  _disfa_labels(root, "SN029", "SN029_au{a}.txt", 2, {})
  _disfa_labels(root, "SN023", "SN023_au{a}.txt", 2, {})
  os.remove(f"{root}/ActionUnit_Labels/SN023/SN023_au9.txt")
  _touch(f"{root}/Videos_LeftCamera/leftVideoSN003_Comp.avi")
  _touch(f"{root}/Videos_LeftCamera/LeftVideoSN029_comp.avi")
  skips = SkipCounter()
  recs = datasets.load_records("disfa", root, split="test", fold=1, media="video", skips=skips)
  assert sorted({os.path.basename(r.media) for r in recs}) == [
      "LeftVideoSN029_comp.avi", "leftVideoSN003_Comp.avi"]
  assert {r.extra["frame"] for r in recs} == {1, 2}
  assert skips.counts == {"missing_file": 1}


@pytest.mark.parametrize("name", ["bp4d", "disfa"])
def test_folds_are_subject_exclusive(name):
  everyone = set().union(*map(set, au.PARTS[name]))
  assert len(everyone) == (41 if name == "bp4d" else 27)
  tests = []
  for fold in (1, 2, 3):
    tr, te = set(au.fold_subjects(name, fold, "train")), set(au.fold_subjects(name, fold, "test"))
    assert not tr & te and tr | te == everyone
    tests.append(te)
  assert set().union(*tests) == everyone and sum(map(len, tests)) == len(everyone)
  assert au.fold_subjects(name, 1, "test") == au.PARTS[name][2]   # fold 1 tests part 3
  assert au.fold_subjects(name, 3, "test") == au.PARTS[name][0]


def test_class_weights_formula_and_uncoded():
  rng = np.random.default_rng(0)
  labels = (rng.uniform(size=(500, 5)) < np.array([0.05, 0.2, 0.5, 0.3, 0.1])).astype(np.int8)
  labels[rng.uniform(size=labels.shape) < 0.2] = -1
  w = au.class_weights(labels)
  rates = np.array([(labels[:, i] == 1).sum() / (labels[:, i] >= 0).sum() for i in range(5)])
  np.testing.assert_allclose(w, (1 / rates) / (1 / rates).sum() * 5)
  assert w.sum() == pytest.approx(5.0) and np.argmax(w) == 0
  # Uncoded entries are not negatives: marking them 0 would change the weights.
  assert not np.allclose(w, au.class_weights(np.where(labels < 0, 0, labels)))
  # From reader records of the training folds.
  recs = [datasets.Record(dataset="bp4d", split="train", id=str(i), media="", media_type="image",
                          aus=tuple(int(v) for v in row)) for i, row in enumerate(labels)]
  np.testing.assert_allclose(au.class_weights(au.label_matrix(recs)), w)


def test_au_sentence_and_parse():
  s = au.au_sentence([12, 6])
  assert s == "Active facial action units: AU6 (cheek raiser), AU12 (lip corner puller)."
  assert au.parse_au_list(s) == (6, 12)
  assert au.parse_au_list("I see au 4, AU07 and a nose wrinkler.", allowed=(4, 7, 9)) == (4, 7, 9)
  assert au.parse_au_list("nothing") == ()
