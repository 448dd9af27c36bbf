"""emo_jax: EMO-LLaMA (LLaMA-VID + Face Info Mining) in JAX / Flax NNX."""

__version__ = "0.1.0"
