"""Config -> the pieces a run needs: model, tokenizers, records, pipelines, loss.

Everything here reads `config` (ml_collections) and calls the model / pipeline modules;
the loop, evaluation, predict and export share it so they build the same model.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from emo_jax import dtypes
from emo_jax.convert import bundle, eva, facexformer, llama_hf, llama_vid, vision_hf
from emo_jax.models import emo_llama
from emo_jax.train import assets
from emo_jax.train.errors import ConfigError
from input_pipeline import datasets as datasets_lib
from input_pipeline import paths as paths_lib
from input_pipeline import pipeline as pipeline_lib
from input_pipeline import tokenizers as tokenizers_lib
from input_pipeline.contract import MODEL_KEYS
from input_pipeline.records import Record, SkipCounter

def _plain(x: Any) -> Any:
  return x.to_dict() if hasattr(x, "to_dict") else x


def data_root(config, workdir: str) -> str:
  """config.data.root, else <workdir>/data. The dataset readers read local files: with a
  cloud workdir, generated synthetic data goes to a local cache folder instead, and real
  datasets must be copied or mounted (launch.tpu_vm data) and named by config.data.root."""
  root = config.data.root
  if not root:
    if paths_lib.is_remote(workdir) and _generates_synthetic(config):
      s = config.data.synthetic
      return paths_lib.cache_dir("synthetic", f"n{s.num_images}_c{s.num_clips}_s{s.seed}_"
                                 f"i{s.get('image_size', 112)}")
    root = paths_lib.join(workdir, "data")
  if paths_lib.is_remote(root):
    raise ValueError(f"data root {root!r} is a URL, but the dataset readers read local files: "
                     "copy or mount it (python -m launch.tpu_vm data) and pass the local "
                     "folder as --config.data.root")
  return paths_lib.resolve(root)


def _generates_synthetic(config) -> bool:
  return bool(config.data.get("synthetic") and config.data.synthetic.get("generate", False))


def prepare_data(config, workdir: str, *, generate: bool = True) -> dict[str, str]:
  """Generates the synthetic data (and its tokenizers) if the config asks for it and
  `generate` (training); returns the tokenizer paths. Read-only modes pass
  generate=False: they use what training made and create nothing."""
  root = data_root(config, workdir)
  paths = {"tokenizer": config.data.tokenizer, "qformer_vocab": config.data.qformer_vocab}
  if _generates_synthetic(config):
    # A cloud workdir's synthetic data lives in each host's local cache (not in the
    # workdir): every process makes (or finds) its own copy, in any mode. Otherwise
    # process 0 of a training run makes it in the shared root.
    if paths_lib.is_remote(workdir) or (generate and jax.process_index() == 0):
      made = assets.ensure_default_data(
          root, num_images=config.data.synthetic.num_images,
          num_clips=config.data.synthetic.num_clips, seed=config.data.synthetic.seed,
          image_size=config.data.synthetic.get("image_size", 112))
    else:
      if not generate and not assets.is_generated(root):
        raise ConfigError(f"no generated data in {root} (config.data.root): training makes "
                          "it; this mode only reads it")
      made = {"tokenizer": os.path.join(root, "tokenizer.model"),
              "qformer_vocab": os.path.join(root, "vocab.txt")}
    paths = {k: paths[k] or made[k] for k in paths}
  for k, p in paths.items():
    if not p or not paths_lib.exists(p):
      raise ConfigError(f"config.data.{k} = {p!r} does not exist")
  return paths


def tokenizers(paths: Mapping[str, str]):
  return (tokenizers_lib.LlamaTokenizer(paths["tokenizer"]),
          tokenizers_lib.BertTokenizer(paths["qformer_vocab"]))


def model_config(config) -> emo_llama.EmoLlamaConfig:
  d = _plain(config.model)
  d = dict(d)
  for sub in ("llm", "vision", "qformer"):
    sd = dict(d[sub])
    for k in ("dtype", "param_dtype"):
      if isinstance(sd.get(k), str):
        sd[k] = dtypes.to_dtype(sd[k])
    d[sub] = sd
  return emo_llama.EmoLlamaConfig.from_dict(d)


def build_model(config, *, seed: int | None = None) -> emo_llama.EmoLlama:
  """A freshly initialised model (random weights; pretrained ones come from `init`)."""
  cfg = model_config(config)
  seed = config.seed if seed is None else seed
  return emo_llama.EmoLlama(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def load_pretrained(model: emo_llama.EmoLlama, config) -> None:
  """Overwrites the randomly initialised parts, in place, with the checkpoints named in
  `config.init` (paper config); nothing to do for the tiny default (all fields empty).

  init.bundle      an emo_jax bundle (export format (c)): every variable;
  init.llama_vid   a LLaMA-VID checkpoint directory (LLM, Q-Former, projectors, ViT if
                   `init.vision` is also given): every parameter it has;
  init.llm         an HF LLaMA / Vicuna directory: the LLM base weights (LoRA stays);
  init.vision      EVA-ViT-G (LAVIS eva_vit_g.pth / safetensors) or an HF CLIP directory;
  init.qformer     an InstructBLIP checkpoint: Q-Former + learned queries;
  init.face_prior  a FaceXFormer checkpoint.
  Pickled torch files load only with init.allow_pickle=True.
  """
  init = config.get("init")
  if not init:
    return
  allow_pickle = bool(init.get("allow_pickle", False))
  cfg = model.config
  if init.get("bundle"):
    src = bundle.load_bundle(init.bundle)
    nnx.update(model, nnx.state(src, nnx.Not(nnx.RngState)))
    return
  if init.get("llama_vid"):
    src = llama_vid.load_llama_vid(init.llama_vid, dtype=cfg.llm.param_dtype,
                                   allow_pickle=allow_pickle, vision_path=init.get("vision") or None,
                                   seed=config.seed, **{k: getattr(cfg, k) for k in (
                                       "use_face", "face_prior", "compress_type")})
    # Only the groups a LLaMA-VID checkpoint holds: the face modules of `src` are built with
    # default sizes and stay as initialised in `model` (or come from init.face_prior).
    from_ckpt = nnx.All(nnx.Param, nnx.Any(*(emo_llama.group_filter(g) for g in (
        "vision", "qformer", "projectors", "llm"))))
    nnx.update(model, nnx.state(src, from_ckpt))
    if init.get("face_prior") and model.face_prior is not None:
      facexformer.load_into(model.face_prior, init.face_prior, allow_pickle=allow_pickle)
    return
  if init.get("llm"):
    src = llama_hf.load_llama(init.llm, dtype=cfg.llm.dtype, param_dtype=cfg.llm.param_dtype,
                              allow_pickle=allow_pickle)
    if src.config.vocab_size != cfg.llm.vocab_size:
      raise ValueError(f"{init.llm} has vocab {src.config.vocab_size}, the config "
                       f"{cfg.llm.vocab_size}")
    nnx.update(model.language_model, nnx.state(src, nnx.Param))
  if init.get("vision"):
    eva.load_into(model.vision_tower, init.vision, allow_pickle=allow_pickle)
  if init.get("qformer"):
    vision_hf.load_qformer_into(model, init.qformer, allow_pickle=allow_pickle)
  if init.get("face_prior"):
    if model.face_prior is None:
      raise ValueError("config.init.face_prior is set but the model has no face prior network "
                       f"(model.face_prior={cfg.face_prior!r}); clear one of them")
    facexformer.load_into(model.face_prior, init.face_prior, allow_pickle=allow_pickle)


def trainable_filter(model_cfg: emo_llama.EmoLlamaConfig):
  return emo_llama.trainable_filter(model_cfg)


def loss_fn(model: emo_llama.EmoLlama, batch: Mapping[str, Any]):
  """(sum of answer-token NLL, number of answer tokens) — see train.step."""
  _, aux = model.loss(batch)
  return aux["nll_sum"], aux["num_tokens"]


def model_batch(batch: Mapping[str, Any]) -> dict:
  """The batch keys the model reads (drops `label` and anything else)."""
  return {k: batch[k] for k in MODEL_KEYS if k in batch}


# ------------------------------------------------------------------------------- data


def pipeline_config(config, model_cfg: emo_llama.EmoLlamaConfig, **overrides
                    ) -> pipeline_lib.PipelineConfig:
  d = dict(_plain(config.data.pipeline))
  d["tokens_per_frame"] = model_cfg.tokens_per_frame
  d["image_size"] = model_cfg.vision.image_size
  d.setdefault("agr_template", model_cfg.agr_template)  # the prompt the model's own AGR uses
  if model_cfg.use_face and model_cfg.face_prior == "tiny":
    d["face_size"] = model_cfg.tiny_face_prior.image_size
  au = config.get("au")
  if au is not None and au.get("prompt") and au.prompt.get("enabled", False):
    d["au_prompt"] = au.prompt.get("source", "labels")   # AU sentence (emo_jax.train.au_train)
    d["au_template"] = au.prompt.template
  d.update(overrides)
  return pipeline_lib.PipelineConfig.from_dict(d)


def load_split(spec: Mapping[str, Any], root: str, skips: SkipCounter, split: str,
               fold: int | None = None) -> list[Record]:
  """Records of one dataset entry of config.data.train / config.data.eval."""
  spec = dict(_plain(spec))
  name = spec.pop("name")
  # A dataset's own root (and FERID's media_root) may be relative to the data root.
  own = spec.pop("root", "")
  ds_root = os.path.join(root, own) if own else root
  if spec.get("media_root"):
    spec["media_root"] = os.path.normpath(os.path.join(root, spec["media_root"]))
  spec.pop("folds", None)
  spec.pop("split", None)
  spec.pop("label", None)
  return datasets_lib.load_records(name, ds_root, split=split, fold=fold, skips=skips, **spec)


def train_records(config, workdir: str, skips: SkipCounter) -> list[Record]:
  root = data_root(config, workdir)
  recs: list[Record] = []
  for spec in config.data.train:
    recs += load_split(spec, root, skips, spec.get("split", "train"), spec.get("fold"))
  if not recs:
    raise ValueError("config.data.train yields no records")
  return recs


def eval_sets(config, workdir: str, skips: SkipCounter) -> list[dict]:
  """[{'name', 'dataset', 'fold', 'records'}] for config.data.eval (one per fold)."""
  root = data_root(config, workdir)
  out = []
  for spec in config.data.eval:
    folds = spec.get("folds") or [spec.get("fold")]
    for fold in folds:
      recs = load_split(spec, root, skips, spec.get("split", "test"), fold)
      label = spec.get("label") or spec["name"]
      out.append({"name": label, "dataset": spec["name"], "fold": fold, "records": recs})
  return out


def train_iterator(config, workdir: str, model_cfg, toks, skips: SkipCounter):
  recs = train_records(config, workdir, skips)
  pcfg = pipeline_config(config, model_cfg, shuffle=True, num_epochs=None,
                         drop_remainder=True, seed=config.seed)
  logging.info("training on %d records", len(recs))
  return pipeline_lib.make_iterator(recs, pcfg, toks[0], toks[1], skips=skips), len(recs)


def replace_config(cfg, **kw):
  return dataclasses.replace(cfg, **kw)
