"""Inference jobs that run a model over a dataset (e.g. the frozen face priors)."""
