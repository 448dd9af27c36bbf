"""TFDS builders for the licensed FER datasets (manual download), readable with grain.

The datasets cannot be downloaded automatically: place each one, as distributed, in the
TFDS manual dir (default `~/tensorflow_datasets/downloads/manual/<DIR>` or
`--manual_dir`) and build it as ArrayRecord, then read it through `tfds.data_source`:

```python
import tensorflow_datasets as tfds
from input_pipeline import tfds_builders  # registers emo_rafdb, emo_dfew, ...

builder = tfds.builder("emo_dfew/fold1", data_dir="/data/tfds")
builder.download_and_prepare(
    file_format="array_record",
    download_config=tfds.download.DownloadConfig(manual_dir="/data/DFEW"))
source = tfds.data_source("emo_dfew/fold1", split="train", data_dir="/data/tfds")
ds = grain.MapDataset.source(source)  # random access, any number of workers
```

Examples are built by `input_pipeline.datasets.load_records` (the same readers the
pipeline uses) and decoded with `input_pipeline.media`: image datasets store the image
(AffectNet: already cropped to its face box), video datasets store `num_frames`
uniformly sampled frames resized to `frame_size` (BuilderConfig). Each example also has
`label` (the dataset's class list, ClassLabel), `id`, `fold` (0 when none) and `media`
(path relative to the manual dir). Bad inputs are counted per reason and logged when a
split is done (never silently dropped); `STRICT = True` on a subclass fails instead.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import labels as labels_lib
from input_pipeline import media as media_lib
from input_pipeline.records import BadInputError, Record, SkipCounter

_LAYOUTS = "See input_pipeline/datasets/README.md and docs/DATASETS.md for the layouts."


@dataclasses.dataclass
class FerConfig(tfds.core.BuilderConfig):
  """fold: 1..5 for k-fold datasets; num_frames / frame_size for video datasets."""
  fold: int | None = None
  num_frames: int = 16
  frame_size: int = 224


class _FerBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common builder: subclasses set DATASET (a load_records name), SPLITS, IS_VIDEO."""

  DATASET: str = ""
  SPLITS: tuple[str, ...] = ("train", "test")
  IS_VIDEO: bool = False
  READER_OPTIONS: dict[str, Any] = {}
  STRICT: bool = False
  IMAGE_ENCODING: str = "jpeg"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [FerConfig(name="default")]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    """Our module file. (tfds' own lookup imports `importlib_resources`, which
    tensorflow-datasets 4.9.10 does not declare; this avoids needing it.)"""
    import inspect  # pylint: disable=g-import-not-at-top

    from etils import epath  # pylint: disable=g-import-not-at-top

    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    if self.IS_VIDEO:
      media = tfds.features.Video(shape=(None, cfg.frame_size, cfg.frame_size, 3),
                                  encoding_format=self.IMAGE_ENCODING)
      key = "video"
    else:
      media = tfds.features.Image(shape=(None, None, 3), encoding_format=self.IMAGE_ENCODING)
      key = "image"
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            key: media,
            "label": tfds.features.ClassLabel(names=list(labels_lib.classes(self.DATASET))),
            "id": tfds.features.Text(),
            "fold": tfds.features.Scalar(dtype=np.int32),
            "media": tfds.features.Text(),
        }),
        supervised_keys=(key, "label"),
        description=f"{self.DATASET} read from its distributed layout. {_LAYOUTS}",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(root, split) for split in self.SPLITS}

  def _records(self, root: str, split: str, skips: SkipCounter) -> list[Record]:
    from input_pipeline import datasets  # pylint: disable=g-import-not-at-top

    return datasets.load_records(self.DATASET, root, split=split,
                                 fold=self.builder_config.fold, strict=self.STRICT,
                                 skips=skips, **self.READER_OPTIONS)

  def _example(self, record: Record, root: str) -> dict:
    cfg = self.builder_config
    if self.IS_VIDEO:
      frames = media_lib.load_media(record, cfg.num_frames)
      media = np.stack([media_lib.resize(f, cfg.frame_size) for f in frames])
    else:
      media = media_lib.load_media(record, 1)[0]
    where = record.media if isinstance(record.media, str) and record.media else record.id
    if isinstance(record.media, tuple):
      where = os.path.dirname(record.media[0])
    return {
        "video" if self.IS_VIDEO else "image": media,
        "label": labels_lib.label_index(self.DATASET, record.label),
        "id": record.id,
        "fold": np.int32(record.fold or 0),
        "media": os.path.relpath(where, root) if os.path.isabs(where) else where,
    }

  def _generate_examples(self, root: str, split: str) -> Iterator[tuple[str, dict]]:
    skips = SkipCounter(strict=self.STRICT)
    for record in self._records(root, split, skips):
      try:
        example = self._example(record, root)
      except BadInputError as e:
        skips.skip(e.reason, e.path, e.detail)
        continue
      yield f"{record.split}/{record.id}", example
    logging.info("%s %s: %s", self.name, split, skips.report())


