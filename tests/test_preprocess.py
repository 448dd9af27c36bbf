"""Offline preprocessing into ArrayRecord shards and reading them back through grain."""
import dataclasses
import os

import numpy as np
import pytest

from input_pipeline import datasets, media, pipeline, preprocess, synthetic
from input_pipeline.records import BadInputError, Record, SkipCounter


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synth"))
  synthetic.generate(root, num_images=6, num_clips=2, seed=0)
  return root


XCFG = preprocess.ExtractConfig(num_frames=3, image_size=24, face_size=16)


def test_shards_round_trip_and_count_bad_inputs(synth, tmp_path):
  records = datasets.load_records("synthetic", synth, split="train")
  bad = Record("synthetic", "train", "gone", os.path.join(synth, "gone.jpg"), "image",
               label="fear")
  records = records[:3] + [bad] + records[3:]
  skips = SkipCounter()
  paths = preprocess.write_shards(records, str(tmp_path), config=XCFG, num_shards=2,
                                  skips=skips)
  assert len(paths) == 2 and all(os.path.exists(p) for p in paths)
  assert skips.counts == {"missing_file": 1}
  src = preprocess.PreextractedSource(paths)
  good = [r for r in records if r is not bad]
  assert len(src) == len(good)
  for i, rec in enumerate(good):
    ex = src[i]
    assert ex["record"] == rec  # shard order = record order, all fields restored
    frames = media.load_media(rec, 1 if rec.media_type == "image" else XCFG.num_frames)
    np.testing.assert_array_equal(
        ex["frames"], media.geometry(frames, XCFG.image_size, XCFG.aspect))
    assert ex["frames"].dtype == np.uint8 and ex["frames"].shape[1:] == (24, 24, 3)
    assert ex["face_crops"].shape == (frames.shape[0], 16, 16, 3)
  with pytest.raises(BadInputError, match="missing_file"):
    preprocess.write_shards([bad], str(tmp_path / "strict"), config=XCFG,
                            skips=SkipCounter(strict=True))


def test_preextracted_batches_equal_decoded_batches(synth, toks, tmp_path):
  llama, bert = toks
  records = datasets.load_records("synthetic", synth, split="train")
  paths = preprocess.write_shards(records, str(tmp_path), config=XCFG, num_shards=3)
  cfg = pipeline.PipelineConfig(global_batch_size=len(records), num_frames=3,
                                tokens_per_frame=1, max_length=256, bucket_lengths=(256,),
                                image_size=24, face_size=16, seed=1, num_epochs=1)
  kw = dict(process_index=0, process_count=1)
  direct = next(pipeline.make_iterator(records, cfg, llama, bert, **kw))
  pre = next(pipeline.make_iterator(preprocess.PreextractedSource(paths), cfg, llama, bert,
                                    **kw))
  assert set(direct) == set(pre)
  assert pre["frames"].dtype == pre["face_crops"].dtype == np.uint8
  for k in direct:  # uint8 geometry both ways: the very same pixels
    assert pre[k].dtype == direct[k].dtype, k
    np.testing.assert_array_equal(pre[k], direct[k], err_msg=k)


def _fake_priors(crops, record):
  """A priors_fn hook: per-frame global / local features and an AGR sentence."""
  f = crops.shape[0]
  mean = crops.reshape(f, -1, 3).mean(1).astype(np.float32)  # [F, 3]
  return {"face_global": np.repeat(mean[:, None], 2, axis=1),
          "face_local": np.repeat(mean[:, None], 5, axis=1),
          "agr_sentence": f"The person ({record.id}) looks about 20 to 29 years old."}


def test_priors_hook_replaces_face_crops(synth, toks, tmp_path):
  llama, bert = toks
  records = datasets.load_records("synthetic", synth, split=None, kind="video")
  assert len(records) == 2 and {r.media_type for r in records} == {"video"}
  paths = preprocess.write_shards(records, str(tmp_path), config=XCFG, priors_fn=_fake_priors)
  cfg = pipeline.PipelineConfig(global_batch_size=2, num_frames=4, tokens_per_frame=1,
                                max_length=256, bucket_lengths=(256,), image_size=24,
                                face_size=16, shuffle=False, num_epochs=1)
  batch = next(pipeline.make_iterator(preprocess.PreextractedSource(paths), cfg, llama, bert,
                                      process_index=0, process_count=1))
  assert "face_crops" not in batch
  assert batch["face_global"].shape == (2, 4, 2, 3) and batch["face_local"].shape == (2, 4, 5, 3)
  assert not batch["face_global"][:, 3].any()  # the padding frame (3 real of 4)
  assert batch["face_global"][:, :3].any()
  text = llama.decode(batch["input_ids"][0])
  assert f"\nThe person ({records[0].id}) looks about 20 to 29 years old. What is" in text


def test_command_line(synth, tmp_path, capsys):
  out = str(tmp_path / "shards")
  rc = preprocess.main(["--dataset=synthetic", f"--root={synth}", "--split=train",
                        f"--out_dir={out}", "--num_shards=2", "--num_frames=2",
                        "--image_size=16", "--face_size=8",
                        '--reader_options={"kind": "video"}'])
  assert rc == 0
  files = sorted(os.listdir(out))
  assert len(files) == 2 and all(f.endswith(".array_record") for f in files)
  src = preprocess.PreextractedSource([os.path.join(out, f) for f in files])
  n = len(datasets.load_records("synthetic", synth, split="train", kind="video"))
  assert n >= 1 and len(src) == n and src[0]["frames"].shape == (2, 16, 16, 3)
  assert f"wrote {n} examples of {n} records" in capsys.readouterr().out
