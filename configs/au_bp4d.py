"""Action-unit detection on BP4D or DISFA with the AUFormer head on EMO-LLaMA's vision tower.

    python -m emo_jax.main --config=configs/au_bp4d.py:bp4d --workdir=/runs/au_bp4d --mode=au \\
        --config.au.data.root=/data/BP4D --config.init.vision=/ckpt/eva_vit_g.safetensors
    python -m emo_jax.main --config=configs/au_bp4d.py:disfa --workdir=/runs/au_disfa --mode=au \\
        --config.au.data.root=/data/DISFA --config.init.vision=/ckpt/eva_vit_g.safetensors

`--mode=au` trains and scores one head per fold (the standard 3 subject-exclusive folds;
docs/ACTION_UNITS.md) on the frozen vision tower: the workdir's trained EMO-LLaMA if it
has a checkpoint, else the `config.init` weights. `--mode=train` trains the LLM first, as
configs/emo_llama_7b.py, then the AU stage. Report: <workdir>/eval/au_report.{json,md}.

Paper facts (AUFormer, ECCV 2024): frozen ViT, one expert per AU in two expert groups per
block, per-AU chaining, deep supervision, an asymmetric loss with per-AU weights; about
66 mean F1 on BP4D and DISFA (secondary sources; the per-AU tables need the paper).
Unknown there and our choices here: the backbone (EMO-LLaMA's EVA-ViT-G/14 at 224 px, not
AUFormer's ViT-B/16), expert width 16, loss margin 0.05 / gamma- 2, learning rate 5e-4
with cosine decay, 8,000 steps at batch 64 per fold (about 10 epochs of a BP4D training
fold of ~97k frames), frames as extracted images ('frames'; extract videos once with
input_pipeline.au_data.extract_frames). The LLM sees no AU sentence by default
(`au.prompt`).

get_config(arg): 'bp4d' (default) or 'disfa'.
"""
import ml_collections

from configs import default
from configs import emo_llama_7b


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = arg or "bp4d"
  if name not in ("bp4d", "disfa"):
    raise ValueError(f"au_bp4d.py: arg must be 'bp4d' or 'disfa', got {name!r}")
  c = emo_llama_7b.get_config()
  a = c.au = ml_collections.ConfigDict(default.get_config().au.to_dict())
  a.enabled = True
  a.synthetic.generate = False
  a.data = dict(name=name, root="", options=dict(media="frames"))
  a.folds = (1, 2, 3)
  a.head.update(bottleneck=16, head_hidden=256)
  a.loss.update(margin=0.05, gamma_neg=2.0, gamma_pos=0.0)
  a.optimizer.update(lr=5e-4, warmup_frac=0.03, end_lr_frac=0.0, weight_decay=0.0)
  a.train.update(num_steps=8000, batch_size=64, aspect="pad", read_threads=8)
  a.eval_batch_size = 128
  a.affect_eval.enabled = False
  return c
