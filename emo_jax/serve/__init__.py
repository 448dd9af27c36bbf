"""Serving: an OpenAI-compatible HTTP API with batched generation, and a demo page.

    python -m emo_jax.serve --config=configs/default.py --workdir=./workdir
"""
