"""Input pipeline throughput: clips/s through the full video path vs raw PyAV decoding of
the same frames, and images/s. Writes benchmarks/results/pipeline.{json,md}.

- raw: plain PyAV, decode the clip in order from the start, convert exactly the sampled
  frames to RGB, stop after the last one (the cheapest correct way without seeking).
- pipeline: `media.decode_video` (demux scan + seek to keyframes + forward decode of the
  same sampled frames) + `media.preprocess_vit` (pad to square, resize to 224, CLIP
  normalise to float32).
Target: pipeline time <= 1.25 x raw time. Clips are synthetic faces rendered by
input_pipeline.synthetic and encoded with libx264 at two keyframe intervals.

  python benchmarks/bench_pipeline.py            # default
  python benchmarks/bench_pipeline.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import sys

# Run as a script, sys.path[0] is benchmarks/, where a module named like the package
# (a module named like the package would shadow it): import from the repository root instead.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
  sys.path[0] = _REPO

import av  # noqa: E402
import numpy as np  # noqa: E402

from input_pipeline import media, synthetic  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _write_clip(path: str, frames: np.ndarray, gop: int, fps: int = 25) -> None:
  with av.open(path, "w") as c:
    s = c.add_stream("libx264", rate=fps)
    s.height, s.width = frames.shape[1:3]
    s.pix_fmt = "yuv420p"
    s.options = {"crf": "23", "preset": "veryfast", "g": str(gop), "threads": "1"}
    for f in frames:
      for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def raw_decode(path: str, num_frames: int) -> np.ndarray:
  """Plain PyAV baseline: sequential decode, RGB only for the sampled frames."""
  with av.open(path) as c:
    stream = c.streams.video[0]
    stream.codec_context.thread_count = 1
    n = stream.frames
    want = media.sample_indices(n, num_frames)
    wanted, got = set(int(i) for i in want), {}
    for i, frame in enumerate(c.decode(stream)):
      if i in wanted:
        got[i] = frame.to_ndarray(format="rgb24")
      if i >= want[-1]:
        break
  return np.stack([got[int(i)] for i in want])


def pipeline(path: str, num_frames: int, size: int) -> np.ndarray:
  return media.preprocess_vit(media.decode_video(path, num_frames), size)


def _time(fn, items, repeats):
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    for it in items:
      fn(it)
    best = min(best, time.perf_counter() - t)
  return best


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--clips", type=int, default=12)
  ap.add_argument("--clip_len", type=int, default=96, help="frames per clip (DFEW: ~2-5 s)")
  ap.add_argument("--clip_size", type=int, default=224)
  ap.add_argument("--num_frames", type=int, default=16, help="F sampled per clip")
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--images", type=int, default=200)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=RESULTS)
  a = ap.parse_args()
  if a.quick:
    a.clips, a.clip_len, a.images, a.repeats = 3, 48, 30, 1
  results = {"config": vars(a), "machine": {"cpu_count": os.cpu_count(),
                                            "platform": platform.platform()}, "video": []}
  with tempfile.TemporaryDirectory() as tmp:
    base = [synthetic.make_clip(i, synthetic.CLASSES[i % 7], a.clip_len, a.clip_size)
            for i in range(a.clips)]
    for gop in (12, 250):
      paths = []
      for i, frames in enumerate(base):
        p = os.path.join(tmp, f"g{gop}_{i:03d}.mp4")
        _write_clip(p, frames, gop)
        paths.append(p)
      # Same frames from both paths (correctness before speed).
      for p in paths[:2]:
        np.testing.assert_array_equal(media.decode_video(p, a.num_frames),
                                      raw_decode(p, a.num_frames))
      t_raw = _time(lambda p: raw_decode(p, a.num_frames), paths, a.repeats)
      t_dec = _time(lambda p: media.decode_video(p, a.num_frames), paths, a.repeats)
      t_seq = _time(lambda p: media.decode_video(p, a.num_frames, seek=False), paths,
                    a.repeats)
      t_pipe = _time(lambda p: pipeline(p, a.num_frames, a.size), paths, a.repeats)
      results["video"].append({
          "keyframe_interval": gop, "clips": len(paths),
          "raw_pyav_clips_per_s": len(paths) / t_raw,
          "decode_seek_clips_per_s": len(paths) / t_dec,
          "decode_sequential_clips_per_s": len(paths) / t_seq,
          "pipeline_clips_per_s": len(paths) / t_pipe,
          "pipeline_overhead_vs_raw": t_pipe / t_raw - 1.0,
          "meets_target_25pct": t_pipe / t_raw - 1.0 <= 0.25})
    img_root = os.path.join(tmp, "img")
    synthetic.generate(img_root, num_images=a.images, num_clips=0)
    imgs = sorted(os.path.join(img_root, "Image", "aligned", n)
                  for n in os.listdir(os.path.join(img_root, "Image", "aligned")))
    t_load = _time(media.load_image, imgs, a.repeats)
    t_img = _time(lambda p: media.preprocess_vit(media.load_image(p), a.size), imgs, a.repeats)
    results["images"] = {"images": len(imgs), "load_images_per_s": len(imgs) / t_load,
                         "pipeline_images_per_s": len(imgs) / t_img}
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "pipeline.json"), "w") as f:
    json.dump(results, f, indent=1)
  lines = ["# Input pipeline throughput", "",
           f"Single process, one decoder thread; {a.clips} synthetic clips of {a.clip_len} "
           f"frames at {a.clip_size}px (libx264), F={a.num_frames} sampled, ViT input "
           f"{a.size}px. Noisy if the machine is shared: rerun on a quiet one.", "",
           "| keyframe interval | raw PyAV clips/s | seek decode clips/s | sequential clips/s "
           "| pipeline clips/s | pipeline overhead vs raw |", "|---|---|---|---|---|---|"]
  for r in results["video"]:
    lines.append(f"| {r['keyframe_interval']} | {r['raw_pyav_clips_per_s']:.1f} | "
                 f"{r['decode_seek_clips_per_s']:.1f} | {r['decode_sequential_clips_per_s']:.1f} | "
                 f"{r['pipeline_clips_per_s']:.1f} | {100 * r['pipeline_overhead_vs_raw']:+.0f}% |")
  im = results["images"]
  lines += ["", f"Images ({im['images']} JPEGs, 112px -> {a.size}px): load "
            f"{im['load_images_per_s']:.0f}/s, load + preprocess {im['pipeline_images_per_s']:.0f}/s.",
            "", "Target: pipeline overhead <= +25% over raw decoding of the same frames."]
  with open(os.path.join(a.out, "pipeline.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
