"""The demo page (Gradio), in the server's process at /demo, on the same engine and queue.

Upload (or take with the webcam) an image or a video, ask a question (empty: the category
question), and see the answer, the class probabilities as a bar chart and, for a video,
the per-window emotion timeline. Examples are synthetic faces and a synthetic clip
(input_pipeline.synthetic), written once under <workdir>/demo_examples. Bad input (not an
image, unreadable video, no face) is reported on the page in one line.

The page makes no requests outside the server (system fonts, no analytics).
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402

from emo_jax.serve.engine import Engine, InputError, Media  # noqa: E402
from emo_jax.train import predict as predict_lib  # noqa: E402

DEFAULT_QUESTION = ""


def _face(label: str, seed: int, size: int = 112) -> np.ndarray:
  """A synthetic face of `label` in which the face detector finds a face."""
  from input_pipeline import media, synthetic
  for i in range(seed, seed + 50):
    img = synthetic.make_image(i, label, size=size)
    if media.detect_faces(img):
      return img
  return synthetic.make_image(seed, label, size=size)


def examples(workdir: str, classes) -> list[str]:
  """Synthetic example inputs (three faces and a clip of faces changing expression),
  generated once."""
  from PIL import Image
  from input_pipeline import synthetic
  d = os.path.join(workdir, "demo_examples")
  os.makedirs(d, exist_ok=True)
  labels = [c for c in ("happiness", "sadness", "surprise") if c in classes]
  out = []
  for i, label in enumerate(labels):
    p = os.path.join(d, f"face_{label}.png")
    if not os.path.exists(p):
      Image.fromarray(_face(label, 100 * i)).save(p)
    out.append(p)
  clip = os.path.join(d, "clip_" + "_".join(labels) + ".mp4")
  if labels and not os.path.exists(clip):
    # 2 s per expression at 8 fps: a timeline of len(labels) windows at window_secs=2.
    frames = np.concatenate([np.repeat(_face(lab, 300 + 100 * i)[None], 16, 0)
                             for i, lab in enumerate(labels)])
    synthetic.write_mp4(clip, frames, fps=8)
  if labels:
    out.append(clip)
  return out


def prob_figure(probs: dict[str, float]):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3))
  names = list(probs)
  vals = [probs[k] for k in names]
  bars = ax.bar(names, vals, color=["#d62728" if v == max(vals) else "#1f77b4" for v in vals])
  ax.set_ylim(0, 1)
  ax.set_ylabel("probability")
  ax.set_title("class probabilities (option likelihood)")
  ax.bar_label(bars, fmt="%.2f", fontsize=8)
  plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
  fig.tight_layout()
  plt.close(fig)
  return fig


def timeline_figure(timeline: list[dict], classes):
  return predict_lib.timeline_figure(timeline, classes, figsize=(7, 3))


def answer(engine: Engine, image_path: str | None, video_path: str | None, question: str):
  """(status line, answer, probability figure, timeline figure) for the page."""
  import gradio as gr
  path = video_path or image_path
  if not path:
    return "Upload an image or a video first.", "", None, gr.update(value=None, visible=False)
  try:
    try:
      kind = predict_lib.media_kind(path)
    except predict_lib.PredictError:
      raise InputError("not a readable image or video", code="unreadable_media") from None
    media = Media(kind, path, f"the uploaded {kind}")
    req = engine.prepare([{"from": "human", "value": question or ""}], media)
    res = engine.submit(req).result(timeout=engine.s["request_timeout_s"])
  except InputError as e:
    return (f"Error: {e.message}", "", None, gr.update(value=None, visible=False))
  status = f"Emotion: {res.emotion} (probability {res.probability:.2f})"
  tl = gr.update(value=None, visible=False)
  if res.timeline:
    status += f"; {len(res.timeline)} windows"
    tl = gr.update(value=timeline_figure(res.timeline, engine.classes), visible=True)
  return status, res.answers[0], prob_figure(res.probs), tl


def build(engine: Engine):
  import gradio as gr
  with gr.Blocks(title="EMO-LLaMA (emo_jax)", analytics_enabled=False) as page:
    gr.Markdown("# EMO-LLaMA demo\nUpload a face image or a video (or use the webcam), ask "
                "a question, or leave it empty for the category question over: "
                + ", ".join(engine.classes) + ".")
    with gr.Row():
      with gr.Column():
        image = gr.Image(label="image", type="filepath", sources=["upload", "webcam"],
                         elem_id="image_input")
        video = gr.Video(label="video", sources=["upload", "webcam"], elem_id="video_input")
        question = gr.Textbox(label="question", placeholder="How does this person feel?",
                              elem_id="question")
        with gr.Row():
          go = gr.Button("Submit", variant="primary", elem_id="submit")
          gr.ClearButton([image, video, question])
      with gr.Column():
        status = gr.Markdown(elem_id="status")
        text = gr.Textbox(label="answer", interactive=False, elem_id="answer")
        probs = gr.Plot(label="class probabilities", elem_id="probs")
        timeline = gr.Plot(label="emotion timeline", elem_id="timeline", visible=False)
    ex = examples(engine.workdir, engine.classes)
    if ex:
      imgs = [p for p in ex if not p.endswith(".mp4")]
      vids = [p for p in ex if p.endswith(".mp4")]
      if imgs:
        gr.Examples([[p] for p in imgs], inputs=[image], label="synthetic faces")
      if vids:
        gr.Examples([[p] for p in vids], inputs=[video], label="synthetic clip")
    go.click(lambda i, v, q: answer(engine, i, v, q), inputs=[image, video, question],
             outputs=[status, text, probs, timeline])
  return page


def mount(app, engine: Engine, path: str = "/demo"):
  """The page mounted on the API app (same process, same engine)."""
  import gradio as gr
  theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
  return gr.mount_gradio_app(app, build(engine), path=path, ssr_mode=False, theme=theme,
                             allowed_paths=[os.path.join(engine.workdir, "demo_examples")],
                             footer_links=[])
