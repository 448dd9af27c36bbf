"""input_pipeline.synthetic: layouts, read-back through the real readers, determinism."""
import filecmp
import json
import os

import numpy as np
import pytest

from input_pipeline import datasets, labels, media, synthetic
from input_pipeline.records import SkipCounter

KW = dict(num_images=21, num_clips=10, image_size=64, clip_size=64, clip_frames=8)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  a = str(tmp_path_factory.mktemp("a"))
  b = str(tmp_path_factory.mktemp("b"))
  c = str(tmp_path_factory.mktemp("c"))
  synthetic.generate(a, seed=3, **KW)
  synthetic.generate(b, seed=3, **KW)
  synthetic.generate(c, seed=4, **KW)
  return a, b, c


def _files(root):
  out = []
  for d, _, names in os.walk(root):
    out += [os.path.relpath(os.path.join(d, n), root) for n in names]
  return sorted(out)


def test_rafdb_layout_read_back(roots):
  root = roots[0]
  lines = open(os.path.join(root, "EmoLabel", "list_patition_label.txt")).read().split("\n")
  assert lines[0] == "train_00001.jpg 1" and lines[-1] == ""
  assert any(l.startswith("test_0001.jpg ") for l in lines)
  train = datasets.load_records("synthetic", root, "train", kind="image", strict=True)
  test = datasets.load_records("synthetic", root, "test", kind="image", strict=True)
  assert len(train) + len(test) == 21 and len(test) == 4
  # The same files through the RAF-DB reader: same ids, labels from the 1-based ids.
  raf = datasets.load_records("rafdb", root, None, strict=True)
  assert [(r.id, r.label) for r in raf] == [(r.id, r.label) for r in train + test]
  assert {r.label for r in train} == set(labels.classes("rafdb"))
  img = media.load_image(train[0].media)
  assert img.shape == (64, 64, 3)
  assert os.path.basename(train[0].media) == "train_00001_aligned.jpg"


def test_dfew_layout_clips_and_folds(roots):
  root = roots[0]
  seen_test = []
  for fold in range(1, 6):
    tr = datasets.load_records("synthetic", root, "train", fold, kind="video", strict=True)
    te = datasets.load_records("synthetic", root, "test", fold, kind="video", strict=True)
    assert not {r.id for r in tr} & {r.id for r in te} and len(tr) + len(te) == 10
    seen_test += [r.id for r in te]
    # The DFEW reader sees DFEW ids/names; they name the same emotion.
    dfew = datasets.load_records("dfew", root, "test", fold, strict=True)
    assert [labels.canonical(d.label) for d in dfew] == [labels.canonical(r.label) for r in te]
  assert sorted(seen_test) == [f"{i:05d}" for i in range(1, 11)]  # each clip tested once
  clip = datasets.load_records("synthetic", root, "test", 1, kind="video")[0]
  assert media.count_frames(clip.media) == 8
  frames = media.decode_video(clip.media, 4)
  assert frames.shape == (4, 64, 64, 3)


def test_instructions_reference_the_media(roots):
  root = roots[0]
  recs = datasets.load_records("synthetic", root, "train", kind="instructions", strict=True)
  by_media = {r.media: r.label for r in
              datasets.load_records("synthetic", root, None, kind="all", strict=True)}
  assert len(recs) == 17 + 8
  for r in recs:
    assert r.label == by_media[r.media]
    q = r.conversations[0]["value"]
    assert q.startswith("<image>\n")
    opts = q[q.index("{") + 1:q.index("}")].split(", ")
    assert sorted(opts) == sorted(labels.classes("rafdb"))
  assert {r.media_type for r in recs} == {"image", "video"}
  assert any(len(r.conversations) == 4 for r in recs)


def test_deterministic_per_seed(roots):
  a, b, c = roots
  assert _files(a) == _files(b)
  for rel in _files(a):
    if rel.endswith(".mp4"):
      # Same decoded frames (container bytes may carry encoder metadata).
      np.testing.assert_array_equal(media.decode_video(os.path.join(a, rel), 8),
                                    media.decode_video(os.path.join(b, rel), 8))
    else:
      assert filecmp.cmp(os.path.join(a, rel), os.path.join(b, rel), shallow=False), rel
  img = os.path.join("Image", "aligned", "train_00001_aligned.jpg")
  assert not filecmp.cmp(os.path.join(a, img), os.path.join(c, img), shallow=False)


def test_expressions_differ_and_clips_ramp_from_neutral():
  # Same index -> same identity, pose, intensity and noise draws; only the expression differs.
  imgs = {c: synthetic.make_image(5, c, 96, seed=0).astype(np.float32)
          for c in synthetic.CLASSES}
  for i, x in enumerate(synthetic.CLASSES):
    for y in synthetic.CLASSES[i + 1:]:
      diff = np.abs(imgs[x] - imgs[y]).mean(-1)
      assert (diff > 25).sum() > 40, (x, y)  # a visible feature change, not noise
  surprise = synthetic.make_clip(2, "surprise", 8, 64, seed=0)
  happy = synthetic.make_clip(2, "happiness", 8, 64, seed=0)
  onset = np.abs(surprise[0].astype(int) - happy[0]).mean()
  apex = np.abs(surprise[-1].astype(int) - happy[-1]).mean()
  assert onset < 0.5 and apex > 3 * (onset + 0.5)  # both start neutral, end apart


