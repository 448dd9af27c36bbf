"""input_pipeline.media: images, seeking video decode, frame folders, geometry, faces."""
import os

import av
import numpy as np
import pytest
from PIL import Image

from input_pipeline import media
from input_pipeline.records import BadInputError, Record


def _write_video(path, n, *, gop=5, size=(48, 64), fmt=None, codec="libx264"):
  """Frame i is a flat gray of level 8 * i (plus a bright bar), so each frame is
  identifiable after lossy coding; `gop` keyframes apart."""
  c = av.open(str(path), "w", format=fmt)
  s = c.add_stream(codec, rate=25)
  s.height, s.width = size
  s.pix_fmt = "yuv420p"
  s.options = {"g": str(gop), "crf": "10"} if codec == "libx264" else {"g": str(gop)}
  for i in range(n):
    a = np.full(size + (3,), 8 * i % 256, np.uint8)
    f = av.VideoFrame.from_ndarray(a, format="rgb24")
    for p in s.encode(f):
      c.mux(p)
  for p in s.encode():
    c.mux(p)
  c.close()


def _reference_frames(path, idx):
  """Plain PyAV: decode every frame in order, keep those at idx."""
  with av.open(str(path)) as c:
    allf = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
  return np.stack([allf[i] for i in idx]), len(allf)


def test_sample_indices_uniform_centres():
  np.testing.assert_array_equal(media.sample_indices(100, 4), [12, 37, 62, 87])
  np.testing.assert_array_equal(media.sample_indices(3, 6), [0, 0, 1, 1, 2, 2])
  with pytest.raises(ValueError):
    media.sample_indices(0, 4)


@pytest.mark.parametrize("gop,n,f", [(5, 60, 8), (250, 40, 6), (1, 10, 16)])
def test_seeking_decode_matches_plain_pyav(tmp_path, gop, n, f):
  p = tmp_path / "v.mp4"
  _write_video(p, n, gop=gop)
  # sequential_max_frames=0: seek even on these short clips.
  got = media.decode_video(str(p), f, sequential_max_frames=0)
  ref, total = _reference_frames(p, media.sample_indices(n, f))
  assert total == n == media.count_frames(str(p))
  np.testing.assert_array_equal(got, ref)  # bit-identical frames to full decoding
  levels = got[:, 0, 0, 0].astype(int)
  np.testing.assert_allclose(levels, 8 * media.sample_indices(n, f) % 256, atol=4)
  np.testing.assert_array_equal(media.decode_video(str(p), f, seek=False), ref)
  np.testing.assert_array_equal(media.decode_video(str(p), f), ref)  # default: short clip


def test_short_clips_decode_sequentially_long_ones_seek(tmp_path, monkeypatch):
  scans = []
  real_scan = media._scan
  monkeypatch.setattr(media, "_scan", lambda c, s: scans.append(1) or real_scan(c, s))
  short, long_ = tmp_path / "short.mp4", tmp_path / "long.mp4"
  _write_video(short, media.SEQUENTIAL_MAX_FRAMES, gop=10)
  _write_video(long_, media.SEQUENTIAL_MAX_FRAMES + 6, gop=10)
  for path, n, scanned in ((short, media.SEQUENTIAL_MAX_FRAMES, 0),
                           (long_, media.SEQUENTIAL_MAX_FRAMES + 6, 1)):
    scans.clear()
    got = media.decode_video(str(path), 5)
    assert len(scans) == scanned, path.name  # the demux pass only happens when seeking
    np.testing.assert_array_equal(got, _reference_frames(path, media.sample_indices(n, 5))[0])
  scans.clear()
  media.decode_video(str(short), 5, sequential_max_frames=0)
  assert len(scans) == 1


def test_rgb_conversion_equals_to_ndarray(tmp_path):
  """The per-thread reformatter gives what frame.to_ndarray(format='rgb24') gives, also when
  size and pixel format change from one frame to the next (its swscale context is reused)."""
  clips = []
  for name, size, fmt in (("a.mp4", (48, 64), "yuv420p"), ("b.mp4", (30, 30), "yuv444p"),
                          ("c.mp4", (48, 64), "yuv420p")):
    c = av.open(str(tmp_path / name), "w")
    s = c.add_stream("libx264", rate=25)
    s.height, s.width = size
    s.pix_fmt = fmt
    rng = np.random.default_rng(len(clips))
    for _ in range(3):
      f = av.VideoFrame.from_ndarray(rng.integers(0, 256, size + (3,), dtype=np.uint8),
                                     format="rgb24")
      for pk in s.encode(f):
        c.mux(pk)
    for pk in s.encode():
      c.mux(pk)
    c.close()
    with av.open(str(tmp_path / name)) as c:
      clips.append(list(c.decode(video=0)))
  assert {f.format.name for fs in clips for f in fs} == {"yuv420p", "yuv444p"}
  for fs in zip(*clips):  # interleaved: a, b, c, a, b, c, ...
    for frame in fs:
      got = media._rgb(frame)
      assert got.dtype == np.uint8 and got.shape == (frame.height, frame.width, 3)
      np.testing.assert_array_equal(got, frame.to_ndarray(format="rgb24"))


