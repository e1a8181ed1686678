"""The main job: fit the configured training stage (if any), then evaluate and write the result."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tokenprune.config import choices
from tokenprune.results import config_hash, finished, location_free, result_name, run_lock

log = logging.getLogger(__name__)

# train.* keys that say how to run or where to write, not what is trained: not part of the stage's id.
_RUN_ONLY_KEYS = ("adapter", "resume", "output_dir", "logger")


def stage_dir(cfg: DictConfig) -> Path:
    """The training stage's folder: train.output_dir, or outputs/train/<model>-<reducer>-<train>-<hash>.

    The hash covers what is trained (model, reducer, train settings, seed), not the benchmark, so
    evaluating a trained stage on another benchmark reuses it, and a rerun resumes it.
    """
    if cfg.train.get("output_dir"):
        return Path(cfg.train.output_dir)
    resolved = location_free(cfg)
    train = {k: v for k, v in resolved["train"].items() if k not in _RUN_ONLY_KEYS}
    what = {
        "model": resolved["model"],
        "reducer": resolved["reducer"],
        "train": train,
        "seed": resolved["seed"],
    }
    picked = choices()
    name = "-".join([*(picked.get(g, "custom") for g in ("model", "reducer", "train")), config_hash(what)])
    return Path(cfg.paths.outputs) / "train" / name


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit when `train` names a stage (has a `_target_`), then evaluate (tokenprune.eval.runner.run).

    The result file holds the stage's `train/*` metrics beside `bench/*`. The evaluated model is
    loaded fresh and given the saved adapter (as a later `tokenprune.eval train.adapter=...` run
    would). After a DDP fit started by Lightning only rank 0 evaluates; the other ranks return {}.
    """
    from tokenprune.eval import preflight
    from tokenprune.eval.runner import run as evaluate
    from tokenprune.eval.runner import summary

    train = cfg.get("train")
    if not train or "_target_" not in train:
        return evaluate(cfg)
    if train.get("adapter"):
        log.info("train.adapter is set: evaluating %s without fitting", train.adapter)
        return evaluate(cfg)
    path = Path(cfg.paths.results) / f"{result_name(cfg, choices())}.json"
    if not cfg.get("force") and (done := finished(path, config_hash(cfg))) is not None:
        log.info("result exists, skipping fit and evaluation (force=true to redo): %s", path)
        print(summary(done))
        return done
    preflight.check(cfg)
    with run_lock(path):
        return _fit_and_evaluate(cfg)


def _fit_and_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Fit the stage (or find it fitted), then evaluate with its saved outputs (holding the run lock)."""
    from hydra.utils import instantiate

    from tokenprune.eval.runner import run as evaluate

    def build_adapter(dtype: str | None) -> Any:
        overrides = {"dtype": dtype} if dtype else {}
        return instantiate(cfg.model, reducer=instantiate(cfg.reducer), **overrides)

    stage = instantiate(cfg.train)
    outcome = stage.fit(build_adapter, stage_dir(cfg), seed=cfg.seed)
    if not outcome.evaluates:  # another rank, or stopped early (a rerun resumes)
        return {}
    adapter = stage.load_trained(build_adapter(None), outcome.adapter_dir)
    return evaluate(cfg, train_metrics=outcome.metrics, adapter=adapter)