# ---------------------------------------------------------------- action units

# sha256 prefixes of stills and a clip as drawn before the AU sequences existed (pinned
# numpy / opencv): the AU data must not move the embedded default's images.
_GOLDEN = {("image", 0): "de0f312a01ff1aed", ("image", 3): "b060f40c741c36a2",
           ("image", 8): "a1c419103fe0384e", ("clip", 2): "019dfb2845997ecf"}


def test_au_data_leaves_stills_and_clips_unchanged(tmp_path):
  import hashlib
  for (kind, i), want in _GOLDEN.items():
    x = (synthetic.make_image(i, synthetic.CLASSES[i % 7], 64, 0) if kind == "image"
         else synthetic.make_clip(i, synthetic.CLASSES[i % 7], 4, 32, 0))
    assert hashlib.sha256(x.tobytes()).hexdigest()[:16] == want, (kind, i)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  synthetic.generate(a, num_images=9, num_clips=0, seed=0, image_size=32)
  out = synthetic.generate(b, num_images=9, num_clips=0, seed=0, image_size=32,
                           num_au_subjects=3, au_tasks=2, au_frames=3)
  assert out["au"]["frames"] == 18
  for rel in _files(a):
    assert filecmp.cmp(os.path.join(a, rel), os.path.join(b, rel), shallow=False), rel


def test_au_labels_follow_the_drawing():
  on = {c: {a for a, v in synthetic.au_labels(synthetic.expression_params(c, 0.8)).items() if v}
        for c in synthetic.CLASSES}
  assert {6, 12} <= on["happiness"] and {1, 2, 5, 26} <= on["surprise"]
  assert {1, 4, 15} <= on["sadness"] and {9, 10} <= on["disgust"] and 4 in on["anger"]
  assert on["neutral"] == set() and 12 not in on["sadness"] and 15 not in on["happiness"]
  # A label flips exactly when its drawing parameter crosses the rule, and the pixels move.
  p = synthetic.expression_params("neutral", 1.0)
  style = synthetic._Style(np.random.default_rng(0))
  base = synthetic.render("neutral", 0, style, 64, np.random.default_rng(1), params=p)
  for key, value, au_id in (("mouth_curve", 0.08, 12), ("wrinkle", 1.0, 9),
                            ("brow_gap", 0.03, 4), ("mouth_open", 0.1, 26)):
    q = dict(p, **{key: value})
    assert synthetic.au_labels(p)[au_id] == 0 and synthetic.au_labels(q)[au_id] == 1, key
    img = synthetic.render("neutral", 0, style, 64, np.random.default_rng(1), params=q)
    assert np.abs(img.astype(int) - base).sum() > 0, key


def test_au_sequences_read_by_the_bp4d_reader(tmp_path):
  from input_pipeline import au
  root = str(tmp_path)
  out = synthetic.generate_au(root, num_subjects=6, num_tasks=2, num_frames=4, seed=0,
                              image_size=32)
  skips = SkipCounter()
  recs = datasets.load_records("synthetic_au", root, split=None, fold=1, skips=skips)
  assert len(recs) == out["frames"] - skips.notes.get("au_not_coded", 0) and not skips.counts
  assert {r.extra["subject"] for r in recs} == set(out["subjects"])
  test_subjects = {r.extra["subject"] for r in recs if r.split == "test"}
  assert test_subjects and test_subjects <= set(au.fold_subjects("bp4d", 1, "test"))
  # Labels are the rules applied to the parameters each frame was drawn with.
  aus = au.dataset_aus("synthetic_au")
  assert aus == synthetic.AUS
  si = out["subjects"].index(recs[0].extra["subject"])
  _, labels, _ = synthetic.make_au_sequence(si, int(recs[0].extra["task"][1:]) - 1, 4, 32, 0)
  by_frame = {r.extra["frame"]: r for r in recs
              if (r.extra["subject"], r.extra["task"]) == (recs[0].extra["subject"],
                                                           recs[0].extra["task"])}
  first = min(by_frame)
  for k, lab in enumerate(labels):
    if first + k in by_frame:
      assert by_frame[first + k].aus == tuple(lab[a] for a in aus)
  # The CSV says 9 (not coded) for AUs the faces cannot show, e.g. AU14 and AU17.
  import csv
  rows = list(csv.reader(open(os.path.join(root, "AUCoding", "AU_OCC",
                                           f"{out['subjects'][0]}_T1.csv"))))
  assert rows[1][14] == "9" and rows[1][17] == "9"
