"""grain pipeline: records -> shuffled, sharded, decoded, tokenised, padded batches.

    records (list[Record] or a pre-extracted source, same order on every host)
      -> MapDataset.source -> shuffle(seed) -> repeat(num_epochs)   (new order each epoch)
      -> random_map(ExampleBuilder)    decode media (input_pipeline.media), face crop,
                                       instruction, template + tokenise; a bad input
                                       becomes a skip marker instead of an exception
      -> [process_index::process_count] (per-host shard; after the map, so an example's
                                       randomness is keyed by its global position)
      -> to_iter_dataset(ReadOptions) [-> mp_prefetch(MultiprocessingOptions)]
      -> count skips (main process; SkipCounter + iterator state)
      -> batch(collate)                padding to the smallest bucket length

Pixels: `frames` and `face_crops` are uint8, in their encoder's geometry (`media.geometry`:
pad / crop / resize) but not normalised; EmoLlama normalises them on the accelerator
(emo_jax.models.pixels). With `face_mode='aligned'` the crops are the frames: when the face
geometry equals the ViT one (same size, and a plain resize for these frames) the same array
serves both keys instead of resizing twice.

The batch is exactly docs/INTERFACES.md "The batch". The iterator is a grain
`DatasetIterator`: `get_state()` / `set_state()` restore the exact position (and the
skip counts), so orbax can checkpoint it beside the train state.

Our choices: per-example randomness (option order of generated instructions) comes from
grain's per-index generator, so it is reproducible and survives restore; a skipped
example shifts later batches (batches stay full), identical in a restored run;
`global_batch_size` is split evenly over processes.

Q-Former text (LLaMA-VID, `llamavid/train/train.py` and `llamavid_arch.py`): a user turn with
every '<image>' and newline removed (`template.qformer_text`; no AGR sentence), BERT ids cut
from the left to `qformer_max_length` ([CLS] and [SEP] kept; upstream cuts at 256). An
instruction longer than that is used cut, and counted: `SkipCounter.truncations`
['qformer_text_truncated'] (and the iterator state), reported with the skips.

Multi-turn (`image_turns` > 1, LLaMA-VID's per-turn prompts): each of the first
`image_turns` user turns gets its own placeholder, its own `num_frames * tokens_per_frame`
slots and its own Q-Former text, so the batch carries `qformer_ids` / `qformer_mask`
[B, image_turns, Tq] (rows of absent turns all padding); turns beyond are dropped and counted
('conversation_turns_dropped'). With `image_turns == 1` the batch is the single-turn one,
`qformer_ids` [B, Tq].

Frozen-prior mode (`PipelineConfig.priors_dir`, docs/FROZEN_PRIORS.md): the face prior network
is frozen, so `emo_jax.jobs.precompute_priors` runs it once per sample and stores its outputs by
`Record.id`. With `priors_dir` set, the builder looks each example up in that `PriorStore`
(a missing id is the counted skip 'missing_priors'; strict: an error) and puts
`face_global` / `face_local` [F, G|L, Cf] into the batch instead of `face_crops` (no face
detection or crop preprocessing then). With `agr_prompt` the AGR sentence is built from the
stored age / gender / race logits of the sample's real frames (averaged, as
`EmoLlama.agr_sentences` does online) and goes into the first user turn.

Frame agreement: frame i of the batch must be the frame the stored prior i was computed from.
Sampling is deterministic (`media.sample_indices`: F uniform segment centres, no randomness),
so the same record decoded with the same frame count gives the same frames, whether the
priors were computed from preprocess shards (`precompute_priors --shards`, the frames stored
beside the crops) or from records (`face_crop_items`, this builder's own decoding). The
builder keeps the first `n_real = min(F_stored, num_frames)` frames of both the frames and
the priors, and a sample whose stored prior count differs from its decoded / stored frame
count is the counted skip 'priors_mismatch' (e.g. priors from 8-frame shards, training
decoding 4 frames from the raw videos).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np

from input_pipeline import au as au_lib
from input_pipeline import contract
from input_pipeline import instructions as instructions_lib
from input_pipeline import media as media_lib
from input_pipeline import template as template_lib
from input_pipeline.prior_store import PriorStore
from input_pipeline.records import BadInputError, Record, SkipCounter
from input_pipeline.tokenizers import BertTokenizer, LlamaTokenizer

SKIP_KEY = "_skip"
# An example's counted-but-kept changes: a tuple of (reason, path, detail); collate drops
# every key that starts with '_'.
NOTES_KEY = "_truncated"
FACE_MODES = ("aligned", "detect", "detect_or_full", "none")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything the pipeline needs, as data (build it from the ml_collections config).

  Attributes:
    global_batch_size: examples per step over all processes.
    num_frames: F_max; images use 1 real frame, the rest is padding.
    tokens_per_frame: EmoLlamaConfig.tokens_per_frame (1 + content + face tokens).
    max_length: longest LLaMA sequence, visual slots included (<= max(bucket_lengths)).
    bucket_lengths: batches are padded to the smallest of these that fits.
    qformer_max_length: fixed Q-Former text length Tq (BERT ids with [CLS] and [SEP]); a
      longer instruction loses its beginning, as in LLaMA-VID (which allows 256), and is
      counted. 64 holds the 7-class category instruction (about 37 bert-base-uncased ids)
      with room for longer option lists.
    image_turns: user turns that each get their own visual tokens and Q-Former text
      (LLaMA-VID: every turn); 1: one visual block in the first turn, qformer_ids [B, Tq];
      N > 1: qformer_ids [B, N, Tq], later turns dropped (counted).
    image_position: where a later turn without '<image>' gets it: 'random' (start or end,
      per-example generator, as LLaMA-VID), 'start', 'end'.
    image_size / face_size: ViT and face-network input sides.
    aspect: ViT geometry, 'pad' (LLaMA-VID) | 'crop' | 'resize' (media.geometry).
    face_mode: 'aligned' (the frame is the face, as in RAF-DB aligned / DFEW 224 clips),
      'detect' (OpenCV detector, no face -> counted skip), 'detect_or_full' (no face ->
      the whole frame), 'none' (no `face_crops` key: priors are precomputed or unused).
    face_margin: margin around a detected face box (fraction of its side).
    seed: shuffle + per-example randomness.
    shuffle: shuffle the records each epoch.
    shuffle_options: shuffle the options of generated category instructions (training);
      False keeps class-list order so `label` is the dataset class id (evaluation).
    option_names: offer these class names instead of each dataset's own.
    num_epochs: None repeats forever.
    drop_remainder: drop the last partial batch (static shapes for training).
    worker_count: grain worker processes (0: decode in this process).
    worker_buffer_size: elements prefetched per worker.
    read_threads: threads per process decoding elements.
    template: conversation template name.
    max_consecutive_skips: this many skipped inputs in a row stop the run with the skip
      report (a wrong root or config, not a few bad files; also ends an endless loop).
    priors_dir: frozen-prior mode: a `precompute_priors` output directory; the batch then
      carries `face_global` / `face_local` from it instead of `face_crops` (see above).
    agr_prompt: put the AGR sentence built from the stored priors into the first user turn
      (needs `priors_dir`; pre-extracted elements that carry an `agr_sentence` use it
      regardless, as before).
    agr_template: the AGR sentence template (None: contract.AGR_TEMPLATE); must
      equal the model's `EmoLlamaConfig.agr_template`.
    au_prompt: put an action-unit sentence (`input_pipeline.au.au_sentence`) after the AGR
      sentence in the first user turn: '' off, 'labels' from the record's own `aus`, or the
      path of a JSON {record id: [active AU numbers]} of AU-head predictions
      (`emo_jax.train.au_train.write_predictions`); a record missing from it is the counted
      skip 'missing_au_prediction'.
    au_template: the AU sentence template (field {aus}).
  """
  global_batch_size: int = 8
  num_frames: int = 4
  tokens_per_frame: int = 2
  max_length: int = 256
  bucket_lengths: tuple[int, ...] = (128, 256)
  qformer_max_length: int = 64
  image_turns: int = 1
  image_position: str = "random"
  image_size: int = 224
  face_size: int = 224
  aspect: str = "pad"
  face_mode: str = "aligned"
  face_margin: float = 0.2
  seed: int = 0
  shuffle: bool = True
  shuffle_options: bool = True
  option_names: tuple[str, ...] | None = None
  num_epochs: int | None = None
  drop_remainder: bool = True
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 1
  template: str = "vicuna_v1"
  max_consecutive_skips: int = 1000
  priors_dir: str | None = None
  agr_prompt: bool = False
  agr_template: str | None = None
  au_prompt: str = ""
  au_template: str = au_lib.AU_TEMPLATE

  def __post_init__(self):
    if self.max_length > max(self.bucket_lengths):
      raise ValueError(f"max_length {self.max_length} exceeds the largest bucket "
                       f"{max(self.bucket_lengths)}")
    if self.face_mode not in FACE_MODES:
      raise ValueError(f"face_mode must be one of {FACE_MODES}, got {self.face_mode!r}")
    if self.aspect not in media_lib.ASPECTS:
      raise ValueError(f"aspect must be one of {media_lib.ASPECTS}, got {self.aspect!r}")
    if self.image_turns < 1:
      raise ValueError(f"image_turns must be >= 1, got {self.image_turns}")
    if self.image_position not in ("random", "start", "end"):
      raise ValueError(f"image_position must be 'random', 'start' or 'end', got "
                       f"{self.image_position!r}")
    if self.qformer_max_length < 2:
      raise ValueError(f"qformer_max_length {self.qformer_max_length} cannot hold [CLS] "
                       "and [SEP]")
    if self.agr_prompt and not self.priors_dir:
      raise ValueError("agr_prompt takes the AGR sentence from precomputed priors: set "
                       "priors_dir (see emo_jax.jobs.precompute_priors)")

  @property
  def num_visual_slots(self) -> int:
    return self.num_frames * self.tokens_per_frame

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "PipelineConfig":
    """From a (ml_collections) mapping; unknown keys are an error, lists become tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown pipeline config keys {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---------------------------------------------------------------------------------------
# Pre-extracted inputs (input_pipeline.preprocess) travel as this mapping instead of a
# Record: {'record': Record, 'frames': uint8 [F,H,W,3], optional 'face_crops' uint8,
# 'face_global' / 'face_local' float32 [F, G|L, Cf], 'agr_sentence' str}.


def _is_preextracted(element: Any) -> bool:
  return isinstance(element, Mapping) and "record" in element and "frames" in element


def _pad_frames(x: np.ndarray, num_frames: int) -> np.ndarray:
  if x.shape[0] > num_frames:
    raise ValueError(f"{x.shape[0]} frames exceed num_frames={num_frames}")
  if x.shape[0] == num_frames:
    return x
  out = np.zeros((num_frames,) + x.shape[1:], x.dtype)
  out[:x.shape[0]] = x
  return out


class ExampleBuilder:
  """One record (or pre-extracted element) -> one example dict (unbatched batch keys).

  Picklable: grain sends it to worker processes. A BadInputError (or any decode error)
  becomes `{SKIP_KEY: (reason, path, detail)}` unless `strict`, when it propagates.
  """

  def __init__(self, config: PipelineConfig, tokenizer: LlamaTokenizer,
               qformer_tokenizer: BertTokenizer, *, strict: bool = False):
    self.config = config
    self.tokenizer = tokenizer
    self.qformer_tokenizer = qformer_tokenizer
    self.strict = strict
    self.template = template_lib.get_template(config.template)
    self.au_predictions = None
    if config.au_prompt and config.au_prompt != "labels":
      import json  # pylint: disable=g-import-not-at-top
      with open(config.au_prompt) as f:
        self.au_predictions = {k: tuple(v) for k, v in json.load(f).items()}
    self.priors = None
    if config.priors_dir:
      self.priors = PriorStore(config.priors_dir)

  # -- media ---------------------------------------------------------------------------

  def _frames(self, record: Record) -> np.ndarray:
    n = 1 if record.media_type in ("image", "pixels") else self.config.num_frames
    return media_lib.load_media(record, n)

  def _face_crops(self, frames: np.ndarray, record: Record) -> np.ndarray:
    mode = self.config.face_mode
    path = record.media if isinstance(record.media, str) else record.id
    if mode == "aligned":
      return frames
    try:
      return media_lib.crop_face_frames(frames, margin=self.config.face_margin, path=path)
    except BadInputError as e:
      if mode == "detect_or_full" and e.reason == "no_face":
        return frames
      raise

  def _stored_priors(self, record: Record) -> dict[str, Any]:
    if record.id not in self.priors:
      raise BadInputError("missing_priors", _where(record),
                          f"no precomputed priors for id {record.id!r} in "
                          f"{self.config.priors_dir}")
    return self.priors[record.id]

  def _agr_from_priors(self, priors: Mapping[str, Any], n_real: int, record: Record) -> str:
    """The AGR sentence from the logits of the real frames (mean over frames, then argmax:
    what EmoLlama.agr_sentences does with the frame mask)."""
    idx = contract.agr_indices(*(np.asarray(priors[k])[None, :n_real] for k in
                                 ("age_logits", "gender_logits", "race_logits")))[0]
    still = record.media_type in ("image", "pixels")
    return contract.agr_sentence(*idx, template=self.config.agr_template or contract.AGR_TEMPLATE,
                                 media="image" if still else "video")

  def _au_sentence(self, record: Record) -> str:
    """The AU prompt sentence of a record (its labels, or the stored predictions)."""
    if self.au_predictions is None:
      if record.aus is None:
        raise BadInputError("no_au_labels", _where(record), "au_prompt='labels' needs aus")
      active = au_lib.active_aus(record.aus, au_lib.dataset_aus(record.dataset))
    elif record.id in self.au_predictions:
      active = self.au_predictions[record.id]
    else:
      raise BadInputError("missing_au_prediction", _where(record),
                          f"no AU prediction for id {record.id!r} in {self.config.au_prompt}")
    return au_lib.au_sentence(active, self.config.au_template)

  # -- the example ---------------------------------------------------------------------

  def _qformer_inputs(self, conversations, tok: template_lib.Tokenized, record: Record
                      ) -> tuple[np.ndarray, np.ndarray, list]:
    """(ids, mask) int32 [Tq] (image_turns == 1) or [image_turns, Tq], and the notes."""
    length = self.config.qformer_max_length
    texts = template_lib.qformer_texts(conversations, tok)
    rows, notes = [], []
    for text in texts:
      full = self.qformer_tokenizer.encode(text)
      if len(full) > length:
        notes.append(("qformer_text_truncated", _where(record),
                      f"{len(full)} BERT ids > qformer_max_length={length}; the first "
                      f"{len(full) - length} text ids dropped"))
      rows.append(self.qformer_tokenizer.pad(self.qformer_tokenizer.truncate(full, length),
                                             length))
    if self.config.image_turns == 1:
      return rows[0][0], rows[0][1], notes
    ids = np.full((self.config.image_turns, length), self.qformer_tokenizer.pad_id, np.int32)
    mask = np.zeros((self.config.image_turns, length), np.int32)
    for i, (r_ids, r_mask) in enumerate(rows):
      ids[i], mask[i] = r_ids, r_mask
    return ids, mask, notes


  def build(self, element: Record | Mapping[str, Any], rng: np.random.Generator) -> dict:
    cfg = self.config
    record = element["record"] if _is_preextracted(element) else element
    # Look the priors up before decoding: a missing id costs no media decoding.
    stored = self._stored_priors(record) if self.priors is not None else None
    if _is_preextracted(element):
      frames = np.asarray(element["frames"])
      crops = element.get("face_crops")
      agr = element.get("agr_sentence")
    else:
      crops, agr = None, None
      frames = self._frames(record)
    if frames.ndim != 4 or frames.shape[0] == 0:
      raise BadInputError("no_frames", str(record.media), f"frames of shape {frames.shape}")
    if stored is not None and stored["face_global"].shape[0] != frames.shape[0]:
      raise BadInputError("priors_mismatch", _where(record),
                          f"{stored['face_global'].shape[0]} stored prior frames for "
                          f"{frames.shape[0]} decoded frames (precompute with the same "
                          "frame count)")
    n_real = min(frames.shape[0], cfg.num_frames)
    frames = frames[:n_real]
    if stored is not None and cfg.agr_prompt:
      agr = self._agr_from_priors(stored, n_real, record)
    if cfg.au_prompt:
      agr = " ".join(x for x in (agr, self._au_sentence(record)) if x)

    inst = instructions_lib.instruction_for_record(
        record, rng=rng, shuffle=cfg.shuffle_options, option_names=cfg.option_names)
    tok = template_lib.tokenize_conversation(
        inst.conversations, self.tokenizer, num_visual_slots=cfg.num_visual_slots,
        max_length=cfg.max_length, template=self.template, agr_sentence=agr,
        path=str(record.media), image_turns=cfg.image_turns,
        image_position=cfg.image_position, rng=rng)
    notes = []
    if tok.dropped_rounds:
      notes.append(("conversation_turns_dropped", _where(record),
                    f"{tok.dropped_rounds} rounds beyond image_turns={cfg.image_turns}"))
    q_ids, q_mask, q_notes = self._qformer_inputs(inst.conversations, tok, record)
    notes.extend(q_notes)

    attention = np.ones_like(tok.input_ids)
    for start in tok.image_starts:
      attention[start + n_real * cfg.tokens_per_frame:start + cfg.num_visual_slots] = 0
    frame_mask = np.zeros((cfg.num_frames,), bool)
    frame_mask[:n_real] = True

    vit = media_lib.geometry(frames, cfg.image_size, cfg.aspect)
    out = {
        "frames": _pad_frames(vit, cfg.num_frames),
        "frame_mask": frame_mask,
        "qformer_ids": q_ids,
        "qformer_mask": q_mask,
        "input_ids": tok.input_ids,
        "attention_mask": attention,
        "loss_mask": tok.loss_mask,
        "label": np.int32(inst.label_index),
    }
    if notes:
      out[NOTES_KEY] = tuple(notes)
    if stored is not None:
      for key in ("face_global", "face_local"):
        out[key] = _pad_frames(np.asarray(stored[key], np.float32)[:n_real], cfg.num_frames)
    elif _is_preextracted(element) and "face_global" in element:
      out["face_global"] = _pad_frames(np.asarray(element["face_global"], np.float32)[:n_real],
                                       cfg.num_frames)
      out["face_local"] = _pad_frames(np.asarray(element["face_local"], np.float32)[:n_real],
                                      cfg.num_frames)
    elif cfg.face_mode != "none":
      if crops is None:
        crops = self._face_crops(frames, record)
      if crops is frames and cfg.face_size == cfg.image_size and media_lib.geometry_is_resize(
          frames.shape[1], frames.shape[2], cfg.aspect):
        face = vit  # the crops are the frames, in the same geometry: resize once
      else:
        face = media_lib.geometry(np.asarray(crops)[:n_real], cfg.face_size, "resize")
      out["face_crops"] = out["frames"] if face is vit else _pad_frames(face, cfg.num_frames)
    return out

  def __call__(self, element: Record | Mapping[str, Any], rng: np.random.Generator) -> dict:
    try:
      return self.build(element, rng)
    except BadInputError as e:
      if self.strict:
        raise
      return {SKIP_KEY: (e.reason, e.path or _where(element), e.detail)}
    except Exception as e:  # pylint: disable=broad-except
      # Anything else a decoder throws deep in a worker: counted under its type.
      if self.strict:
        raise BadInputError(f"error:{type(e).__name__}", _where(element), str(e)) from e
      return {SKIP_KEY: (f"error:{type(e).__name__}", _where(element), str(e))}


def face_crop_items(source: Sequence[Record] | Any, config: PipelineConfig, *,
                    skips: SkipCounter | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """(record id, face crops uint8 [F, face_size, face_size, 3]) per element of `source`,
  for `emo_jax.jobs.precompute_priors` (its PriorRunner normalises uint8 crops on the
  device with the model's own function).

  Decoded and resized exactly as ExampleBuilder makes `face_crops` (same frame sampling
  and frame count, same face mode, `media.geometry(..., 'resize')`), so the prior network
  sees the very pixels it would see online and the stored priors belong to the frames the
  batches carry. Pre-extracted elements use their stored `face_crops`. Bad inputs are
  counted in `skips` (strict: raised).
  """
  skips = skips if skips is not None else SkipCounter()
  builder = ExampleBuilder(dataclasses.replace(config, priors_dir=None, agr_prompt=False),
                           None, None, strict=skips.strict)
  for i in range(len(source)):
    element = source[i]
    try:
      if _is_preextracted(element):
        record = element["record"]
        crops = element.get("face_crops")
        crops = np.asarray(element["frames"] if crops is None else crops)
      else:
        record = element
        crops = builder._face_crops(builder._frames(record), record)  # pylint: disable=protected-access
      if crops.ndim != 4 or crops.shape[0] == 0:
        raise BadInputError("no_frames", _where(element), f"crops of shape {crops.shape}")
      yield record.id, media_lib.geometry(crops, config.face_size, "resize")
    except BadInputError as e:
      skips.skip(e.reason, e.path or _where(element), e.detail)


def _where(element: Any) -> str:
  record = element["record"] if _is_preextracted(element) else element
  media = getattr(record, "media", None)
  return media if isinstance(media, str) and media else str(getattr(record, "id", "?"))


# ---------------------------------------------------------------------------------------
# Skip counting (main process) with checkpointable counts.


class _CountSkipsIterator(grain.DatasetIterator):
  """Drops skip markers, counting them in the SkipCounter and in the iterator state."""

  def __init__(self, parent: grain.DatasetIterator, counter: SkipCounter,
               max_consecutive: int):
    super().__init__(parent)
    self._counter = counter
    self._max_consecutive = max_consecutive
    self._counts: collections.Counter[str] = collections.Counter()
    self._truncs: collections.Counter[str] = collections.Counter()

  def __next__(self):
    run = 0
    while True:
      element = next(self._parent)
      if isinstance(element, Mapping) and NOTES_KEY in element:
        for reason, path, detail in element[NOTES_KEY]:
          self._truncs[reason] += 1
          self._counter.truncation(reason, path, detail)
      if isinstance(element, Mapping) and SKIP_KEY in element:
        reason, path, detail = element[SKIP_KEY]
        self._counts[reason] += 1
        self._counter.skip(reason, path, detail)
        run += 1
        if run >= self._max_consecutive:
          raise RuntimeError(f"{run} inputs in a row were skipped; check the data root and "
                             f"config.\n{self._counter.report()}")
        continue
      return element

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "skips": dict(self._counts),
            "truncations": dict(self._truncs)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._counts = collections.Counter(state.get("skips", {}))
    self._truncs = collections.Counter(state.get("truncations", {}))
    self._counter.merge(self._counts)
    self._counter.merge_truncations(self._truncs)


class _CountSkipsIterDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, counter: SkipCounter, max_consecutive: int):
    super().__init__(parent)
    self._counter = counter
    self._max_consecutive = max_consecutive

  def __iter__(self) -> _CountSkipsIterator:
    return _CountSkipsIterator(self._parent.__iter__(), self._counter, self._max_consecutive)

  def __str__(self) -> str:
    return "CountSkipsIterDataset"


# ---------------------------------------------------------------------------------------
# Batching.


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  for b in sorted(buckets):
    if n <= b:
      return b
  raise ValueError(f"sequence of {n} tokens exceeds the largest bucket {max(buckets)}")


def sequence_pad_values(pad_id: int) -> dict[str, int]:
  """The batch keys padded along their last axis to a bucket length, with their pad value
  (SFT batches [B, L]; preference pairs [B, 2, L])."""
  return {"input_ids": pad_id, "attention_mask": 0, "loss_mask": 0,
          "seq_input_ids": pad_id, "seq_attention_mask": 0, "seq_loss_mask": 0}


def collate(examples: Sequence[dict], *, bucket_lengths: Sequence[int], pad_id: int) -> dict:
  """Stacks examples; pads input_ids / attention_mask / loss_mask to a bucket length.

  A key whose arrays are, in every example, the very arrays of an earlier key (face_crops
  that are the frames, see ExampleBuilder) gets that key's batch array, not a second copy.
  """
  if not examples:
    raise ValueError("empty batch")
  length = bucket_length(max(len(e["input_ids"]) for e in examples), bucket_lengths)
  pads = sequence_pad_values(pad_id)
  batch = {}
  for key in ("input_ids", "attention_mask", "loss_mask"):
    arr = np.full((len(examples), length), pads[key], np.int32)
    for i, e in enumerate(examples):
      arr[i, :len(e[key])] = e[key]
    batch[key] = arr
  stacked: list[str] = []
  for key in examples[0]:
    if key in batch or key.startswith("_"):  # NOTES_KEY: counted upstream, not batch data
      continue
    alias = next((k for k in stacked if isinstance(examples[0][key], np.ndarray)
                  and all(e[key] is e[k] for e in examples)), None)
    if alias is not None:
      batch[key] = batch[alias]
    else:
      batch[key] = np.stack([e[key] for e in examples])
      stacked.append(key)
  batch["label"] = batch["label"].astype(np.int32)
  batch["qformer_ids"] = batch["qformer_ids"].astype(np.int32)
  batch["qformer_mask"] = batch["qformer_mask"].astype(np.int32)
  return batch


class _Collate:
  """Picklable batch_fn."""

  def __init__(self, bucket_lengths: Sequence[int], pad_id: int):
    self.bucket_lengths = tuple(bucket_lengths)
    self.pad_id = pad_id

  def __call__(self, examples):
    return collate(examples, bucket_lengths=self.bucket_lengths, pad_id=self.pad_id)


# ---------------------------------------------------------------------------------------
# The dataset.


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def check_prompt_fits(config: PipelineConfig, tokenizer: LlamaTokenizer) -> None:
  """ValueError now (not a skip per example later) if the template's fixed text and the
  visual slots alone exceed max_length."""
  template_lib.tokenize_conversation(
      [{"from": "human", "value": ""}, {"from": "gpt", "value": ""}], tokenizer,
      num_visual_slots=config.num_visual_slots, max_length=config.max_length,
      template=template_lib.get_template(config.template))


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside absl.app (pytest, notebooks) they
  are unparsed, so take the defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def shuffled(source: Sequence[Any], config: PipelineConfig) -> grain.MapDataset:
  """Source elements in the global order: shuffled per epoch, repeated (same on every host)."""
  ds = grain.MapDataset.source(source)
  if config.shuffle:
    ds = ds.shuffle(seed=config.seed)
  return ds.repeat(config.num_epochs)


def shuffled_shard(source: Sequence[Any], config: PipelineConfig, process_index: int,
                   process_count: int) -> grain.MapDataset:
  """The global order, then every process_count-th element from process_index (hosts get
  disjoint slices)."""
  return shuffled(source, config)[process_index::process_count]


def make_dataset(
    source: Sequence[Record] | Any,
    config: PipelineConfig,
    tokenizer: LlamaTokenizer,
    qformer_tokenizer: BertTokenizer,
    *,
    skips: SkipCounter | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    builder: Callable[[Any, np.random.Generator], dict] | None = None,
    batch_fn: Callable[[Sequence[dict]], dict] | None = None,
) -> grain.IterDataset:
  """The batched IterDataset for this process.

  Args:
    source: a sequence of Records (same order on every host), or a grain random-access
      source yielding Records or pre-extracted mappings (preprocess.PreextractedSource).
    config: PipelineConfig.
    tokenizer / qformer_tokenizer: LLaMA SentencePiece and BERT WordPiece tokenizers.
    skips: counter for skipped inputs (its `strict` makes bad inputs raise instead).
    process_index / process_count: default jax.process_index() / jax.process_count().
    builder: element -> example (default: an ExampleBuilder of `config`); a builder for
      other element types (e.g. preference pairs) returns `{SKIP_KEY: (reason, path,
      detail)}` for a bad element, which is counted as the default builder's skips are.
    batch_fn: examples -> batch (default: `collate` into `config.bucket_lengths`).
  """
  skips = skips if skips is not None else SkipCounter()
  index, count = _process_info(process_index, process_count)
  if config.global_batch_size % count:
    raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by "
                     f"{count} processes")
  if len(source) == 0:
    raise ValueError("the pipeline got no records")
  local_batch = config.global_batch_size // count

  check_prompt_fits(config, tokenizer)
  if builder is None:
    builder = ExampleBuilder(config, tokenizer, qformer_tokenizer, strict=skips.strict)
  # Per-example randomness (option order, ...) is keyed by the global position, before the
  # host split, so an example is built identically whatever the number of processes.
  ds = shuffled(source, config).random_map(builder, seed=config.seed + 1)
  ds = ds[index::count]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                            prefetch_buffer_size=max(1, config.read_threads)))
  if config.worker_count > 0:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
  it = _CountSkipsIterDataset(it, skips, config.max_consecutive_skips)
  return it.batch(local_batch, drop_remainder=config.drop_remainder,
                  batch_fn=batch_fn or _Collate(config.bucket_lengths, tokenizer.pad_id))


def make_iterator(*args, **kwargs) -> grain.DatasetIterator:
  """`iter(make_dataset(...))`: a checkpointable grain DatasetIterator of batches."""
  return iter(make_dataset(*args, **kwargs))
