"""Post-training of EMO-LLaMA after supervised fine-tuning: DPO (preference pairs, e.g.
ambiguity-aware ones) and GRPO with verifiable rewards, on images and videos.

  logps.py    per-token log-probs of several answers that share one media encoding
  dpo.py      the DPO / IPO loss and the DPO loss function of the train step
  grpo.py     group advantages, the GRPO / Dr.GRPO loss, rollout with the KV-cache sampler
  rewards.py  reward functions fn(prompts, completions, **fields) -> [B*G]
  data.py     preference JSONL reader, ambiguity-aware pair builder, pair batches
  reference.py  the reference model: LoRA switched off, or a frozen copy of the trainables
  runner.py   the DPO / GRPO jobs (`python -m emo_jax.main --mode=dpo|grpo`)
"""
