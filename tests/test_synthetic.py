"""input_pipeline.synthetic: layouts, read-back through the real readers, determinism."""
import filecmp
import json
import os

import numpy as np
import pytest

from input_pipeline import datasets, labels, media, synthetic

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
