"""The config tree every experiment shares, and the parser of `get_config(arg)` presets.

An experiment file (`default.py`, `emo_llama_7b.py`) starts from `get_base_config()`
and overrides what differs (model sizes, data, schedule), as big_vision's config files and
MaxText's base + model files do. Each field is described here once. The run-level values
are the LLaMA-VID stage-2 recipe at paper scale (docs/MODEL.md, "Training"); the model's
architecture (`model.llm`, `model.vision`, `model.qformer`, `model.face` and the face
prior's own fields) belongs to the experiment file.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import ml_collections


@dataclasses.dataclass(frozen=True)
class Presets:
  """The parsed `:arg` of a config file: on/off presets plus at most one of a group."""
  flags: frozenset[str]
  choice: str | None = None

  def __contains__(self, flag: str) -> bool:
    return flag in self.flags


def parse_presets(arg: str | None, *, config: str, flags: Sequence[str] = (),
                  one_of: Sequence[str] = ()) -> Presets:
  """Parses 'a,b,c' (None or '' -> no presets).

  `flags` may each be given; of `one_of` at most one may be given, and the first of
  `one_of` is chosen when none is. Anything else is a ValueError naming the valid presets.
  """
  given = [a.strip() for a in (arg or "").split(",") if a.strip()]
  valid = list(one_of) + list(flags)
  unknown = [a for a in given if a not in valid]
  if unknown:
    raise ValueError(f"{config}: unknown preset(s) {', '.join(map(repr, unknown))}; "
                     f"valid presets (comma-separated): {', '.join(valid)}")
  chosen = sorted({a for a in given if a in one_of})
  if len(chosen) > 1:
    raise ValueError(f"{config}: presets {', '.join(chosen)} exclude each other; "
                     f"give one of {', '.join(one_of)}")
  return Presets(flags=frozenset(a for a in given if a in flags),
                 choice=chosen[0] if chosen else (one_of[0] if one_of else None))


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---- model (emo_jax.models.emo_llama.EmoLlamaConfig as data); the experiment file adds
  # llm / vision / qformer / face, face_prior and its fields, and trainable.
  m = c.model = ml_collections.ConfigDict()
  m.compress_type = "mean"         # content tokens per frame: 'mean' (1), 'grid:g' (g*g), 'none'
  m.use_face = True                # Face Info Mining tokens
  m.lora_rank = 0                  # 0: no LoRA
  m.lora_alpha = 16.0

  # ---- pretrained weights ('' = random init)
  c.init = ml_collections.ConfigDict(dict(
      bundle="",                 # an emo_jax bundle (resume a previous export)
      llama_vid="",              # a LLaMA-VID checkpoint dir (LLM + Q-Former + projectors)
      llm="",                    # HF LLaMA / Vicuna directory
      vision="",                 # LAVIS eva_vit_g (safetensors copy, or .pth + allow_pickle)
      qformer="",                # InstructBLIP checkpoint (Q-Former + query tokens)
      face_prior="",             # FaceXFormer checkpoint
      allow_pickle=False))

  # ---- data
  d = c.data = ml_collections.ConfigDict()
  d.root = ""                      # '' -> <workdir>/data
  d.tokenizer = ""                 # LLaMA tokenizer.model ('' -> made with the synthetic data)
  d.qformer_vocab = ""             # bert-base-uncased vocab.txt (same)
  d.strict = False                 # True: the first bad record is an error, not a counted skip
  d.synthetic = dict(generate=False, num_images=0, num_clips=0, seed=0, image_size=112)
  d.train = []                     # dicts: name, root, split, kind, fold, ...
  d.eval = []                      # dicts: the same, plus folds and label
  d.pipeline = dict(global_batch_size=128, num_frames=4, max_length=2048,
                    bucket_lengths=(512, 1024, 2048), qformer_max_length=64, aspect="pad",
                    face_mode="detect_or_full", shuffle_options=True, worker_count=8,
                    read_threads=4,
                    # Frozen-prior mode (docs/FROZEN_PRIORS.md): '' = run the prior online.
                    priors_dir="", agr_prompt=False,
                    # Multi-turn data: visual tokens per user turn (README "Multi-turn data").
                    image_turns=1, image_position="random")

  # ---- optimisation (AdamW, linear warmup, cosine decay; emo_jax.train.optimizer)
  o = c.optimizer = ml_collections.ConfigDict()
  o.lr = 2e-5                      # peak lr of every trainable parameter outside `groups`
  o.warmup_frac = 0.03
  o.end_lr_frac = 0.0
  o.weight_decay = 0.0
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
  o.grad_clip = 1.0                # global-norm clipping
  o.groups = ()                    # (name, regex over parameter paths, peak lr)

  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 0
  t.num_epochs = 1.0               # used when num_steps <= 0
  t.accum_steps = 1
  t.compute_dtype = "bfloat16"     # params are cast to it for the forward/backward
  t.log_every = 10
  t.peak_flops_per_device = -1.0   # -1: from the device kind (emo_jax.train.loop.PEAK_FLOPS)
  t.log_batch_hashes = False       # write <workdir>/batch_hashes.<process>.jsonl (provenance)

  k = c.checkpoint = ml_collections.ConfigDict()
  k.every_steps = 500
  k.every_secs = 1800.0            # > 0: also save when this many seconds passed
  k.max_to_keep = 3
  k.keep_period = 2000             # > 0: keep every step that is a multiple of it
  k.async_save = True

  # Mesh axes (data, fsdp, tensor); -1 takes the remaining devices. Rules: dp | fsdp | fsdp_tp
  # (emo_jax.sharding).
  c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1)))
  c.sharding = ml_collections.ConfigDict(dict(rules="fsdp"))

  # ---- evaluation (run at the end of training when at_end)
  e = c.eval = ml_collections.ConfigDict()
  e.at_end = True
  e.modes = ("generate", "likelihood")
  e.batch_size = 64
  e.max_new_tokens = 16
  e.max_examples = 0               # > 0: evaluate on a prefix (quick checks)

  # ---- predict (emo_jax.train.predict)
  p = c.predict = ml_collections.ConfigDict()
  p.dataset = "rafdb"              # whose class list is offered / scored
  p.face_mode = "detect"           # a face must be found ('aligned': skip detection)
  p.crop_to_face = True
  p.face_margin = 0.2
  p.window_secs = 2.0              # longer videos get a per-window timeline
  p.max_new_tokens = 32

  # ---- export
  x = c.export = ml_collections.ConfigDict()
  x.at_end = True
  x.formats = ("hf", "peft", "bundle")
  x.dtype = "bfloat16"

  # ---- serving (python -m emo_jax.serve; emo_jax/serve/engine.py)
  s = c.serve = ml_collections.ConfigDict()
  s.host = "127.0.0.1"
  s.port = 8000
  s.model_name = "emo-llama"
  s.media_root = ""                # '' = file paths refused (data: URIs only)
  s.max_upload_bytes = 16 * 2**20
  s.max_video_frames = 3000        # frames in one video (the container's count)
  s.max_prompt_tokens = 0          # 0 = the largest length bucket
  s.max_queue = 64                 # waiting requests; more get 429
  s.request_timeout_s = 60.0
  s.max_wait_ms = 20.0             # how long a batch waits for requests being prepared
  s.batch_buckets = (1, 2, 4, 8, 16)   # generated rows per compiled call (last: max batch)
  s.score_buckets = (1, 2, 4, 8, 16)   # option-likelihood prompts (windows) per call
  s.prepare_concurrency = 2        # requests decoded / tokenized at once (CPU threads)
  s.opencv_threads = 1             # OpenCV's threads per call in the server (0 = its default):
                                   # requests are already prepared in parallel
  s.length_buckets = ()            # () = data.pipeline.bucket_lengths
  s.max_tokens = 16                # the decode loop's static length (per-request cap)
  s.max_n = 4
  s.warmup = True                  # compile every bucket at start-up
  s.compilation_cache_dir = ""     # '' = <workdir>/jax_cache; 'none' = off
  s.demo = True                    # the Gradio page at /demo
  return c
