"""Evaluation: UAR / WAR per dataset from generated answers or from option likelihoods.

Two modes (config.eval.modes):
  'generate'    the model answers the category question (greedy, KV cache); the answer
                maps to a class with train.metrics.parse_answer (normalise, synonyms,
                first option named; no match = wrong). This is the paper's protocol.
  'likelihood'  our addition: for each class word c, the log-likelihood of the answer
                "c</s>" after the same prompt; the prediction is the most likely class.
                Needs no parsing and gives a probability per class (softmax over the
                classes' summed log-likelihoods).
Per eval entry of config.data.eval (one per fold for DFEW / MAFW: their UAR / WAR are the
mean over the folds), the report holds UAR, WAR, per-class recall, the confusion matrix
(also drawn as a PNG), and, when the model has a face prior, the breakdown by its
predicted age / gender / race group. Written to <workdir>/eval/report.{json,md}.

Examples are built in record order by the pipeline's ExampleBuilder (options in class-list
order); a record that cannot be read is counted in the report's `skipped`, never dropped
silently.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from emo_jax.models import generation
from emo_jax.train import loop
from emo_jax.train import metrics as metrics_lib
from emo_jax.train import task as task_lib
from input_pipeline import instructions as instructions_lib
from input_pipeline import paths
from input_pipeline import pipeline as pipeline_lib
from input_pipeline.contract import AGE_BINS, GENDERS, RACES
from input_pipeline.records import Record, SkipCounter


# ---------------------------------------------------------------------------- examples


def question_and_options(record: Record) -> tuple[str, tuple[str, ...], int]:
  """(first user turn, options, label index) of a labelled record (class-list order)."""
  inst = instructions_lib.instruction_for_record(record, shuffle=False)
  if not inst.options:
    raise ValueError(f"record {record.id} has no options (not a category question)")
  label = inst.label_index
  if record.label is not None:
    label = instructions_lib.option_for_label(record.label, inst.options)
  return inst.conversations[0]["value"], inst.options, label


def with_turns(record: Record, question: str, answer: str | None) -> Record:
  conv = [{"from": "human", "value": question}]
  if answer is not None:
    conv.append({"from": "gpt", "value": answer})
  return dataclasses.replace(record, conversations=tuple(conv))


def build_examples(builder: pipeline_lib.ExampleBuilder, records: Sequence[Record],
                   skips: SkipCounter, num_threads: int = 2) -> list[dict | None]:
  """Examples in record order; None where a record was skipped (counted in `skips`)."""
  rng_seed = 0

  def one(rec):
    return builder(rec, np.random.default_rng(rng_seed))

  ds = grain.MapDataset.source(list(records)).map(one)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=8))
  out = []
  for ex in it:
    for reason, path, detail in ex.get(pipeline_lib.NOTES_KEY, ()):
      skips.truncation(reason, path, detail)
    if pipeline_lib.SKIP_KEY in ex:
      reason, path, detail = ex[pipeline_lib.SKIP_KEY]
      skips.skip(reason, path, detail)
      out.append(None)
    else:
      out.append(ex)
  return out


def collate(examples: Sequence[dict], batch_size: int, buckets: Sequence[int], pad_id: int
            ) -> dict:
  """Right-padded batch of exactly `batch_size` rows (the last rows repeat the first
  example and are ignored by the caller): static shapes, one compile per bucket."""
  exs = list(examples) + [examples[0]] * (batch_size - len(examples))
  return pipeline_lib.collate(exs, bucket_lengths=buckets, pad_id=pad_id)


def left_pad(batch: dict) -> dict:
  """Right padding -> left padding (rows rolled so the prompt ends at the last column)."""
  am = np.asarray(batch["attention_mask"])
  t = am.shape[1]
  last = t - 1 - np.argmax(am[:, ::-1] > 0, axis=1)   # last attended position
  shift = t - 1 - last
  out = dict(batch)
  for k in ("input_ids", "attention_mask", "loss_mask"):
    x = np.asarray(batch[k])
    pad = 0 if k != "input_ids" else None
    rows = []
    for i in range(x.shape[0]):
      r = np.roll(x[i], shift[i])
      if shift[i]:
        r[:shift[i]] = pad if pad is not None else x[i][-1]
      rows.append(r)
    out[k] = np.stack(rows)
  return out


# ---------------------------------------------------------------------------- scoring


class Scorer:
  """Jitted generate / per-example answer log-likelihood / face-prior AGR for a model."""

  def __init__(self, model: nnx.Module, *, max_new_tokens: int, eos_id: int, pad_id: int):
    self.graphdef, self.state = nnx.split(model)
    self.has_prior = getattr(model, "face_prior", None) is not None
    self.max_new_tokens = max_new_tokens
    self.eos_id = eos_id
    self.pad_id = pad_id

    @functools.partial(jax.jit, compiler_options=generation.decode_compiler_options())
    def gen(state, batch):
      m = nnx.merge(self.graphdef, state)
      return m.generate(batch, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                        pad_token_id=pad_id)

    @jax.jit
    def answer_logp(state, batch):
      m = nnx.merge(self.graphdef, state)
      logits = m(batch)[:, :-1].astype(jnp.float32)
      ids = batch["input_ids"][:, 1:]
      w = batch["loss_mask"][:, 1:].astype(jnp.float32)
      logp = jax.nn.log_softmax(logits, -1)
      tok = jnp.take_along_axis(logp, jnp.maximum(ids, 0)[..., None], -1)[..., 0]
      return (tok * w).sum(-1)

    @jax.jit
    def agr(state, crops):
      m = nnx.merge(self.graphdef, state)
      p = m.face_prior(m.face_inputs(crops))  # uint8 crops are normalised on device
      return (jnp.argmax(p.age_logits, -1), jnp.argmax(p.gender_logits, -1),
              jnp.argmax(p.race_logits, -1))

    self._gen, self._logp, self._agr = gen, answer_logp, agr

  def generate(self, batch: dict) -> np.ndarray:
    return np.asarray(self._gen(self.state, task_lib.model_batch(left_pad(batch))))

  def answer_logp(self, batch: dict) -> np.ndarray:
    return np.asarray(self._logp(self.state, task_lib.model_batch(batch)))

  def agr(self, batch: dict) -> tuple[np.ndarray, ...] | None:
    if not self.has_prior or "face_crops" not in batch:
      return None
    crops = np.asarray(batch["face_crops"])[:, 0]   # first frame
    return tuple(np.asarray(x) for x in self._agr(self.state, crops))


def _batches(n: int, size: int):
  for s in range(0, n, size):
    yield s, min(s + size, n)


def generate_texts(scorer: Scorer, builder, tokenizer, prompts, skips, batch_size: int,
                   buckets, *, with_agr: bool = False) -> tuple[list[int], list[str], Any]:
  """Greedy answers to records whose conversation is one user turn: (indices kept, decoded
  answers up to EOS, AGR predictions [n, 3] or None). Skipped records are counted."""
  exs = build_examples(builder, prompts, skips)
  kept = [i for i, e in enumerate(exs) if e is not None]
  answers, agrs = [], []
  for s, e in _batches(len(kept), batch_size):
    idx = kept[s:e]
    batch = collate([exs[i] for i in idx], batch_size, buckets, tokenizer.pad_id)
    out = scorer.generate(batch)[:len(idx)]
    a = scorer.agr(batch) if with_agr else None
    if a is not None:
      agrs.append(np.stack(a, 1)[:len(idx)])
    for row in out:
      row = [int(t) for t in row]
      if tokenizer.eos_id in row:
        row = row[:row.index(tokenizer.eos_id)]
      answers.append(tokenizer.decode([t for t in row if t >= 0]))
  return kept, answers, (np.concatenate(agrs) if agrs else None)


def predict_generate(scorer: Scorer, builder, tokenizer, records, skips, batch_size: int,
                     buckets) -> dict:
  """Generated answers -> class indices. Returns dict(pred, label, answers, agr, kept)."""
  qs = [question_and_options(r) for r in records]
  prompts = [with_turns(r, q, None) for r, (q, _, _) in zip(records, qs)]
  kept, answers, agr = generate_texts(scorer, builder, tokenizer, prompts, skips, batch_size,
                                      buckets, with_agr=True)
  preds = [metrics_lib.parse_answer(text, qs[i][1]) for i, text in zip(kept, answers)]
  return {"pred": np.asarray(preds, np.int64), "label": np.asarray([qs[i][2] for i in kept]),
          "answers": answers, "agr": agr, "kept": kept,
          "options": [qs[i][1] for i in kept]}


def predict_likelihood(scorer: Scorer, builder, tokenizer, records, skips, batch_size: int,
                       buckets) -> dict:
  """Per-class answer log-likelihoods -> argmax class and class probabilities."""
  qs = [question_and_options(r) for r in records]
  flat, example_of = [], []
  for i, (r, (q, opts, _)) in enumerate(zip(records, qs)):
    for c in opts:
      flat.append(with_turns(r, q, c))
      example_of.append(i)
  exs = build_examples(builder, flat, skips)
  scores: dict[int, list[float]] = {}
  bad = set()
  for j, e in enumerate(exs):
    if e is None:
      bad.add(example_of[j])
  kept_j = [j for j, e in enumerate(exs) if e is not None and example_of[j] not in bad]
  for s, e in _batches(len(kept_j), batch_size):
    idx = kept_j[s:e]
    batch = collate([exs[j] for j in idx], batch_size, buckets, tokenizer.pad_id)
    lp = scorer.answer_logp(batch)[:len(idx)]
    for j, v in zip(idx, lp):
      scores.setdefault(example_of[j], []).append(float(v))
  kept = sorted(scores)
  probs = [jax.nn.softmax(jnp.asarray(scores[i])) for i in kept]
  return {"pred": np.asarray([int(np.argmax(scores[i])) for i in kept], np.int64),
          "label": np.asarray([qs[i][2] for i in kept]),
          "probs": [np.asarray(p).tolist() for p in probs], "kept": kept,
          "options": [qs[i][1] for i in kept]}


# ---------------------------------------------------------------------------- reports


def confusion_png(cm: np.ndarray, classes: Sequence[str], title: str, path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = list(classes) + ["(none)"]
  fig, ax = plt.subplots(figsize=(1 + 0.6 * len(cols), 1 + 0.55 * len(classes)))
  ax.imshow(cm, cmap="Blues")
  ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
  ax.set_yticks(range(len(classes)), classes)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  for (r, c), v in np.ndenumerate(cm):
    if v:
      ax.text(c, r, str(v), ha="center", va="center",
              color="white" if v > cm.max() / 2 else "black", fontsize=8)
  fig.tight_layout()
  plt.close(fig)
  write_png(fig, path)
  return path


def write_png(fig, path: str) -> None:
  """A matplotlib figure as a PNG at `path` (local or a cloud URL)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  paths.write_bytes(path, buf.getvalue())


