"""Post-training configs: DPO and GRPO sections over the tiny default or the 7B paper model.

    # the embedded default: SFT first, then DPO / GRPO from its checkpoint
    python -m emo_jax.main --config=configs/default.py --workdir=./sft
    python -m emo_jax.main --config=configs/posttrain.py --workdir=./grpo --mode=grpo \\
        --config.grpo.init_workdir=./sft --config.data.root=./sft/data
    python -m emo_jax.main --config=configs/posttrain.py:7b --workdir=gs://.../dpo --mode=dpo \\
        --config.dpo.init_workdir=gs://.../sft --config.dpo.pairs=/data/pairs.jsonl ...

get_config(arg): a comma list; '7b' takes configs/emo_llama_7b.py as the base (its presets
'fsdp', 'fsdp_tp', 'dp', 'video' pass through), else configs/default.py (its 'video', 'test'
pass through). The base config is unchanged; `dpo` and `grpo` sections are added (names as
TRL / Tunix: beta, epsilon, num_generations, loss_type, ...). `lr_scale` multiplies every
peak learning rate of `optimizer` (the parameter groups, hence the optimizer state layout,
stay those of SFT, so a post-training workdir reads like an SFT one).
"""
import importlib.util
import os

import ml_collections

_HERE = os.path.dirname(os.path.abspath(__file__))


def _base(name: str, arg: str | None):
  spec = importlib.util.spec_from_file_location(f"_posttrain_base_{name}",
                                                os.path.join(_HERE, name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def dpo_section(**kw) -> ml_collections.ConfigDict:
  d = dict(
      init_workdir="",          # an SFT workdir: start from its latest checkpoint
      pairs="",                 # preference JSONL; '' -> ambiguity-aware pairs from data.train
      pairs_root="",            # media root of `pairs` ('' -> data.root)
      rejected_kinds=("near_miss", "several", "hedge"),
      pairs_per_record=1,
      beta=0.1, label_smoothing=0.0, loss_type="sigmoid",   # 'sigmoid' | 'ipo'
      rpo_alpha=None,           # weight of the chosen answers' NLL (None: plain DPO)
      reference="auto",         # 'auto' | 'lora_off' | 'copy' (emo_jax.posttrain.reference)
      batch_size=16,            # pairs per step (global)
      num_steps=300,
      lr_scale=1.0)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def grpo_section(**kw) -> ml_collections.ConfigDict:
  d = dict(
      init_workdir="",
      batch_size=4,             # prompts per step (global); B * num_generations rollouts
      num_generations=8,
      max_completion_length=4,
      temperature=1.0, top_k=0, top_p=1.0,
      rewards=("accuracy",),    # names in emo_jax.posttrain.rewards.REGISTRY
      reward_weights=(),        # () -> all 1
      scale_rewards=True,       # False: Dr.GRPO's unscaled advantages
      beta=0.04,                # KL to the reference (0: no reference pass)
      epsilon=0.2, epsilon_high=None,
      loss_type="bnpo",         # 'grpo' | 'bnpo' (token-level) | 'dr_grpo'
      num_iterations=1,         # updates per rollout batch
      reference="auto",
      num_steps=300,
      lr_scale=1.0)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = [a for a in (arg or "").split(",") if a]
  big = "7b" in opts
  rest = ",".join(a for a in opts if a != "7b") or None
  if big:
    c = _base("emo_llama_7b.py", rest)
    c.dpo = dpo_section(batch_size=64, num_steps=1000, lr_scale=0.025)
    c.grpo = grpo_section(batch_size=16, max_completion_length=256,
                          rewards=("accuracy", "format"), num_steps=1000, lr_scale=0.005)
  else:
    c = _base("default.py", rest)
    # From SFT stopped at 400 steps (benchmarks/posttrain_demo.py): these raise test UAR;
    # at lr_scale 0.02-0.05 for 150 steps neither moved it.
    c.dpo = dpo_section(lr_scale=0.25, rpo_alpha=1.0, num_steps=300)
    c.grpo = grpo_section(lr_scale=0.25, batch_size=16, rewards=("balanced_accuracy",),
                          num_steps=300)
    if rest and "test" in rest.split(","):
      c.dpo.update(dict(batch_size=4, num_steps=4))
      c.grpo.update(dict(batch_size=2, num_generations=4, num_steps=4))
  return c
