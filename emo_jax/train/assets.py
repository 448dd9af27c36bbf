"""The embedded default's data and tokenizers, made on first use under `<workdir>/data`.

Real runs point `config.data.tokenizer` at a LLaMA `tokenizer.model` and
`config.data.qformer_vocab` at a BERT `vocab.txt`. The CPU default has neither (no
downloads), so this module trains a small LLaMA-style SentencePiece BPE model (unk 0,
bos 1, eos 2, no pad, byte fallback — LLaMA's conventions) and writes a WordPiece vocab
on the text the synthetic data can produce: the vicuna_v1 system prompt, the category
questions, every class word and the FERID-style answers. Deterministic (fixed seed,
sorted inputs), so a restarted run gets the same ids.
"""
from __future__ import annotations

import fcntl
import glob
import json
import os
import re

import sentencepiece as spm
from absl import logging

from emo_jax.train.errors import ConfigError
from input_pipeline import instructions as instructions_lib
from input_pipeline import labels as labels_lib
from input_pipeline import synthetic
from input_pipeline import template as template_lib

_BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _corpus(data_root: str) -> list[str]:
  lines = [template_lib.VICUNA_V1.system] * 4
  classes = sorted({c for cs in labels_lib.CLASSES.values() for c in cs} |
                   set(labels_lib.SYNONYMS))
  for media in ("image", "video"):
    for i in range(len(classes)):
      opts = classes[i:] + classes[:i]
      lines.append(instructions_lib.QUESTION_TEMPLATE.format(
          media=media, options=", ".join(opts[:8])))
  lines += [f"USER: ASSISTANT: {c}" for c in classes]
  for path in sorted(glob.glob(os.path.join(data_root, "ferid_*.json"))):
    with open(path) as f:
      for item in json.load(f):
        lines += [t["value"].replace("<image>", " ") for t in item.get("conversations", [])]
  return lines


def train_llama_tokenizer(data_root: str, out_path: str, vocab_size: int = 512) -> str:
  prefix = out_path[:-len(".model")] if out_path.endswith(".model") else out_path
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_corpus(data_root)), model_prefix=prefix, vocab_size=vocab_size,
      model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=True, split_digits=True, character_coverage=1.0, minloglevel=2,
      num_threads=1, hard_vocab_limit=False)
  return prefix + ".model"


def write_bert_vocab(data_root: str, out_path: str) -> str:
  words = set()
  for line in _corpus(data_root):
    words.update(re.findall(r"[a-z]+|[^a-z\s]", line.lower()))
  vocab = _BERT_SPECIAL + sorted(words)
  with open(out_path, "w") as f:
    f.write("\n".join(vocab) + "\n")
  return out_path


GENERATED = "GENERATED.json"
GENERATING = ".generating"


def is_generated(data_root: str) -> bool:
  return os.path.exists(os.path.join(data_root, GENERATED))


def ensure_default_data(data_root: str, *, num_images: int, num_clips: int, seed: int = 0,
                        image_size: int = 112) -> dict:
  """Generates the synthetic dataset and its tokenizers under `data_root` if missing.
  Returns {'tokenizer': path, 'qformer_vocab': path}.

  Says so (a warning) when it creates the folder or generates into it, and refuses a
  folder that exists and holds files it did not make (a mistyped `config.data.root` must
  not fill someone's dataset folder). Processes sharing a disk (several hosts' caches on
  one machine) generate one at a time."""
  marker = os.path.join(data_root, GENERATED)
  if not os.path.exists(marker):
    os.makedirs(os.path.dirname(os.path.abspath(data_root)), exist_ok=True)
    with open(os.path.abspath(data_root) + ".lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not os.path.exists(marker):
        _generate(data_root, marker, num_images=num_images, num_clips=num_clips, seed=seed,
                  image_size=image_size)
  with open(marker) as f:
    have = json.load(f)
  if (have.get("num_images"), have.get("num_clips"), have.get("seed")) != (
      num_images, num_clips, seed):
    raise ConfigError(
        f"{data_root} holds synthetic data made with num_images={have.get('num_images')}, "
        f"num_clips={have.get('num_clips')}, seed={have.get('seed')}, but the config asks "
        f"for {num_images}, {num_clips}, {seed}: delete the folder or point "
        "config.data.root elsewhere")
  return {"tokenizer": os.path.join(data_root, "tokenizer.model"),
          "qformer_vocab": os.path.join(data_root, "vocab.txt")}


def _generate(data_root: str, marker: str, *, num_images: int, num_clips: int, seed: int,
              image_size: int) -> None:
  started = os.path.join(data_root, GENERATING)
  present = sorted(os.listdir(data_root)) if os.path.isdir(data_root) else None
  if present and not os.path.exists(started):
    raise ConfigError(
        f"config.data.root {data_root} exists and holds other files ({present[:3]}...) "
        "but no generated synthetic data: refusing to generate into it; point "
        "config.data.root at an empty or new folder, or at real data with "
        "config.data.synthetic.generate=False")
  logging.warning("%s synthetic data folder %s (config.data.root=%r; '' means "
                  "<workdir>/data) and generating %d images and %d clips into it",
                  "creating the" if present is None else
                  "resuming the half-made" if present else "using the empty",
                  data_root, data_root, num_images, num_clips)
  os.makedirs(data_root, exist_ok=True)
  with open(started, "w") as f:
    f.write("synthetic data generation in progress\n")
  summary = synthetic.generate(data_root, num_images=num_images, num_clips=num_clips,
                               seed=seed, image_size=image_size, clip_size=image_size)
  train_llama_tokenizer(data_root, os.path.join(data_root, "tokenizer.model"))
  write_bert_vocab(data_root, os.path.join(data_root, "vocab.txt"))
  summary.update(num_images=num_images, num_clips=num_clips, seed=seed)
  with open(marker, "w") as f:   # written last: a half-generated folder is regenerated
    json.dump(summary, f, indent=1)
  os.remove(started)