def _markdown(report: dict) -> str:
  lines = [f"# Evaluation (step {report['step']})", ""]
  for mode, per in report["modes"].items():
    lines += [f"## mode: {mode}", "", "| dataset | UAR | WAR | samples | unparsed | folds |",
              "|---|---|---|---|---|---|"]
    for name, r in per.items():
      lines.append(f"| {name} | {r['uar']:.4f} | {r['war']:.4f} | {r['num_samples']} | "
                   f"{r.get('num_unparsed', 0)} | {r.get('num_folds', 1)} |")
    lines.append("")
    for name, r in per.items():
      for g, vals in (r.get("groups") or {}).items():
        lines += [f"### {name} by predicted {g} ({mode})", "", "| group | UAR | WAR | n |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v['uar']:.4f} | {v['war']:.4f} | {v['num_samples']} |"
                  for k, v in vals.items()]
        lines.append("")
  if report.get("skipped"):
    lines += ["## skipped inputs", "", "```", json.dumps(report["skipped"], indent=1), "```"]
  if report.get("truncated"):
    lines += ["## inputs used truncated", "", "```", json.dumps(report["truncated"], indent=1),
              "```"]
  return "\n".join(lines) + "\n"


def _agr_groups(agr: np.ndarray | None) -> dict | None:
  if agr is None:
    return None
  return {"age": [AGE_BINS[i] for i in agr[:, 0]], "gender": [GENDERS[i] for i in agr[:, 1]],
          "race": [RACES[i] for i in agr[:, 2]]}


