"""Multi-task affective evaluation: one checkpoint asked open-ended, multiple-choice and yes/no
judgement questions about emotions and facial action units, each with its parser and score.

In the style of the GPT-4V affective studies (zero-shot benchmarks that pose emotion
classification as a ranked choice, and an AU test asking the model to describe the
person's facial units with AU combinations as ground truth, and yes/no judgements "is the
person's expression <label>?"). Their prompts are not released as code; the wording here is
ours (`input_pipeline.instructions`), as are the scores:

| task | question | parser | score |
|---|---|---|---|
| emotion_choice | the category question with options | `metrics.parse_answer` (first option named) | UAR / WAR |
| emotion_open | "How does the person ... feel?" (no options) | `metrics.parse_answer` over the class list | UAR / WAR |
| emotion_judge | "Is the expression <c>?" for the true class and one other | `instructions.parse_yes_no` | accuracy |
| au_open | "Which facial action units are active?" | `au.parse_au_list` (AUk or FACS names) | AU F1 (pooled, mean over AUs) |
| au_judge | "Is AUk (<name>) active?" for one present and one absent AU | `instructions.parse_yes_no` | accuracy |

An unparsable answer counts as wrong (emotion: the 'unparsed' column; judgement: wrong;
AU list: no AU named). Answers are generated greedily with the evaluator's KV-cache
generator (`evaluate.generate_texts`). Written to `<workdir>/eval/affect_report.{json,md}`.

`config.au.affect_eval`: enabled, emotion (a config.data.eval-style entry), max_examples
(per task, 0 = all), max_new_tokens, seed (which other class / AU a judgement asks about).
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from emo_jax.train import au_metrics
from emo_jax.train import au_train
from emo_jax.train import evaluate as eval_lib
from emo_jax.train import metrics as metrics_lib
from emo_jax.train import task as task_lib
from input_pipeline import au as au_lib
from input_pipeline import instructions as inst_lib
from input_pipeline import labels as labels_lib
from input_pipeline import paths
from input_pipeline import pipeline as pipeline_lib
from input_pipeline.records import Record, SkipCounter

TASKS = ("emotion_choice", "emotion_open", "emotion_judge", "au_open", "au_judge")


def enabled(config) -> bool:
  return bool(config.get("au") and config.au.get("affect_eval")
              and config.au.affect_eval.get("enabled", False))


def _with(record: Record, inst: inst_lib.Instruction) -> Record:
  import dataclasses
  return dataclasses.replace(record, conversations=(inst.conversations[0],))


def emotion_items(records: Sequence[Record], rng: np.random.Generator) -> dict[str, list]:
  """(prompt record, truth) per emotion task; truth = class index or yes(0)/no(1)."""
  out = {"emotion_choice": [], "emotion_open": [], "emotion_judge": []}
  for r in records:
    classes = labels_lib.classes(r.dataset)
    y = labels_lib.label_index(r.dataset, r.label)
    media = inst_lib.media_word(r.media_type)
    q, opts, label = eval_lib.question_and_options(r)
    out["emotion_choice"].append((eval_lib.with_turns(r, q, None), (label, opts)))
    q = inst_lib.OPEN_EMOTION_QUESTION.format(media=media)
    out["emotion_open"].append((eval_lib.with_turns(r, f"<image>\n{q}", None), (y, classes)))
    other = int(rng.choice([i for i in range(len(classes)) if i != y]))
    for c, truth in ((y, True), (other, False)):
      q = inst_lib.EMOTION_JUDGE_QUESTION.format(media=media, emotion=classes[c])
      out["emotion_judge"].append((_with(r, inst_lib.judgement_instruction(q, None)),
                                   0 if truth else 1))
  return out


def au_items(records: Sequence[Record], rng: np.random.Generator) -> dict[str, list]:
  out = {"au_open": [], "au_judge": []}
  for r in records:
    aus = au_lib.dataset_aus(r.dataset)
    media = inst_lib.media_word(r.media_type)
    out["au_open"].append((_with(r, inst_lib.au_list_instruction((), media_type=media,
                                                                 with_answer=False)),
                           np.asarray(r.aus, np.int8)))
    for want in (1, 0):
      cands = [a for a, v in zip(aus, r.aus) if v == want]
      if not cands:
        continue
      a = int(rng.choice(cands))
      name = f"{au_lib.au_label(a)} ({au_lib.AU_NAMES[a]})"
      q = inst_lib.AU_JUDGE_QUESTION.format(au=name, media=media)
      out["au_judge"].append((_with(r, inst_lib.judgement_instruction(q, None)),
                              0 if want == 1 else 1))
  return out


def score(task: str, truths: list, answers: list[str], aus: Sequence[int] = ()) -> dict:
  """Parse the answers of one task and score them (see the module table)."""
  if task in ("emotion_choice", "emotion_open"):
    labels = [t[0] for t in truths]
    opts = truths[0][1]
    preds = [metrics_lib.parse_answer(a, t[1]) for a, t in zip(answers, truths)]
    s = metrics_lib.score(labels, preds, opts)
    return {"uar": s.uar, "war": s.war, "num_samples": s.num_samples,
            "num_unparsed": s.num_unparsed}
  if task in ("emotion_judge", "au_judge"):
    preds = [inst_lib.parse_yes_no(a) for a in answers]
    correct = [p == t for p, t in zip(preds, truths)]
    return {"accuracy": float(np.mean(correct)) if correct else float("nan"),
            "num_samples": len(correct), "num_unparsed": int(sum(p < 0 for p in preds)),
            "yes_rate": float(np.mean([p == 0 for p in preds])) if preds else float("nan")}
  if task == "au_open":
    labels = np.stack(truths)
    pred = np.stack([au_lib.vector_from_aus(au_lib.parse_au_list(a, aus), aus)
                     for a in answers])
    c = au_metrics.counts(pred, labels)
    rep = au_metrics.report({1: c}, aus)
    return {"mean_f1": rep["mean_f1"], "f1": rep["folds"]["1"]["f1"],
            "all_positive_mean_f1": rep["all_positive_mean_f1"], "num_samples": len(answers)}
  raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  return [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
          *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def markdown(report: dict) -> str:
  lines = ["# Multi-task affective evaluation", "", f"step {report.get('step')}", ""]
  t = report["tasks"]
  emo = [k for k in ("emotion_choice", "emotion_open") if k in t]
  if emo:
    lines += _table("Emotion: choice and open-ended",
                    ["task", "UAR", "WAR", "samples", "unparsed"],
                    [[k, f"{t[k]['uar']:.4f}", f"{t[k]['war']:.4f}", t[k]["num_samples"],
                      t[k]["num_unparsed"]] for k in emo])
  judge = [k for k in ("emotion_judge", "au_judge") if k in t]
  if judge:
    lines += _table("Yes/no judgements", ["task", "accuracy", "'yes' rate", "samples", "unparsed"],
                    [[k, f"{t[k]['accuracy']:.4f}", f"{t[k]['yes_rate']:.4f}",
                      t[k]["num_samples"], t[k]["num_unparsed"]] for k in judge])
  if "au_open" in t:
    a = t["au_open"]
    names = list(a["f1"])
    lines += _table("Action units: open-ended list", [*names, "mean F1", "all-positive"],
                    [[*(f"{100 * a['f1'][n]:.1f}" for n in names), f"{100 * a['mean_f1']:.1f}",
                      f"{100 * a['all_positive_mean_f1']:.1f}"]])
  if report.get("skipped"):
    lines.append(f"skipped inputs: {report['skipped']}")
  return "\n".join(lines) + "\n"


def run(config, workdir: str, model=None, step: int | None = None) -> dict:
  """Asks every task's questions to the model; writes eval/affect_report.{json,md}."""
  if model is None:
    from emo_jax.train import loop
    _, model, step = loop.restore_trained(config, workdir)
  ae = config.au.affect_eval
  assets = task_lib.prepare_data(config, workdir)
  tok, qtok = task_lib.tokenizers(assets)
  model_cfg = task_lib.model_config(config)
  pcfg = task_lib.pipeline_config(config, model_cfg, shuffle=False, shuffle_options=False,
                                  au_prompt="")
  builder = pipeline_lib.ExampleBuilder(pcfg, tok, qtok, strict=False)
  scorer = eval_lib.Scorer(model, max_new_tokens=int(ae.max_new_tokens), eos_id=tok.eos_id,
                           pad_id=tok.pad_id)
  skips = SkipCounter(strict=bool(config.data.get("strict", False)))
  rng = np.random.default_rng(int(ae.get("seed", 0)))
  root = task_lib.data_root(config, workdir)
  emo_recs = [r for r in task_lib.load_split(ae.emotion, root, skips,
                                             ae.emotion.get("split", "test"),
                                             ae.emotion.get("fold")) if r.label is not None]
  au_root = au_train.ensure_au_data(config, workdir)
  au_recs = au_train.records(config, au_root, "test", int(config.au.folds[0]), skips)
  n = int(ae.get("max_examples", 0))
  if n > 0:
    emo_recs, au_recs = emo_recs[:n], au_recs[:n]
  items = {**emotion_items(emo_recs, rng), **au_items(au_recs, rng)}
  aus = au_lib.dataset_aus(config.au.data.name)
  report: dict[str, Any] = {"step": step, "tasks": {}, "answers": {}}
  for task in TASKS:
    its = items.get(task) or []
    if not its:
      continue
    kept, answers, _ = eval_lib.generate_texts(scorer, builder, tok, [p for p, _ in its], skips,
                                               int(config.eval.batch_size),
                                               pcfg.bucket_lengths)
    truths = [its[i][1] for i in kept]
    report["tasks"][task] = score(task, truths, answers, aus)
    report["answers"][task] = [{"id": its[i][0].id, "answer": a} for i, a in zip(kept, answers)]
    logging.info("affect eval %s: %s", task, report["tasks"][task])
  report["skipped"] = skips.counts
  out = paths.join(workdir, "eval")
  if jax.process_index() == 0:
    paths.makedirs(out)
    paths.write_text(paths.join(out, "affect_report.json"),
                     json.dumps(report, indent=1, default=float))
    paths.write_text(paths.join(out, "affect_report.md"), markdown(report))
  return {"tasks": report["tasks"], "report": paths.join(out, "affect_report.json")}
