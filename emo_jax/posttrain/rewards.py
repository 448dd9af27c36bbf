"""Verifiable rewards for GRPO: plain functions `fn(prompts, completions, **fields) -> [B*G]`.

`prompts` and `completions` are lists of B*G strings (each prompt repeated for its G
completions); `fields` carry per-row record fields, here `answer` (the label word),
`options` (the class words offered in the question) and `label_index` (index into
`options`). A function ignores the fields it does not need (`**_`), so users add their own
and list them by name in `config.grpo.rewards` (after `register`).

  accuracy            1 if the answer (the `<answer>...</answer>` part when present) names
                      the label: the evaluator's parser (train.metrics.parse_answer), so a
                      reward of 1 is what evaluation counts as correct;
  format              1 if the completion is `<think>...</think><answer>...</answer>`
                      (R1-style), else 0;
  balanced_accuracy   accuracy weighted by N / (C n_c) for the label's class c (n_c its
                      training frequency, N = sum n_c, C classes): on average 1 over the
                      training distribution, larger for rarer classes (UAR weighs every class
                      alike).
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import numpy as np

from emo_jax.train import metrics as metrics_lib
from input_pipeline import labels as labels_lib

RewardFn = Callable[..., Sequence[float]]

FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def answer_text(completion: str) -> str:
  """The `<answer>` part of a completion, or the whole completion when it has none."""
  m = ANSWER_RE.search(completion)
  return m.group(1) if m else completion


def accuracy(prompts, completions, *, options, label_index, **_) -> list[float]:
  del prompts
  return [float(metrics_lib.parse_answer(answer_text(c), opts) == int(li))
          for c, opts, li in zip(completions, options, label_index)]


def format_reward(prompts, completions, **_) -> list[float]:
  del prompts
  return [float(bool(FORMAT_RE.match(c))) for c in completions]


def class_weights(class_counts: Mapping[str, int]) -> dict[str, float]:
  """{canonical class: N / (C n_c)} for the classes present."""
  counts = {labels_lib.canonical(k) or k.strip().lower(): int(v)
            for k, v in class_counts.items() if v > 0}
  total, c = sum(counts.values()), len(counts)
  return {k: total / (c * v) for k, v in counts.items()}


def balanced_accuracy(class_counts: Mapping[str, int]) -> RewardFn:
  """The class-balanced accuracy reward for training class frequencies `class_counts`."""
  weights = class_weights(class_counts)

  def fn(prompts, completions, *, options, label_index, answer, **_) -> list[float]:
    acc = accuracy(prompts, completions, options=options, label_index=label_index)
    out = []
    for a, word in zip(acc, answer):
      key = labels_lib.canonical(word) or word.strip().lower()
      if key not in weights:
        raise ValueError(f"class {word!r} has no training frequency (known: {sorted(weights)})")
      out.append(a * weights[key])
    return out
  fn.__name__ = "balanced_accuracy"
  return fn


REGISTRY: dict[str, Callable[..., RewardFn]] = {
  "accuracy": lambda **_: accuracy,
  "format": lambda **_: format_reward,
  "balanced_accuracy": lambda class_counts, **_: balanced_accuracy(class_counts),
}


def register(name: str, factory: Callable[..., RewardFn]) -> None:
  """Adds a reward: `factory(class_counts=...) -> fn` (factories ignore what they don't use)."""
  REGISTRY[name] = factory


def build(names: Sequence[str], *, class_counts: Mapping[str, int]) -> list[RewardFn]:
  unknown = [n for n in names if n not in REGISTRY]
  if unknown:
    raise ValueError(f"unknown rewards {unknown}; known: {sorted(REGISTRY)}")
  return [REGISTRY[n](class_counts=class_counts) for n in names]


def total_rewards(fns: Sequence[RewardFn], weights: Sequence[float] | None, prompts,
                  completions, **fields) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(weighted sum [B*G], {name: reward [B*G]})."""
  weights = [1.0] * len(fns) if not weights else list(weights)
  if len(weights) != len(fns):
    raise ValueError(f"{len(weights)} reward weights for {len(fns)} rewards")
  per = {}
  total = np.zeros(len(completions), np.float64)
  for fn, w in zip(fns, weights):
    r = np.asarray(fn(prompts, completions, **fields), np.float64)
    if r.shape != (len(completions),):
      raise ValueError(f"reward {fn.__name__} returned shape {r.shape}, expected "
                       f"({len(completions)},)")
    per[fn.__name__] = r
    total += w * r
  return total, per
