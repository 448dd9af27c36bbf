"""A hyper-parameter sweep over the tiny default: learning rate x LoRA rank.

    python -m launch.sweep --config=configs/sweep.py ...   (one run per point, own workdir)

`get_config(arg)` is the base config (configs/default.py with LoRA on the LLM, so the
rank matters); `get_hyper(h)` returns the sweep as a product of `h.sweep` lists over
dotted config keys (the `ml_collections` / big_vision convention).
"""
import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = default.get_config(arg)
  c.model.trainable = ("vision", "qformer", "projectors", "face", "lora")
  c.model.lora_rank = 8
  c.model.lora_alpha = 16.0
  return c


def get_hyper(h):
  """h: a hyper module with `product` and `sweep` (e.g. launch.sweep's)."""
  return h.product([
      h.sweep("config.optimizer.lr", [1e-3, 2e-3, 4e-3]),
      h.sweep("config.model.lora_rank", [4, 16]),
  ])