_FOLDS = [FerConfig(name=f"fold{k}", fold=k, description=f"fold {k} of 5") for k in range(1, 6)]


class EmoRafdb(_FerBuilder):
  """RAF-DB basic, aligned 100x100 faces, 7 classes."""
  DATASET = "rafdb"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request RAF-DB from http://www.whdeng.cn/raf/model1.html and place the `basic` folder
  (EmoLabel/list_patition_label.txt, Image/aligned/*_aligned.jpg) in the manual dir.
  """


class EmoAffectnet(_FerBuilder):
  """AffectNet-8 (manually annotated), faces cropped to the given boxes; val = test."""
  DATASET = "affectnet"
  SPLITS = ("train", "val")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request AffectNet from http://mohammadmahoor.com/affectnet/ and place
  Manually_Annotated_file_lists/{training,validation}.csv and
  Manually_Annotated/Manually_Annotated_Images/ in the manual dir.
  """


class EmoFerplus(_FerBuilder):
  """FERPlus majority-vote labels on FER2013 (48x48 gray, stored as RGB)."""
  DATASET = "ferplus"
  SPLITS = ("train", "val", "test")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Place fer2013.csv (Kaggle) and fer2013new.csv (github.com/microsoft/FERPlus), or the
  FER2013Train / FER2013Valid / FER2013Test image folders with their label.csv, in the
  manual dir.
  """


class EmoDfew(_FerBuilder):
  """DFEW clips, 7 classes, 5-fold protocol (one config per fold)."""
  DATASET = "dfew"
  IS_VIDEO = True
  BUILDER_CONFIGS = _FOLDS
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request DFEW from https://dfew-dataset.github.io/ and place Clip/ (original mp4 or
  clip_224x224 frame folders) and EmoLabel_DataSplit/ in the manual dir.
  """


class EmoFerv39k(_FerBuilder):
  """FERV39k clips, 7 classes, one train/test split."""
  DATASET = "ferv39k"
  IS_VIDEO = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request FERV39k from https://wangyanckxx.github.io/Proj_CVPR2022_FERV39k.html and place
  0_7_LabelClips/ (or 2_ClipsforFaceCrop/) and 4_setups/ in the manual dir.
  """


class EmoMafw(_FerBuilder):
  """MAFW clips, 11 single-label classes, 5-fold protocol (one config per fold)."""
  DATASET = "mafw"
  IS_VIDEO = True
  BUILDER_CONFIGS = _FOLDS
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request MAFW from https://mafw-database.github.io/MAFW/ and place clips/ and the
  single-label 5-fold split lists in the manual dir.
  """


BUILDERS = {b.DATASET: b for b in (EmoRafdb, EmoAffectnet, EmoFerplus, EmoDfew, EmoFerv39k,
                                   EmoMafw)}
