"""The AU stage: an AUFormer head trained on the (frozen) vision tower, scored per fold.

`config.au` (see configs/default.py):
  enabled        run the stage after the main training (and in --mode=eval)
  synthetic      generate the synthetic faces' AU sequences (BP4D layout) into the data root
  data           {name: 'synthetic_au' | 'bp4d' | 'disfa', root: '' (the data root),
                  options: reader options (media=, image_dir=, ...)}
  folds          which of the 3 subject-exclusive folds to train and test
  head           AUFormerConfig fields (num_aus comes from the dataset's AU list)
  loss           AULossConfig fields (margin, gamma_neg, gamma_pos, detach_focus,
                 deep_supervision_weight)
  optimizer      as config.optimizer (lr, warmup_frac, ...; no groups)
  train          {num_steps, batch_size, aspect, read_threads} per fold
  eval_batch_size
  prompt         {enabled, template}: see `predict_au_sentences` / the pipeline's au_prompt

Per fold: class weights from the fold's training records (`au.class_weights`), a fresh
head on the model's vision tower (an `AUDetector`; only `au_head/` is trainable, so the
vision tower has no gradient and no optimizer state), the shared pure train step
(`train.step`), then pooled TP/FP/FN on the test fold (`train.au_metrics`). Each fold's
head is saved to `<workdir>/au/fold<k>/au_head.safetensors`; a fold whose file exists is
not trained again (a restarted job resumes at fold granularity). The report (per-fold
F1 per AU, mean over folds, the all-positive baseline) is written to
`<workdir>/eval/au_report.{json,md}` and appended to `<workdir>/eval/report.md`.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from emo_jax.convert import safetensors_io
from emo_jax.models import au_former
from emo_jax.models import pixels as pixels_lib
from emo_jax.train import au_loss
from emo_jax.train import au_metrics
from emo_jax.train import optimizer as opt_lib
from emo_jax.train import state as state_lib
from emo_jax.train import step as step_lib
from emo_jax.train import task as task_lib
from input_pipeline import au as au_lib
from input_pipeline import au_data
from input_pipeline import datasets as datasets_lib
from input_pipeline import paths
from input_pipeline.records import SkipCounter

MARKER = "AU_GENERATED.json"


def enabled(config) -> bool:
  return bool(config.get("au") and config.au.get("enabled", False))


def _plain(x: Any) -> Any:
  return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def ensure_au_data(config, workdir: str) -> str:
  """The AU data root; generates the synthetic AU sequences there when configured."""
  a = config.au
  root = a.data.get("root") or task_lib.data_root(config, workdir)
  syn = a.get("synthetic")
  if not (syn and syn.get("generate", False)):
    return root
  want = {k: syn[k] for k in ("num_subjects", "num_tasks", "num_frames", "seed", "image_size")}
  marker = os.path.join(root, MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      have = json.load(f)
    if {k: have.get(k) for k in want} != want:
      raise ValueError(f"{root} holds synthetic AU data made with "
                       f"{ {k: have.get(k) for k in want} }, the config asks for {want}: delete "
                       f"{marker} and the AUCoding/ and img/ folders, or set config.au.data.root")
    return root
  if jax.process_index() == 0:
    from input_pipeline import synthetic
    os.makedirs(root, exist_ok=True)
    out = synthetic.generate_au(root, want["num_subjects"], want["num_tasks"],
                                want["num_frames"], want["seed"], want["image_size"])
    with open(marker, "w") as f:
      json.dump({**want, **out}, f, indent=1)
  return root


def records(config, root: str, split: str | None, fold: int, skips: SkipCounter):
  d = config.au.data
  return datasets_lib.load_records(d.name, d.get("root") or root, split=split, fold=fold,
                                   skips=skips, **_plain(d.get("options") or {}))


def head_config(config, num_aus: int) -> au_former.AUFormerConfig:
  return au_former.AUFormerConfig.from_dict({**_plain(config.au.head), "num_aus": num_aus})


def loss_config(config) -> au_loss.AULossConfig:
  return au_loss.AULossConfig(**_plain(config.au.loss))


def _loss_fn(lcfg: au_loss.AULossConfig, dtype):
  """The AU loss over a batch; the fold's class weights travel in it ('weights' [B, A]), so
  every fold shares one compiled step."""

  def fn(model, batch):
    out = model(pixels_lib.normalize_vit(batch["pixels"], dtype))
    return au_loss.deep_supervised_sum(out.logits, out.deep_logits, batch["aus"],
                                       batch["weights"], lcfg)
  return fn


def _head_path(workdir: str, fold: int) -> str:
  return paths.join(workdir, "au", f"fold{fold}", "au_head.safetensors")


def save_head(head: au_former.AUFormer, path: str) -> None:
  """Writes the head's parameters as safetensors (a cloud `path` is written locally, then
  uploaded)."""
  flat = {opt_lib.path_str(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(head, nnx.Param))}
  folder, name = path.rstrip("/").rsplit("/", 1) if "/" in path else (".", path)
  with paths.staged_dir(folder) as local:
    safetensors_io.write_safetensors(
        os.path.join(local, name),
        [(k, v.shape, v.dtype, (lambda v=v: v)) for k, v in sorted(flat.items())])


def load_head(head: au_former.AUFormer, path: str) -> None:
  with paths.local_copy(path) as local:
    tensors = dict(safetensors_io.iter_tensors(local))
  state = nnx.state(head, nnx.Param)
  leaves = jax.tree_util.tree_leaves_with_path(state)
  missing = [opt_lib.path_str(p) for p, _ in leaves if opt_lib.path_str(p) not in tensors]
  if missing:
    raise ValueError(f"{path} lacks AU head tensors {missing[:5]}")
  new = jax.tree_util.tree_unflatten(jax.tree.structure(state),
                                     [jnp.asarray(tensors[opt_lib.path_str(p)]) for p, _ in leaves])
  nnx.update(head, new)


def train_fold(config, vit, train_recs, fold: int, aus, skips: SkipCounter,
               compiled: dict | None = None) -> tuple[au_former.AUDetector, dict]:
  """A fresh head trained on one fold's training records; returns (detector, log).
  `compiled` carries the jitted step from fold to fold (same structure: one compile)."""
  a = config.au
  compiled = {} if compiled is None else compiled
  weights = au_lib.class_weights(au_lib.label_matrix(train_recs))
  rngs = nnx.Rngs(params=int(config.seed) + 1000 + fold)
  head = au_former.build_head(head_config(config, len(aus)), vit, rngs=rngs)
  det = au_former.AUDetector(vit, head)
  graphdef, params, rng_state, frozen = state_lib.split_model(det, au_former.trainable_filter)
  num_steps = int(a.train.num_steps)
  if compiled.get("graphdef") != graphdef:
    tx, _ = opt_lib.make_optimizer(_plain(a.optimizer), num_steps, params)
    compiled.update(graphdef=graphdef, tx=tx, step=step_lib.jit_train_step(
        graphdef, tx, _loss_fn(loss_config(config), vit.cfg.dtype)))
  tx, step = compiled["tx"], compiled["step"]
  state = state_lib.create_train_state(params, rng_state, tx)
  it = au_data.make_iterator(train_recs, image_size=vit.cfg.image_size,
                             batch_size=int(a.train.batch_size), seed=int(config.seed) + fold,
                             aspect=a.train.get("aspect", "pad"), skips=skips,
                             read_threads=int(a.train.get("read_threads", 2)))
  t0, losses = time.time(), []
  for i in range(num_steps):
    batch = next(it)
    batch["weights"] = np.broadcast_to(weights.astype(np.float32), batch["aus"].shape)
    state, m = step(state, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
    if (i + 1) % max(1, num_steps // 10) == 0 or i + 1 == num_steps:
      losses.append((i + 1, float(m["loss"])))
      logging.info("AU fold %d step %d/%d loss %.4f", fold, i + 1, num_steps, losses[-1][1])
  det = state_lib.merge_model(graphdef, state.params, state.rngs, frozen)
  return det, {"steps": num_steps, "seconds": time.time() - t0, "loss": losses,
               "class_weights": {f"AU{x}": float(w) for x, w in zip(aus, weights)}}


def predict_scores(det: au_former.AUDetector, recs, *, image_size: int, aspect: str,
                   batch_size: int, skips: SkipCounter, compiled: dict | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(kept record indices, sigmoid probabilities [n, A]) in record order."""
  graphdef, state = nnx.split(det)
  dtype = det.vision_tower.cfg.dtype
  compiled = {} if compiled is None else compiled
  if compiled.get("fwd_graphdef") != graphdef:
    @jax.jit
    def fwd(state, pixels):
      m = nnx.merge(graphdef, state)
      return jax.nn.sigmoid(m(pixels_lib.normalize_vit(pixels, dtype)).logits)
    compiled.update(fwd_graphdef=graphdef, fwd=fwd)
  fwd = compiled["fwd"]

  idx, probs = [], []
  for kept, batch in au_data.load_all(recs, image_size=image_size, aspect=aspect, skips=skips,
                                      batch_size=batch_size):
    n = len(kept)
    pix = batch["pixels"]
    if n < batch_size:   # static shapes: pad with the first row
      pix = np.concatenate([pix, np.repeat(pix[:1], batch_size - n, 0)])
    probs.append(np.asarray(fwd(state, jnp.asarray(pix)))[:n])
    idx.append(kept)
  if not idx:
    return np.zeros((0,), np.int64), np.zeros((0, det.au_head.cfg.num_aus))
  return np.concatenate(idx), np.concatenate(probs)