def evaluate(config, workdir: str, *, model: nnx.Module | None = None,
             step: int | None = None, out_dir: str | None = None) -> dict:
  """Runs every eval entry in every mode; writes report.{json,md} and the confusion PNGs
  into `out_dir` (default <workdir>/eval). Returns {'summary': {mode: {name: {uar, war}}},
  'report': path}."""
  if model is None:
    _, model, step = loop.restore_trained(config, workdir)
  tok_paths = task_lib.prepare_data(config, workdir, generate=False)
  tok, qtok = task_lib.tokenizers(tok_paths)
  model_cfg = task_lib.model_config(config)
  pcfg = task_lib.pipeline_config(config, model_cfg, shuffle=False, shuffle_options=False)
  builder = pipeline_lib.ExampleBuilder(pcfg, tok, qtok, strict=False)
  scorer = Scorer(model, max_new_tokens=config.eval.max_new_tokens, eos_id=tok.eos_id,
                  pad_id=tok.pad_id)
  out_dir = out_dir or paths.join(workdir, "eval")
  paths.makedirs(out_dir)
  skips = SkipCounter(strict=bool(config.data.get("strict", False)))
  sets = task_lib.eval_sets(config, workdir, skips)
  report: dict[str, Any] = {"step": step, "modes": {}, "samples": {}}
  bs = config.eval.batch_size
  for mode in config.eval.modes:
    fn = {"generate": predict_generate, "likelihood": predict_likelihood}.get(mode)
    if fn is None:
      raise ValueError(f"unknown eval mode {mode!r} (generate | likelihood)")
    per_name: dict[str, list] = {}
    for es in sets:
      recs = [r for r in es["records"] if r.label is not None]
      if config.eval.max_examples > 0:
        recs = recs[:config.eval.max_examples]
      if not recs:
        raise ValueError(f"eval set {es['name']} (fold {es['fold']}) has no labelled records")
      res = fn(scorer, builder, tok, recs, skips, bs, pcfg.bucket_lengths)
      classes = res["options"][0]
      s = metrics_lib.score(res["label"], res["pred"], classes)
      entry = {"scores": s, "fold": es["fold"], "res": res, "classes": classes}
      per_name.setdefault(es["name"], []).append(entry)
      tag = f"{es['name']}" + (f"_fold{es['fold']}" if es["fold"] else "")
      confusion_png(s.confusion, classes, f"{tag} ({mode})",
                    paths.join(out_dir, f"confusion_{tag}_{mode}.png"))
      report["samples"].setdefault(mode, {})[tag] = [
          {"id": recs[k].id, "label": int(l), "pred": int(p),
           **({"answer": res["answers"][n]} if "answers" in res else {}),
           **({"probs": res["probs"][n]} if "probs" in res else {})}
          for n, (k, l, p) in enumerate(zip(res["kept"], res["label"], res["pred"]))]
      logging.info("eval %s %s: UAR %.4f WAR %.4f (%d samples)", mode, tag, s.uar, s.war,
                   s.num_samples)
    per_mode = {}
    for name, entries in per_name.items():
      if len(entries) > 1:
        r = metrics_lib.mean_over_folds([e["scores"] for e in entries])
        r["num_samples"] = sum(e["scores"].num_samples for e in entries)
        r["num_unparsed"] = sum(e["scores"].num_unparsed for e in entries)
        r["folds"] = {str(e["fold"]): e["scores"].to_json() for e in entries}
      else:
        e = entries[0]
        r = e["scores"].to_json()
        groups = _agr_groups(e["res"].get("agr"))
        if groups:
          r["groups"] = metrics_lib.group_breakdown(e["res"]["label"], e["res"]["pred"],
                                                    e["classes"], groups)
      per_mode[name] = r
    report["modes"][mode] = per_mode
  report["skipped"] = skips.counts
  if skips.truncations:
    report["truncated"] = skips.truncations
  if jax.process_index() == 0:
    paths.write_text(paths.join(out_dir, "report.json"), json.dumps(
        report, indent=1, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)))
    paths.write_text(paths.join(out_dir, "report.md"), _markdown(report))
  summary = {mode: {name: {"uar": r["uar"], "war": r["war"], "num_samples": r["num_samples"]}
                    for name, r in per.items()} for mode, per in report["modes"].items()}
  return {"summary": summary, "report": paths.join(out_dir, "report.json")}
