"""Evaluation through lmms-eval: the model plugin, the runner and `python -m tokenprune.eval`."""
