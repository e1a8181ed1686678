"""Evaluation runner: compose model + reducer + benchmark, run lmms-eval, write the result file."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tokenprune.config import choices
from tokenprune.results import read_result, result_name, run_info, write_result, write_samples

log = logging.getLogger(__name__)


@dataclass
class Benchmark:
    """A set of lmms-eval tasks and how to run them.

    Attributes:
        tasks: lmms-eval task (or group) names.
        include_path: folder of extra task YAMLs (ours, e.g. the bundled smoke tasks), or None.
        limit: evaluate only the first `limit` documents of each task (None: all).
        batch_size: requests generated together (per-sample visual token counts are kept).
        gen_kwargs: lmms-eval generation overrides, e.g. "max_new_tokens=16" (None: the tasks' own).
    """

    tasks: list[str]
    include_path: str | None = None
    limit: int | None = None
    batch_size: int = 1
    gen_kwargs: str | None = None
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


def evaluate(adapter: Any, benchmark: Benchmark, seed: int = 0) -> dict[str, Any]:
    """Run the benchmark's tasks through lmms-eval with our model object.

    Returns:
        {"metrics": {"bench/<task>/<metric>": value}, "samples": per-request records,
         "failures": [...], "efficiency": {...}}
    """
    os.environ.setdefault(
        "HF_HOME", str(Path.home() / ".cache" / "huggingface")
    )  # some tasks read it at import
    os.environ.setdefault("LOGURU_LEVEL", "INFO")  # lmms-eval's task indexing logs thousands of DEBUG lines
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from tokenprune.eval.lmms_model import TokenPruneLMM

    if not benchmark.tasks:
        raise ValueError("the benchmark lists no tasks: set benchmark.tasks=[...] (lmms-eval task names)")
    if benchmark.include_path is not None and not Path(benchmark.include_path).is_dir():
        raise FileNotFoundError(
            f"benchmark.include_path {benchmark.include_path} is not a folder of task YAMLs"
        )
    task_manager = TaskManager(include_path=benchmark.include_path)
    unknown = [t for t in benchmark.tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lmms-eval task(s) {unknown}; check the names (lmms-eval --tasks list) or include_path"
        )
    lm = TokenPruneLMM(adapter=adapter, batch_size=benchmark.batch_size)
    tasks = [
        {"task": t, **benchmark.task_overrides[t]} if t in benchmark.task_overrides else t
        for t in benchmark.tasks
    ]
    output = simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=benchmark.limit,
        batch_size=benchmark.batch_size,
        gen_kwargs=benchmark.gen_kwargs,
        bootstrap_iters=0,
        log_samples=False,
        task_manager=task_manager,
        # process_with_media=False: lmms-eval scores from the docs without decoding images again, so a
        # corrupt image fails its sample (recorded by our model) instead of the whole run.
        cli_args=argparse.Namespace(process_with_media=False, output_path=None),
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if output is None:  # non-zero ranks
        return {}
    failures = [r for r in lm.records if "failed" in r]
    answered = [r for r in lm.records if "failed" not in r]
    kept = [r["visual_tokens"] for r in answered]
    return {
        "metrics": flatten_metrics(output["results"]),
        "samples": lm.records,
        "failures": failures,
        "efficiency": {
            "visual_tokens_mean": sum(kept) / len(kept) if kept else None,
            "visual_tokens_min": min(kept) if kept else None,
            "visual_tokens_max": max(kept) if kept else None,
            "samples": len(lm.records),
            "failed_samples": len(failures),
        },
    }


def flatten_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lmms-eval's {task: {"metric,filter": value}} -> {"bench/<task>/<metric>": value} (numbers only)."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            flat[f"bench/{task}/{name}"] = float(value)
    return flat


def run(
    cfg: DictConfig, train_metrics: dict[str, float] | None = None, adapter: Any = None
) -> dict[str, Any]:
    """Evaluate the composed config and write its result file; returns the result.

    A finished result with the same deterministic name is returned as it is (set run.overwrite=true
    to evaluate again), so a rerun sweep skips what is done.
    """
    from hydra.utils import instantiate

    picked = choices()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    name = result_name(resolved, picked)
    path = Path(cfg.paths.results) / f"{name}.json"
    if path.exists() and not cfg.run.overwrite:
        log.info("result exists, skipping (run.overwrite=true to redo): %s", path)
        return read_result(path)
    started = datetime.now(timezone.utc)
    if adapter is None:
        adapter = instantiate(cfg.model, reducer=instantiate(cfg.reducer))
    benchmark = instantiate(cfg.benchmark)
    outcome = evaluate(adapter, benchmark, seed=cfg.seed)
    samples_file = path.with_suffix(".samples.jsonl")
    write_samples(samples_file, outcome["samples"])
    info = run_info(started, device=str(adapter.device))
    efficiency = {**outcome["efficiency"], "wall_time_s": info["wall_time_s"]}
    result = {
        "name": name,
        "run": info,
        "choices": picked,
        "config": resolved,
        "metrics": {**(train_metrics or {}), **outcome["metrics"]},
        "efficiency": efficiency,
        "failures": outcome["failures"],
        "samples_file": samples_file.name,
    }
    write_result(path, result)
    log.info("wrote %s", path)
    print(summary(result))
    return result


def summary(result: dict[str, Any]) -> str:
    """A short human-readable table of a result."""
    eff = result["efficiency"]
    lines = [
        f"result {result['name']}",
        f"  visual tokens kept: mean {eff['visual_tokens_mean']} "
        f"(min {eff['visual_tokens_min']}, max {eff['visual_tokens_max']}); "
        f"samples {eff['samples']}, failed {eff['failed_samples']}; {eff['wall_time_s']} s",
    ]
    lines += [f"  {key:<48} {value:.4f}" for key, value in sorted(result["metrics"].items())]
    return "\n".join(lines)
