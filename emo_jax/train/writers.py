"""The training metrics writer (clu): log lines everywhere, TensorBoard events on process 0.

TensorBoard event files are written into a local folder and uploaded to `<workdir>` by
etils.epath, so a `gs://` workdir takes the same path layer as every other file of a run
(GCS objects cannot be appended to: the upload replaces the object, as tf.io.gfile's own
GCS writer does on every flush). Uploads happen at most every `sync_every_secs` while
writing, and on flush / close. A local workdir is written in place, as before.
"""
from __future__ import annotations

import time

from clu import metric_writers

from input_pipeline import paths


class _Uploader(metric_writers.MetricWriter):
  """Last writer of a MultiWriter: flushes the event writer and uploads the staged files."""

  def __init__(self, events: metric_writers.MetricWriter, stage: paths.StagedDir,
               every_secs: float):
    self.events, self.stage, self.every_secs = events, stage, every_secs
    self._last = time.monotonic()

  def _tick(self, *args, **kwargs):
    del args, kwargs
    if time.monotonic() - self._last >= self.every_secs:
      self.events.flush()
      self.stage.sync()
      self._last = time.monotonic()

  write_summaries = write_scalars = write_images = write_videos = _tick
  write_audios = write_texts = write_histograms = write_hparams = _tick

  def flush(self):
    self.stage.sync()   # the event writer before it in the MultiWriter has flushed

  def close(self):
    self.stage.close()


def metric_writer(workdir: str, *, is_main: bool, sync_every_secs: float = 60.0
                  ) -> metric_writers.MetricWriter:
  if not is_main:
    return metric_writers.create_default_writer(None, just_logging=True, asynchronous=False)
  if not paths.is_remote(workdir):
    return metric_writers.create_default_writer(workdir, asynchronous=False)
  stage = paths.StagedDir(workdir)
  events = metric_writers.SummaryWriter(stage.local)
  return metric_writers.MultiWriter([metric_writers.LoggingWriter(), events,
                                     _Uploader(events, stage, sync_every_secs)])