def test_sequential_fallback_for_streams_without_timestamps(tmp_path):
  p = tmp_path / "raw.h264"  # an elementary stream: no pts, cannot seek
  _write_video(p, 20, fmt="h264")
  got = media.decode_video(str(p), 4)
  np.testing.assert_allclose(got[:, 0, 0, 0].astype(int), 8 * media.sample_indices(20, 4),
                             atol=3)


def test_bad_videos(tmp_path):
  good = tmp_path / "good.mp4"
  _write_video(good, 30)
  data = good.read_bytes()
  (tmp_path / "trunc.mp4").write_bytes(data[: len(data) // 2])
  (tmp_path / "garbage.mp4").write_bytes(os.urandom(4000))
  # Zero-frame videos: an AVI keeps its (empty) video stream, an MP4 keeps no stream.
  for name, fmt in (("zero.avi", None), ("zero.mp4", None)):
    c = av.open(str(tmp_path / name), "w")
    s = c.add_stream("mpeg4", rate=25)
    s.width = s.height = 32
    s.pix_fmt = "yuv420p"
    c.start_encoding()
    c.close()
  expect = {"trunc.mp4": "corrupt_video", "garbage.mp4": "corrupt_video",
            "zero.avi": "empty_video", "zero.mp4": "empty_video",
            "missing.mp4": "missing_file"}
  for name, reason in expect.items():
    with pytest.raises(BadInputError) as e:
      media.decode_video(str(tmp_path / name), 4)
    assert e.value.reason == reason, name
    assert name in str(e.value)


def test_load_image_exif_modes_and_errors(tmp_path):
  a = np.zeros((20, 40, 3), np.uint8)
  a[:5, :10] = 255  # bright block top-left
  exif = Image.Exif()
  exif[0x0112] = 6  # display rotated 90 degrees clockwise
  Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif, quality=95)
  img = media.load_image(str(tmp_path / "rot.jpg"))
  assert img.shape == (40, 20, 3) and img.dtype == np.uint8
  assert img[:10, -5:].mean() > 200 and img[-10:, :5].mean() < 50  # block now top-right
  # Other modes come back as RGB.
  Image.fromarray(np.full((8, 8), 100, np.uint8)).save(tmp_path / "g.png")
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[..., 3] = 255
  Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
  Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(tmp_path / "i16.png")
  Image.fromarray(a).convert("P").save(tmp_path / "p.gif")
  for name in ("g.png", "a.png", "i16.png", "p.gif"):
    x = media.load_image(str(tmp_path / name))
    assert x.shape[-1] == 3 and x.dtype == np.uint8, name
  assert media.load_image(str(tmp_path / "a.png"))[0, 0].tolist() == [200, 0, 0]
  # Truncated and corrupt images, missing files.
  data = (tmp_path / "rot.jpg").read_bytes()
  (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
  (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
  for name, reason in (("trunc.jpg", "corrupt_image"), ("junk.jpg", "corrupt_image"),
                       ("none.jpg", "missing_file")):
    with pytest.raises(BadInputError) as e:
      media.load_image(str(tmp_path / name))
    assert e.value.reason == reason and name in str(e.value)


def test_frame_folder_natural_order(tmp_path):
  for i in range(12):  # written in shuffled order; names x_1 .. x_12
    Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(tmp_path / f"x_{i + 1}.png")
  got = media.load_frame_folder(str(tmp_path), 12)
  np.testing.assert_array_equal(got[:, 0, 0, 0], 20 * np.arange(12))
  with pytest.raises(BadInputError) as e:
    media.load_frames([], 4)
  assert e.value.reason == "no_frames"


def test_pad_to_square_matches_llava_expand2square():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)
  # LLaVA's expand2square, written with PIL: paste centred on a mean-coloured square.
  bg = tuple(int(x * 255) for x in media.CLIP_MEAN)
  ref = Image.new("RGB", (50, 50), bg)
  ref.paste(Image.fromarray(img), (0, (50 - 30) // 2))
  np.testing.assert_array_equal(media.pad_to_square(img), np.asarray(ref))
  tall = img.transpose(1, 0, 2)
  ref = Image.new("RGB", (50, 50), bg)
  ref.paste(Image.fromarray(np.ascontiguousarray(tall)), ((50 - 30) // 2, 0))
  np.testing.assert_array_equal(media.pad_to_square(tall), np.asarray(ref))


def test_normalisation_matches_transformers_clip_processor():
  from transformers import CLIPImageProcessor
  rng = np.random.default_rng(1)
  img = rng.integers(0, 255, (2, 24, 24, 3), dtype=np.uint8)
  proc = CLIPImageProcessor(do_resize=False, do_center_crop=False, do_convert_rgb=False)
  ref = proc(images=list(img), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  got = media.preprocess_vit(img, size=24)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  face = media.preprocess_face(img, size=24)
  want = (img / 255.0 - np.array(media.IMAGENET_MEAN)) / np.array(media.IMAGENET_STD)
  np.testing.assert_allclose(face, want, atol=1e-5)


def _old_geometry(frames, size, aspect, fill=None):
  """The geometry as preprocess applied it before (a new array per resized frame)."""
  out = []
  for f in frames:
    if aspect == "pad":
      out.append(media.resize(media.pad_to_square(f, fill), size))
    elif aspect == "crop":
      out.append(media.resize_shortest_center_crop(f, size))
    else:
      out.append(media.resize(f, size))
  return np.stack(out)


@pytest.mark.parametrize("shape", [(3, 30, 50), (2, 50, 30), (2, 40, 40), (1, 24, 24),
                                   (2, 64, 64)])
@pytest.mark.parametrize("aspect", ["pad", "crop", "resize"])
def test_geometry_is_uint8_and_equals_the_per_frame_path(shape, aspect):
  rng = np.random.default_rng(sum(shape))
  frames = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
  got = media.geometry(frames, 24, aspect)
  assert got.dtype == np.uint8 and got.shape == (shape[0], 24, 24, 3)
  np.testing.assert_array_equal(got, _old_geometry(frames, 24, aspect))
  # The plain-resize shortcut holds exactly when geometry_is_resize says so.
  same = np.array_equal(got, media.geometry(frames, 24, "resize"))
  assert media.geometry_is_resize(shape[1], shape[2], aspect) == same
  # normalize(geometry(x)) is the host-side preprocess.
  np.testing.assert_array_equal(media.preprocess(frames, 24, aspect=aspect),
                                media.normalize(media.geometry(
                                    frames, 24, aspect,
                                    fill=tuple(int(m * 255) for m in media.CLIP_MEAN)),
                                    media.CLIP_MEAN, media.CLIP_STD))
  with pytest.raises(ValueError, match="aspect"):
    media.geometry(frames, 24, "zoom")


def test_resize_into_a_given_array():
  rng = np.random.default_rng(2)
  img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  for size in ((40, 60), (10, 15), (20, 30)):
    out = np.zeros(size + (3,), np.uint8)
    assert media.resize(img, size, out=out) is out
    np.testing.assert_array_equal(out, media.resize(img, size))
  assert media.resize(img, (20, 30)) is img


def test_preprocess_geometry():
  img = np.zeros((40, 80, 3), np.uint8)
  img[:, :40] = 255
  crop = media.preprocess(img, 20, aspect="crop", mean=(0, 0, 0), std=(1, 1, 1))
  assert crop.shape == (1, 20, 20, 3)
  # The centre crop of a half-white image is half white, split down the middle.
  assert crop[0, :, :8].min() > 0.9 and crop[0, :, 12:].max() < 0.1
  pad = media.preprocess(img, 20, aspect="pad", mean=(0, 0, 0), std=(1, 1, 1))
  assert pad.shape == (1, 20, 20, 3) and np.allclose(pad[0, 0, 0], 0.0)  # fill = mean (0)
  with pytest.raises(ValueError):
    media.preprocess(img, 20, aspect="zoom")


def test_face_detection_on_a_real_photo_and_no_face():
  from skimage import data
  img = data.astronaut()  # 512x512, one frontal face around x 170-260, y 40-150
  boxes = media.detect_faces(img)
  assert boxes, "the cascade should find the astronaut's face"
  x, y, w, h = boxes[0]
  assert 150 < x + w / 2 < 290 and 40 < y + h / 2 < 170
  crop = media.crop_face(img, margin=0.2)
  assert crop.shape[0] == crop.shape[1] and crop.shape[0] > w
  clip = media.crop_face_frames(np.stack([img, img]), margin=0.1)
  assert clip.shape[0] == 2 and clip.shape[1] == clip.shape[2]
  flat = np.full((200, 200, 3), 128, np.uint8)
  with pytest.raises(BadInputError) as e:
    media.crop_face(flat, path="flat.png")
  assert e.value.reason == "no_face" and "flat.png" in str(e.value)


def test_crop_box_pads_outside():
  img = np.arange(100, dtype=np.uint8).reshape(10, 10, 1).repeat(3, -1)
  out = media.crop_box(img, (2, 3, 4, 2), square=False)
  np.testing.assert_array_equal(out, img[3:5, 2:6])
  out = media.crop_box(img, (-2, -2, 4, 4), square=True)
  assert out.shape == (4, 4, 3) and out[:2, :2].max() == 0 and out[2, 2, 0] == img[0, 0, 0]


def test_load_media_records(tmp_path):
  px = np.arange(48 * 48, dtype=np.uint8).reshape(48, 48)
  r = Record("ferplus", "train", "0", "", "pixels", "neutral", pixels=px)
  out = media.load_media(r)
  assert out.shape == (1, 48, 48, 3) and (out[0, ..., 1] == px).all()
  Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(tmp_path / "a.png")
  r = Record("affectnet", "train", "a", str(tmp_path / "a.png"), "image", "happy",
             crop_box=(5, 5, 10, 20))
  assert media.load_media(r).shape == (1, 20, 10, 3)
  p = tmp_path / "v.mp4"
  _write_video(p, 20)
  r = Record("dfew", "train", "1", str(p), "video", "happy", fold=1)
  assert media.load_media(r, 4).shape == (4, 48, 64, 3)