def model_for_au(config, workdir: str):
  """The model whose vision tower the AU head uses: the workdir's trained checkpoint if it
  has one, else the config's pretrained weights (`config.init`, e.g. EVA-ViT-G)."""
  from emo_jax.train import checkpoint as ckpt_lib
  from emo_jax.train import loop
  if ckpt_lib.latest_committed_step(ckpt_lib.checkpoint_dir(workdir)) is not None:
    return loop.restore_trained(config, workdir)[1]
  built = loop.build(config, workdir)
  return state_lib.merge_model(built.graphdef, built.params, built.rngs, built.frozen)


def run(config, workdir: str, model=None, *, train: bool = True) -> dict:
  """Trains (unless saved) and scores the AU head on every configured fold; writes the report.

  `model`: the trained EmoLlama (its vision tower is used frozen); None restores it from
  the workdir's checkpoint.
  """
  if model is None:
    from emo_jax.train import loop
    _, model, _ = loop.restore_trained(config, workdir)
  a = config.au
  root = ensure_au_data(config, workdir)
  aus = au_lib.dataset_aus(a.data.name)
  vit = model.vision_tower
  skips = SkipCounter(strict=bool(config.data.get("strict", False)))
  counts, logs, compiled = {}, {}, {}
  for fold in a.folds:
    fold = int(fold)
    train_recs = records(config, root, "train", fold, skips)
    test_recs = records(config, root, "test", fold, skips)
    path = _head_path(workdir, fold)
    if paths.exists(path):
      head = au_former.build_head(head_config(config, len(aus)), vit, rngs=nnx.Rngs(0))
      load_head(head, path)
      det = au_former.AUDetector(vit, head)
      logs[fold] = {"restored": path}
    elif train:
      det, logs[fold] = train_fold(config, vit, train_recs, fold, aus, skips, compiled)
      if jax.process_index() == 0:
        save_head(det.au_head, path)
    else:
      raise FileNotFoundError(f"no AU head for fold {fold} at {path}: train first")
    kept, probs = predict_scores(det, test_recs, image_size=vit.cfg.image_size,
                                 aspect=a.train.get("aspect", "pad"),
                                 batch_size=int(a.eval_batch_size), skips=skips,
                                 compiled=compiled)
    labels = au_lib.label_matrix([test_recs[i] for i in kept])
    counts[fold] = au_metrics.counts(au_metrics.predictions(probs), labels)
    logs[fold].update(train_records=len(train_recs), test_records=len(test_recs),
                      scored=int(len(kept)))
  rep = au_metrics.report(counts, aus)
  rep.update(dataset=a.data.name, log={str(k): v for k, v in logs.items()},
             skipped=skips.counts)
  _write(workdir, rep, a.data.name)
  logging.info("AU mean F1 %.4f (all-positive %.4f)", rep["mean_f1"],
               rep["all_positive_mean_f1"])
  return {"mean_f1": rep["mean_f1"], "all_positive_mean_f1": rep["all_positive_mean_f1"],
          "folds": {k: v["mean_f1"] for k, v in rep["folds"].items()},
          "report": paths.join(workdir, "eval", "au_report.json")}


