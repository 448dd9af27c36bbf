"""TFDS builders: build RAF-DB (layout of the synthetic data) as ArrayRecord, read it with
tfds.data_source + grain; DFEW's video examples from _generate_examples."""
import os

import numpy as np
import pytest

import tensorflow_datasets as tfds  # noqa: E402

from input_pipeline import datasets, labels, media, synthetic, tfds_builders  # noqa: E402


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synth"))
  synthetic.generate(root, num_images=8, num_clips=5, seed=1)
  os.remove(os.path.join(root, "Image", "aligned", "train_00002_aligned.jpg"))  # a bad input
  return root


def test_rafdb_builder_end_to_end_with_grain(synth, tmp_path):
  import grain

  data_dir = str(tmp_path / "tfds")
  builder = tfds.builder("emo_rafdb", data_dir=data_dir)
  assert isinstance(builder, tfds_builders.EmoRafdb)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=synth))
  for split in ("train", "test"):
    want = datasets.load_records("rafdb", synth, split=split)  # the missing file is dropped
    source = tfds.data_source("emo_rafdb", split=split, data_dir=data_dir)
    ds = grain.MapDataset.source(source)
    assert len(ds) == len(want) > 0
    got = {ex["id"].decode() if isinstance(ex["id"], bytes) else ex["id"]: ex for ex in ds}
    assert set(got) == {r.id for r in want}
    for r in want:
      ex = got[r.id]
      assert ex["label"] == labels.classes("rafdb").index(r.label)
      img = media.load_media(r, 1)[0]
      assert ex["image"].shape == img.shape
      # JPEG re-encoding: close to the decoded source, not bit-equal.
      assert np.abs(ex["image"].astype(float) - img).mean() < 4.0
  assert "train_00002" not in {r.id for r in datasets.load_records("rafdb", synth)}


def test_dfew_builder_generates_fixed_size_clips(synth):
  assert tfds_builders.EmoDfew(config="fold2", data_dir="/unused").builder_config.fold == 2
  tiny = tfds_builders.FerConfig(name="tiny", fold=2, num_frames=3, frame_size=32)
  builder = tfds_builders.EmoDfew(config=tiny, data_dir="/unused")
  for split in ("train", "test"):
    want = datasets.load_records("dfew", synth, split=split, fold=2)
    examples = dict(builder._generate_examples(synth, split))
    assert len(examples) == len(want)
    for r in want:
      ex = examples[f"{split}/{r.id}"]
      assert ex["video"].shape == (3, 32, 32, 3) and ex["video"].dtype == np.uint8
      assert ex["label"] == labels.classes("dfew").index(r.label)
      assert ex["fold"] == 2 and ex["media"] == os.path.join("Clip", "original", f"{r.id}.mp4")
  # The features accept what _generate_examples yields.
  info = builder.info
  assert info.features["label"].names == list(labels.classes("dfew"))
  info.features.encode_example(next(iter(dict(builder._generate_examples(synth, "test"))
                                         .values())))


def test_every_dataset_has_a_builder():
  assert set(tfds_builders.BUILDERS) == {"rafdb", "affectnet", "ferplus", "dfew", "ferv39k",
                                         "mafw"}
  for name, cls in tfds_builders.BUILDERS.items():
    assert cls.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()
    assert name in datasets.READERS
    assert tfds.builder_cls(f"emo_{name}") is cls
