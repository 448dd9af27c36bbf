"""grain pipeline: batch contract, sharding, per-epoch shuffle, restore, bad inputs."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from input_pipeline import labels, media, pipeline, template
from input_pipeline.records import BadInputError, Record, SkipCounter

SIZE = 16


def write_video(path, num_frames, size=32, seed=0):
  import av

  rng = np.random.default_rng(seed)
  with av.open(str(path), "w") as out:
    stream = out.add_stream("mpeg4", rate=10)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    for _ in range(num_frames):
      img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """10 good images, 2 good clips, and one of each bad kind."""
  d = tmp_path_factory.mktemp("media")
  rng = np.random.default_rng(0)
  classes = labels.classes("rafdb")
  good = []
  for i in range(10):
    p = d / f"img_{i}.png"
    Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(p)
    good.append(Record("rafdb", "train", f"img{i}", str(p), "image", label=classes[i % 7]))
  for i in range(2):
    p = d / f"clip_{i}.mp4"
    write_video(p, 12, seed=i)
    good.append(Record("dfew", "train", f"clip{i}", str(p), "video",
                       label=labels.classes("dfew")[i]))
  (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  raw = (d / "img_0.png").read_bytes()
  (d / "truncated.png").write_bytes(raw[:len(raw) // 2])
  (d / "empty.mp4").write_bytes(b"")
  bad = [
      Record("rafdb", "train", "corrupt", str(d / "corrupt.jpg"), "image", label="fear"),
      Record("rafdb", "train", "truncated", str(d / "truncated.png"), "image", label="fear"),
      Record("rafdb", "train", "missing", str(d / "missing.png"), "image", label="fear"),
      Record("dfew", "train", "emptyvid", str(d / "empty.mp4"), "video", label="sad"),
      Record("rafdb", "train", "unknown", str(d / "img_1.png"), "image", label="boredom"),
      Record("ferid", "train", "badconv", str(d / "img_2.png"), "image",
             conversations=({"from": "gpt", "value": "x"},)),
  ]
  return good, bad


CFG = pipeline.PipelineConfig(
    global_batch_size=4, num_frames=3, tokens_per_frame=2, max_length=224,
    bucket_lengths=(160, 192, 224), qformer_max_length=24, image_size=SIZE, face_size=8,
    seed=3, num_epochs=None, worker_count=0)


def test_batch_matches_the_contract(toks, data):
  llama, bert = toks
  good, _ = data
  cfg = dataclasses.replace(CFG, shuffle=False, num_epochs=1, drop_remainder=False,
                            global_batch_size=12)
  skips = SkipCounter()
  batch = next(pipeline.make_iterator(good, cfg, llama, bert, process_index=0,
                                      process_count=1, skips=skips))
  B, F, T = 12, 3, batch["input_ids"].shape[1]
  assert T in cfg.bucket_lengths
  want = {"frames": (np.uint8, (B, F, SIZE, SIZE, 3)), "frame_mask": (np.bool_, (B, F)),
          "face_crops": (np.uint8, (B, F, 8, 8, 3)), "qformer_ids": (np.int32, (B, 24)),
          "qformer_mask": (np.int32, (B, 24)), "input_ids": (np.int32, (B, T)),
          "attention_mask": (np.int32, (B, T)), "loss_mask": (np.int32, (B, T)),
          "label": (np.int32, (B,))}
  assert set(batch) == set(want)
  for k, (dtype, shape) in want.items():
    assert batch[k].dtype == dtype and batch[k].shape == shape, k
  slots = cfg.num_visual_slots
  for b in range(B):
    n_real = 1 if b < 10 else 3  # images, then clips (shuffle off)
    np.testing.assert_array_equal(batch["frame_mask"][b], np.arange(F) < n_real)
    assert not batch["frames"][b, n_real:].any() and batch["frames"][b, :n_real].any()
    assert not batch["face_crops"][b, n_real:].any()
    # uint8 pixels in the encoders' geometry; normalised (as the model does) they are the
    # host-normalised inputs the pipeline used to send.
    decoded = media.load_media(good[b], n_real)
    np.testing.assert_allclose(
        media.normalize(batch["frames"][b, :n_real], media.CLIP_MEAN, media.CLIP_STD),
        media.preprocess_vit(decoded, SIZE, cfg.aspect), atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        media.normalize(batch["face_crops"][b, :n_real], media.IMAGENET_MEAN,
                        media.IMAGENET_STD),
        media.preprocess_face(decoded, 8), atol=1e-6, rtol=0)
    ids, att = batch["input_ids"][b], batch["attention_mask"][b]
    pos = np.flatnonzero(ids == template.IMAGE_TOKEN_ID)
    assert len(pos) == slots and np.all(np.diff(pos) == 1)
    # Slots of padding frames and the tail padding are masked out of attention.
    np.testing.assert_array_equal(att[pos], np.arange(slots) < n_real * cfg.tokens_per_frame)
    length = int(np.flatnonzero(batch["loss_mask"][b])[-1]) + 1
    assert att[length:].sum() == 0 and np.all(ids[length:] == llama.pad_id)
    assert ids[length - 1] == llama.eos_id
    # The trained tokens are exactly the answer (the label word) and EOS.
    answer = llama.decode(ids[batch["loss_mask"][b] == 1])
    assert answer == good[b].label
    question = llama.decode(ids[:pos[0]]) + llama.decode(ids[pos[-1] + 1:length])
    options = question[question.index("{") + 1:question.index("}")].split(", ")
    assert options[batch["label"][b]] == good[b].label
    # The Q-Former text: the question without placeholder, cut from the left (LLaMA-VID) to
    # qformer_max_length=24; the options at its end survive.
    text = question[question.index("\n") + 1:question.rindex("ASSISTANT:")].strip()
    full = bert.encode(text)
    assert len(full) > 24
    np.testing.assert_array_equal(batch["qformer_ids"][b], bert.pad(full[:1] + full[-23:], 24)[0])
    assert bert.decode(batch["qformer_ids"][b]).endswith("} .")
  # Each of the 12 instructions was longer than qformer_max_length: counted, not silent.
  assert skips.truncations == {"qformer_text_truncated": 12} and skips.counts == {}
  assert "qformer_text_truncated: 12" in skips.report()
  # At the default length (64) the whole instruction fits: nothing cut, nothing counted.
  skips = SkipCounter()
  cfg = dataclasses.replace(cfg, qformer_max_length=pipeline.PipelineConfig().qformer_max_length)
  batch = next(pipeline.make_iterator(good, cfg, llama, bert, process_index=0,
                                      process_count=1, skips=skips))
  assert skips.truncations == {} and batch["qformer_ids"].shape == (B, 64)
  assert bert.decode(batch["qformer_ids"][0]).startswith("what is the facial expression")


def test_shards_are_disjoint_and_epochs_reshuffled():
  recs = list(range(20))
  cfg = dataclasses.replace(CFG, num_epochs=2)
  shards = [list(pipeline.shuffled_shard(recs, cfg, i, 2)) for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == 20
  both = [x for pair in zip(*shards) for x in pair]  # interleave back to the global order
  epoch1, epoch2 = both[:20], both[20:]
  assert sorted(epoch1) == sorted(epoch2) == recs
  assert epoch1 != epoch2 and epoch1 != recs
  again = list(pipeline.shuffled_shard(recs, cfg, 1, 2))
  assert again == shards[1]  # deterministic per seed
  other = list(pipeline.shuffled_shard(recs, dataclasses.replace(cfg, seed=4), 1, 2))
  assert other != shards[1]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_iterator_yields_the_same_batches(toks, data, workers):
  llama, bert = toks
  good, bad = data
  records = good[:6] + bad[:2]  # skips happen inside the run, and across epochs
  cfg = dataclasses.replace(CFG, worker_count=workers, num_frames=2)
  kw = dict(process_index=0, process_count=1)
  n, k = 6, 2  # 24 examples: three epochs
  skips_ref = SkipCounter()
  it = pipeline.make_iterator(records, cfg, llama, bert, skips=skips_ref, **kw)
  first = _take(it, k)
  state = json.loads(json.dumps(it.get_state()))  # orbax stores it as JSON
  rest_ref = _take(it, n - k)  # the uninterrupted run goes on
  it.close()
  skips_b = SkipCounter()
  it = pipeline.make_iterator(records, cfg, llama, bert, skips=skips_b, **kw)
  it.set_state(state)
  rest = _take(it, n - k)
  it.close()
  _assert_same_batches(rest, rest_ref)
  assert skips_b.counts == skips_ref.counts
  assert sum(skips_ref.counts.values()) > 0
  ref = first + rest_ref
  # Epochs differ in order (per-epoch reshuffle) but batches are not all the same.
  assert not all(np.array_equal(ref[0]["input_ids"], r["input_ids"]) for r in ref[1:])


def test_bad_media_is_counted_not_crashing(toks, data):
  llama, bert = toks
  good, bad = data
  cfg = dataclasses.replace(CFG, num_epochs=1, drop_remainder=False, global_batch_size=5)
  skips = SkipCounter()
  batches = list(pipeline.make_iterator(good[:3] + bad, cfg, llama, bert, skips=skips,
                                        process_index=0, process_count=1))
  assert sum(len(b["label"]) for b in batches) == 3
  counts = skips.counts
  assert counts.pop("corrupt_image") == 2  # garbage jpeg + truncated png
  assert counts.pop("missing_file") == 1
  assert counts.pop("unknown_label") == 1
  assert counts.pop("malformed_conversation") == 1
  assert sum(counts.values()) == 1  # the empty mp4: corrupt / empty video
  assert set(counts) <= {"corrupt_video", "empty_video"}
  assert "missing.png" in skips.report()


def test_strict_mode_raises_with_file_and_reason(toks, data):
  llama, bert = toks
  good, bad = data
  cfg = dataclasses.replace(CFG, num_epochs=1, shuffle=False, global_batch_size=1)
  it = pipeline.make_iterator([good[0], bad[2]], cfg, llama, bert,
                              skips=SkipCounter(strict=True), process_index=0,
                              process_count=1)
  next(it)
  with pytest.raises(BadInputError, match="missing_file.*missing.png"):
    next(it)


def test_face_detection_mode_counts_no_face(toks, data):
  llama, bert = toks
  good, _ = data
  cfg = dataclasses.replace(CFG, num_epochs=1, face_mode="detect", drop_remainder=False)
  skips = SkipCounter()
  out = list(pipeline.make_iterator(good[:2], cfg, llama, bert, skips=skips,
                                    process_index=0, process_count=1))
  assert out == [] and skips.counts == {"no_face": 2}  # noise images hold no face
  cfg = dataclasses.replace(cfg, face_mode="detect_or_full")
  out = list(pipeline.make_iterator(good[:2], cfg, llama, bert, process_index=0,
                                    process_count=1))
  assert out[0]["face_crops"].shape[0] == 2


@pytest.mark.parametrize("aspect", ["pad", "resize"])
def test_aligned_faces_at_the_vit_geometry_are_resized_once(toks, data, aspect):
  """face_size == image_size, aligned: square clips (any aspect) and stretched images
  ('resize') share one array for frames and face_crops, down to the batch; non-square images
  with 'pad' keep two. Either way each key holds its own geometry."""
  llama, bert = toks
  good, _ = data
  cfg = dataclasses.replace(CFG, face_size=SIZE, aspect=aspect, shuffle=False, num_epochs=1,
                            drop_remainder=False, global_batch_size=2)
  builder = pipeline.ExampleBuilder(cfg, llama, bert, strict=True)
  for rec in (good[0], good[10]):  # a 20x24 image, a 32x32 clip
    ex = builder(rec, np.random.default_rng(0))
    decoded = media.load_media(rec, 1 if rec.media_type == "image" else cfg.num_frames)
    n = decoded.shape[0]
    np.testing.assert_array_equal(ex["frames"][:n], media.geometry(decoded, SIZE, aspect))
    np.testing.assert_array_equal(ex["face_crops"][:n],
                                  media.geometry(decoded, SIZE, "resize"))
    shared = rec.media_type == "video" or aspect == "resize"
    assert (ex["face_crops"] is ex["frames"]) == shared, (rec.id, aspect)
  # Batches: clips share one array; the images' keys stay separate with 'pad'.
  for recs in (good[10:12], good[:2]):
    batch = next(pipeline.make_iterator(recs, cfg, llama, bert, process_index=0,
                                        process_count=1))
    assert batch["frames"].dtype == batch["face_crops"].dtype == np.uint8
    shared = recs[0].media_type == "video" or aspect == "resize"
    assert (batch["face_crops"] is batch["frames"]) == shared
  # Another face size: resized separately.
  ex = pipeline.ExampleBuilder(dataclasses.replace(cfg, face_size=8), llama, bert)(
      good[10], np.random.default_rng(0))
  assert ex["face_crops"].shape[1:3] == (8, 8) and ex["frames"].shape[1:3] == (SIZE, SIZE)


def test_collate_shares_arrays_only_when_every_example_does():
  rng = np.random.default_rng(0)

  def ex(shared):
    f = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    return {"input_ids": np.ones(3, np.int32), "attention_mask": np.ones(3, np.int32),
            "loss_mask": np.ones(3, np.int32), "label": np.int32(0),
            "qformer_ids": np.zeros(3, np.int32), "qformer_mask": np.zeros(3, np.int32),
            "frames": f, "face_crops": f if shared else f.copy()}

  exs = [ex(True), ex(True)]
  b = pipeline.collate(exs, bucket_lengths=(8,), pad_id=0)
  assert b["face_crops"] is b["frames"]
  np.testing.assert_array_equal(b["frames"], np.stack([e["frames"] for e in exs]))
  exs = [ex(True), ex(False)]
  b = pipeline.collate(exs, bucket_lengths=(8,), pad_id=0)
  assert b["face_crops"] is not b["frames"]
  np.testing.assert_array_equal(b["face_crops"], np.stack([e["face_crops"] for e in exs]))
  np.testing.assert_array_equal(b["frames"], np.stack([e["frames"] for e in exs]))


def test_collate_pads_to_the_smallest_bucket():
  ex = lambda n: {"input_ids": np.arange(n, dtype=np.int32) + 1,
                  "attention_mask": np.ones(n, np.int32), "loss_mask": np.ones(n, np.int32),
                  "label": np.int32(0), "qformer_ids": np.zeros(3, np.int32),
                  "qformer_mask": np.zeros(3, np.int32)}
  b = pipeline.collate([ex(5), ex(9)], bucket_lengths=(8, 16, 4), pad_id=7)
  assert b["input_ids"].shape == (2, 16)
  np.testing.assert_array_equal(b["input_ids"][0], [1, 2, 3, 4, 5] + [7] * 11)
  assert b["attention_mask"][0].sum() == 5 and b["loss_mask"][1].sum() == 9
  assert pipeline.collate([ex(4)], bucket_lengths=(8, 4), pad_id=0)["input_ids"].shape == (1, 4)
  with pytest.raises(ValueError, match="largest bucket"):
    pipeline.collate([ex(17)], bucket_lengths=(8, 16), pad_id=0)
  with pytest.raises(ValueError, match="largest bucket"):
    pipeline.PipelineConfig(max_length=300, bucket_lengths=(128, 256))


def test_config_errors_fail_early_and_all_bad_data_stops(toks, data):
  llama, bert = toks
  good, bad = data
  kw = dict(process_index=0, process_count=1)
  # Slots + fixed prompt longer than max_length: an error at construction, not skips.
  cfg = dataclasses.replace(CFG, num_frames=64, tokens_per_frame=4)
  with pytest.raises(ValueError, match="visual slots"):
    pipeline.make_iterator(good, cfg, llama, bert, **kw)
  # Only bad inputs, repeated forever: stops with the report instead of spinning.
  cfg = dataclasses.replace(CFG, max_consecutive_skips=7)
  skips = SkipCounter()
  it = pipeline.make_iterator(bad[:2], cfg, llama, bert, skips=skips, **kw)
  with pytest.raises(RuntimeError, match="(?s)7 inputs in a row.*corrupt_image: 7"):
    next(it)
  assert skips.counts == {"corrupt_image": 7}