def _write(workdir: str, rep: dict, name: str) -> None:
  if jax.process_index() != 0:
    return
  out = paths.join(workdir, "eval")
  paths.makedirs(out)
  paths.write_text(paths.join(out, "au_report.json"), json.dumps(rep, indent=1))
  md = ("\n## Action units (" + name + ")\n\nF1 (%) per AU at threshold 0.5, TP/FP/FN pooled "
        "over each test fold's frames, uncoded labels left out; 'mean' is the mean over the "
        "folds; 'all-positive' predicts every AU on every frame.\n\n"
        + au_metrics.markdown(rep, title=f"{name}: AUFormer head on the vision tower"))
  paths.write_text(paths.join(out, "au_report.md"), md)
  report_md = paths.join(out, "report.md")
  if paths.exists(report_md):
    text = paths.read_text(report_md)
    cut = text.find("\n## Action units (")
    if cut >= 0:
      text = text[:cut]
    paths.write_text(report_md, text.rstrip("\n") + "\n" + md)


def write_predictions(config, workdir: str, recs, out_path: str, *, model=None, fold: int = 1,
                      threshold: float = au_metrics.THRESHOLD) -> dict:
  """Runs fold `fold`'s saved AU head over any records (e.g. the FER stills) and writes
  {record id: [active AU numbers]} to `out_path`, the file `config.au.prompt.source` reads
  to put an AU sentence into the LLM prompt. Returns the counted skips."""
  if model is None:
    from emo_jax.train import loop
    _, model, _ = loop.restore_trained(config, workdir)
  aus = au_lib.dataset_aus(config.au.data.name)
  vit = model.vision_tower
  head = au_former.build_head(head_config(config, len(aus)), vit, rngs=nnx.Rngs(0))
  load_head(head, _head_path(workdir, fold))
  skips = SkipCounter()
  # Records without AU labels still get predictions: give them an all-uncoded vector.
  import dataclasses
  recs = [r if r.aus is not None else dataclasses.replace(r, aus=(au_lib.UNCODED,) * len(aus))
          for r in recs]
  kept, probs = predict_scores(au_former.AUDetector(vit, head), recs,
                               image_size=vit.cfg.image_size,
                               aspect=config.au.train.get("aspect", "pad"),
                               batch_size=int(config.au.eval_batch_size), skips=skips)
  pred = au_metrics.predictions(probs, threshold=threshold)
  out = {recs[i].id: list(au_lib.active_aus(p, aus)) for i, p in zip(kept, pred)}
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(out, f, indent=1)
  return skips.counts
