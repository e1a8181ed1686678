"""The main job: fit the configured training stage (if any), then evaluate and write the result."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit when `train` names a stage, then evaluate (tokenprune.eval.runner.run)."""
    from tokenprune.eval.runner import run as evaluate

    if cfg.get("train"):
        raise NotImplementedError(f"training stage {cfg.train} is not implemented yet; use train=none")
    return evaluate(cfg)
