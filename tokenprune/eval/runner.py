"""Evaluation runner: compose model + reducer + benchmark, run lmms-eval, write the result file.

One run = one `simple_evaluate` over all the benchmark's tasks (lmms-eval hands every request to
the model at once, so batches span tasks with the same generation settings), plus a second pass
with the unreduced model when `compare_to_full` is set. Per-sample records are appended to
`<name>.samples.jsonl` as batches finish (`tokenprune.eval.records`), so a killed run resumes
where it stopped; the result JSON is written atomically at the end. Under torchrun each rank
answers its shard and rank 0 gathers the records and writes the files.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tokenprune.config import choices
from tokenprune.eval.bootstrap import doc_scores, paired_intervals, score_intervals
from tokenprune.results import (
    config_hash,
    efficiency,
    efficiency_block,
    finished,
    result_name,
    run_info,
    run_lock,
    write_result,
)

log = logging.getLogger(__name__)
PROMPT_SETS = ("lmms_eval", "llava15")


@dataclass
class Benchmark:
    """A set of lmms-eval tasks and how to run them.

    Attributes:
        tasks: lmms-eval task (or group) names; groups are expanded to their tasks.
        include_path: folder of extra task YAMLs (ours, e.g. the bundled smoke tasks), or None.
        limit: evaluate only the first `limit` documents of each task (None: all).
        batch_size: requests generated together (per-sample visual token counts are kept).
        gen_kwargs: lmms-eval generation overrides for every task, e.g. "max_new_tokens=16" (None: the tasks' own).
        task_overrides: per task, lmms-eval config keys to change (e.g. test_split, generation_kwargs);
            dict values are merged over the task's own, "!function mod.attr" strings are imported.
        prompt: "lmms_eval" (the tasks' own prompts) or "llava15" (LLaVA-1.5's eval prompts where
            they differ: tokenprune/eval/prompts.py).
        data_root: folder of local dataset copies, `<data_root>/<dataset id>` (else the HF cache).
        video_frames: frames sampled uniformly from each video (each frame is one image).
        aggregates: derived metrics, name -> {metrics: [...], tasks: [...]}: `bench/<name>/<metric>` =
            the mean of `bench/<task>/<metric>` over the tasks (e.g. POPE's F1 over its three splits).
        compare_to_full: also run the unreduced model (reducer none) and report % of its score per
            metric and answer agreement per task.
        compare_batch_size: also answer with the same (reduced) model at this batch size and report
            `batch_agreement/<task>`, the fraction of identical answers, e.g. 1 for a batch-8 run or 8
            for a paper row run at batch 1: whether batching changed any answer (None: off).
        api_judge: allow tasks that call a network judge (ActivityNet-QA's GPT scoring).
        warmup: untimed warm-up generations before the first timed batch.
    """

    tasks: list[str]
    include_path: str | None = None
    limit: int | None = None
    batch_size: int = 1
    gen_kwargs: str | None = None
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    prompt: str = "lmms_eval"
    data_root: str | None = None
    video_frames: int = 8
    aggregates: dict[str, dict[str, Any]] = field(default_factory=dict)
    compare_to_full: bool = False
    compare_batch_size: int | None = None
    api_judge: bool = False
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.compare_batch_size is not None and self.compare_batch_size < 1:
            raise ValueError(
                f"benchmark.compare_batch_size must be >= 1 or null, got {self.compare_batch_size}"
            )
        # Hydra passes DictConfig / ListConfig for container fields: keep plain Python containers
        for name in ("tasks", "task_overrides", "aggregates"):
            value = getattr(self, name)
            if OmegaConf.is_config(value):
                setattr(self, name, OmegaConf.to_container(value, resolve=True))


def _environment() -> None:
    """HF_HOME set (some lmms-eval tasks read it at import) and lmms-eval's loguru output at INFO.

    loguru starts at DEBUG, and lmms-eval's task indexing logs thousands of DEBUG lines; the level
    follows LOGURU_LEVEL when the user sets it.
    """
    import sys

    from loguru import logger

    os.environ.setdefault("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("LOGURU_LEVEL", "INFO"))


_TASK_MANAGERS: dict[str | None, Any] = {}  # indexing lmms-eval's tasks takes seconds: once per folder


def task_manager_for(benchmark: Benchmark) -> Any:
    """lmms-eval's TaskManager with the benchmark's include_path (built once per process and folder)."""
    from lmms_eval.tasks import TaskManager

    _environment()
    if benchmark.include_path is not None and not Path(benchmark.include_path).is_dir():
        raise FileNotFoundError(
            f"benchmark.include_path {benchmark.include_path} is not a folder of task YAMLs"
        )
    if benchmark.include_path not in _TASK_MANAGERS:
        _TASK_MANAGERS[benchmark.include_path] = TaskManager(include_path=benchmark.include_path)
    return _TASK_MANAGERS[benchmark.include_path]


def resolve_tasks(
    benchmark: Benchmark, task_manager: Any
) -> tuple[list[str | dict[str, Any]], dict[str, Any]]:
    """The lmms-eval task list (names, or override dicts) and, per task, where its data is.

    Raises before anything runs: unknown task, API-judged task without `api_judge`, unknown prompt
    set, dataset neither local nor cached (`tokenprune.eval.data.DatasetNotFound`).
    """
    from tokenprune.eval import data
    from tokenprune.eval.prompts import PROMPTS

    if not benchmark.tasks:
        raise ValueError("the benchmark lists no tasks: set benchmark.tasks=[...] (lmms-eval task names)")
    if benchmark.prompt not in PROMPTS:
        raise ValueError(f"benchmark.prompt must be one of {sorted(PROMPTS)}, got {benchmark.prompt!r}")
    unknown = [t for t in benchmark.tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lmms-eval task(s) {unknown}; check the names (lmms-eval --tasks list) or include_path"
        )
    specs: list[str | dict[str, Any]] = []
    where: dict[str, Any] = {}
    for task in _expand(benchmark.tasks, task_manager):
        if task in data.API_TASKS and not benchmark.api_judge:
            raise ValueError(
                f"task {task!r} is scored by {data.API_TASKS[task]}; set benchmark.api_judge=true to run it"
            )
        config = data.task_yaml(task_manager, task)
        located, where[task] = data.locate(task, config, benchmark.data_root)
        override = data.build_override(
            config,
            PROMPTS[benchmark.prompt].get(task, {}),
            benchmark.task_overrides.get(task, {}),
            located,
        )
        specs.append({"task": task, **data.resolve_functions(override)} if override else task)
    return specs, where


def _expand(names: list[str], task_manager: Any) -> list[str]:
    out: list[str] = []
    for name in names:
        if task_manager._name_is_group(name) or task_manager._name_is_tag(name):
            out += _expand([t for t in task_manager._get_tasklist(name) if isinstance(t, str)], task_manager)
        elif name not in out:
            out.append(name)
    return out


def evaluate(
    adapter: Any,
    benchmark: Benchmark,
    seed: int = 0,
    samples_path: str | os.PathLike | None = None,
    artifacts_dir: str | os.PathLike | None = None,
    task_manager: Any = None,
) -> dict[str, Any]:
    """Run the benchmark's tasks through lmms-eval with our model object.

    Args:
        samples_path: JSONL of per-sample records, appended per batch and reused on a rerun (resume);
            None keeps records in memory only.
        artifacts_dir: where tasks write submission files (VQAv2 test-dev, TextVQA, MMBench); None: a
            temporary folder, discarded.
        task_manager: a lmms-eval TaskManager to reuse (indexing the built-in tasks takes seconds).

    Returns:
        {"metrics": {"bench/<task>/<metric>": value}, "samples": per-request records,
         "failures": [...], "efficiency": {<the meter's figures, without eff/>}, "tasks": {task: data info},
         "bootstrap": {metric key: 95% interval}, "doc_scores": {metric key: {doc_id: score}}}
        on rank 0; {} on other ranks.
    """
    from tokenprune.eval import meter

    if not benchmark.tasks:
        raise ValueError("the benchmark lists no tasks: set benchmark.tasks=[...] (lmms-eval task names)")
    task_manager = task_manager or task_manager_for(benchmark)
    specs, where = resolve_tasks(benchmark, task_manager)
    meter.reset_peak_memory(adapter.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokenprune-files-") as scratch:  # submissions nobody asked for
        output, records = _pass(
            adapter, benchmark, specs, task_manager, seed, samples_path, artifacts_dir or scratch
        )
    eval_s = time.perf_counter() - started
    if output is None:  # non-zero ranks
        return {}
    figures = {
        **meter.summarize(records, adapter),
        **meter.peak_memory(adapter.device),
        "eff/eval_wall_s": eval_s,
    }
    metrics = flatten_metrics(output["results"])
    metrics.update(aggregate_metrics(metrics, benchmark.aggregates))
    scores = doc_scores(output.get("samples") or {})
    outcome = {
        "metrics": metrics,
        "samples": records,
        "failures": [r for r in records if "failed" in r],
        "efficiency": efficiency_block(figures),
        "tasks": where,
        "coverage": coverage(output),
        "bootstrap": score_intervals(scores, seed),
        "doc_scores": scores,
    }
    if benchmark.compare_to_full:
        outcome.update(_compare_to_full(adapter, benchmark, specs, task_manager, seed, samples_path, outcome))
    if benchmark.compare_batch_size is not None:
        outcome.update(_compare_batch(adapter, benchmark, specs, task_manager, seed, samples_path, outcome))
    return outcome


def _pass(
    adapter: Any,
    benchmark: Benchmark,
    specs: list,
    task_manager: Any,
    seed: int,
    samples_path: str | os.PathLike | None,
    artifacts_dir: str | os.PathLike | None,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """One simple_evaluate; returns lmms-eval's output and the run's records (rank 0), or (None, [])."""
    import copy

    from lmms_eval.evaluator import simple_evaluate

    from tokenprune.eval.lmms_model import TokenPruneLMM
    from tokenprune.eval.records import SampleStore, dedupe, record_key

    lm = TokenPruneLMM(
        adapter=adapter,
        batch_size=benchmark.batch_size,
        video_frames=benchmark.video_frames,
        warmup=benchmark.warmup,
    )
    if samples_path is not None:
        lm.store = SampleStore(samples_path, rank=lm.rank, world_size=lm.world_size)
        lm.done = lm.store.load()
    output = simple_evaluate(
        model=lm,
        tasks=copy.deepcopy(specs),  # lmms-eval pops keys from dataset_kwargs while loading
        limit=benchmark.limit,
        batch_size=benchmark.batch_size,
        gen_kwargs=benchmark.gen_kwargs,
        bootstrap_iters=0,
        log_samples=True,  # per-document scores for the bootstrap intervals (tokenprune.eval.bootstrap)
        task_manager=task_manager,
        # process_with_media=False: lmms-eval scores from the docs without decoding images again, so a
        # corrupt image fails its sample (recorded by our model) instead of the whole run.
        cli_args=argparse.Namespace(
            process_with_media=False, output_path=None if artifacts_dir is None else str(artifacts_dir)
        ),
        distributed_executor_backend="torchrun",
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    records = _gather(lm.records, lm.world_size)
    if lm.rank != 0:
        return None, []
    records = sorted(dedupe(records).values(), key=record_key)
    if lm.store is not None:
        lm.store.finalize(records)
    return output, records


def coverage(output: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per task, the documents evaluated and the task's size (fewer with `benchmark.limit`)."""
    return {
        task: {"evaluated": int(n["effective"]), "size": int(n["original"])}
        for task, n in sorted((output.get("n-samples") or {}).items())
    }


def _gather(records: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    if world_size <= 1:
        return records
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, records)
    return [r for part in gathered for r in part]


def _compare_to_full(
    adapter: Any,
    benchmark: Benchmark,
    specs: list,
    task_manager: Any,
    seed: int,
    samples_path: str | os.PathLike | None,
    reduced: dict[str, Any],
) -> dict[str, Any]:
    """The same tasks with the unreduced model: its metrics, % of them reached, answer agreement."""
    from tokenprune.reducers.baselines import NoReduction

    full_path = None if samples_path is None else Path(samples_path).with_suffix(".full.jsonl")
    reducer = adapter.reducer
    adapter.reducer = NoReduction()
    try:
        with tempfile.TemporaryDirectory(prefix="tokenprune-files-") as scratch:
            output, records = _pass(adapter, benchmark, specs, task_manager, seed, full_path, scratch)
    finally:
        adapter.reducer = reducer
    if output is None:
        return {}
    full = flatten_metrics(output["results"])
    full.update(aggregate_metrics(full, benchmark.aggregates))
    metrics = dict(reduced["metrics"])
    metrics.update({"full/" + k.removeprefix("bench/"): v for k, v in full.items()})
    for key, value in reduced["metrics"].items():
        if full.get(key):
            metrics["pct_of_full/" + key.removeprefix("bench/")] = 100.0 * value / full[key]
    metrics.update(answer_agreement(reduced["samples"], records))
    paired = paired_intervals(reduced["doc_scores"], doc_scores(output.get("samples") or {}), seed)
    return {"metrics": metrics, "full_samples": records, "paired_vs_full": paired}


def batch_samples_path(samples_path: str | os.PathLike, batch_size: int) -> Path:
    """Where the records of the `compare_batch_size` pass go, beside the run's own."""
    return Path(samples_path).with_suffix(f".batch{batch_size}.jsonl")


def _compare_batch(
    adapter: Any,
    benchmark: Benchmark,
    specs: list,
    task_manager: Any,
    seed: int,
    samples_path: str | os.PathLike | None,
    reduced: dict[str, Any],
) -> dict[str, Any]:
    """The same model and tasks at `benchmark.compare_batch_size`: per task, the share of identical answers."""
    import dataclasses

    size = int(benchmark.compare_batch_size)
    other = dataclasses.replace(benchmark, batch_size=size, compare_to_full=False, compare_batch_size=None)
    path = None if samples_path is None else batch_samples_path(samples_path, size)
    with tempfile.TemporaryDirectory(prefix="tokenprune-files-") as scratch:
        output, records = _pass(adapter, other, specs, task_manager, seed, path, scratch)
    if output is None:
        return {}
    agreement = answer_agreement(reduced["samples"], records)
    metrics = dict(reduced["metrics"])
    metrics.update({"batch_agreement/" + k.removeprefix("agreement/"): v for k, v in agreement.items()})
    metrics["batch_agreement/batch_size"] = float(size)
    return {"metrics": metrics, "batch_samples": records}


def answer_agreement(reduced: list[dict[str, Any]], full: list[dict[str, Any]]) -> dict[str, float]:
    """Per task, the fraction of samples (answered by both) whose answers are identical."""
    full_answers = {(r["task"], r["doc_id"]): r["answer"] for r in full if "failed" not in r}
    per_task: dict[str, list[bool]] = {}
    for r in reduced:
        key = (r["task"], r["doc_id"])
        if "failed" not in r and key in full_answers:
            per_task.setdefault(r["task"], []).append(r["answer"].strip() == full_answers[key].strip())
    return {f"agreement/{task}": sum(same) / len(same) for task, same in per_task.items()}


def aggregate_metrics(metrics: dict[str, float], aggregates: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`bench/<name>/<metric>` = mean of `bench/<task>/<metric>` over the aggregate's tasks, for each
    of its `metrics`, when every task has it (e.g. POPE's F1 averaged over its three splits)."""
    out = {}
    for name, spec in aggregates.items():
        for metric in spec["metrics"]:
            keys = [f"bench/{task}/{metric}" for task in spec["tasks"]]
            if keys and all(k in metrics for k in keys):
                out[f"bench/{name}/{metric}"] = sum(metrics[k] for k in keys) / len(keys)
    return out


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

    A finished result of the same resolved config (its `config_hash`) is returned as it is (set
    force=true to evaluate again), so a rerun sweep skips what is done; an unfinished one resumes from
    its per-sample records. A result under the same explicit `run.name` from another config is redone.
    """
    picked = choices()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    name, digest = result_name(cfg, picked), config_hash(cfg)
    path = Path(cfg.paths.results) / f"{name}.json"
    force = bool(cfg.get("force"))
    if not force and (done := finished(path, digest)) is not None:
        log.info("result exists, skipping (force=true to redo): %s", path)
        print(summary(done))
        return done
    from tokenprune.eval import preflight

    task_manager = preflight.check(cfg) if adapter is None else preflight.check_data(cfg)
    with run_lock(path):
        return _evaluate_and_write(cfg, name, digest, picked, resolved, train_metrics, adapter, task_manager)


def _evaluate_and_write(
    cfg: DictConfig,
    name: str,
    digest: str,
    picked: dict[str, str],
    resolved: Any,
    train_metrics: dict[str, float] | None,
    adapter: Any,
    task_manager: Any,
) -> dict[str, Any]:
    """`run` after its checks, holding the result's lock: load the model, evaluate, write the files."""
    from hydra.utils import instantiate

    from tokenprune.eval.records import SampleStore

    path = Path(cfg.paths.results) / f"{name}.json"
    force = bool(cfg.get("force"))
    stale = path.exists()  # forced, or another config under the same run.name: its records don't apply
    samples_file = path.with_suffix(".samples.jsonl")
    if (force or stale) and int(os.environ.get("RANK", "0")) == 0:
        SampleStore(samples_file).clear()
        SampleStore(samples_file.with_suffix(".full.jsonl")).clear()
        if cfg.benchmark.get("compare_batch_size"):
            SampleStore(batch_samples_path(samples_file, int(cfg.benchmark.compare_batch_size))).clear()
    started = datetime.now(timezone.utc)
    if adapter is None:
        overrides = {}
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "device" in cfg.model:
            import torch

            if torch.cuda.is_available():
                overrides["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        adapter = instantiate(cfg.model, reducer=instantiate(cfg.reducer), **overrides)
        if cfg.get("train") and cfg.train.get("adapter"):  # a saved stage: train=lora train.adapter=PATH
            from tokenprune.stages import load_trained

            adapter = load_trained(adapter, cfg.train.adapter)
    benchmark = instantiate(cfg.benchmark)
    artifacts = path.with_suffix(".files")
    outcome = evaluate(
        adapter,
        benchmark,
        seed=cfg.seed,
        samples_path=samples_file,
        artifacts_dir=artifacts,
        task_manager=task_manager,
    )
    if not outcome:  # non-zero rank: rank 0 writes the files
        return {}
    info = run_info(started, device=str(adapter.device))
    figures = {**outcome["efficiency"], "wall_time_s": info["wall_time_s"]}
    result = {
        "name": name,
        "config_hash": digest,
        "run": info,
        "choices": picked,
        "config": resolved,
        "metrics": {**(train_metrics or {}), **outcome["metrics"]},
        "efficiency": figures,
        "tasks": outcome["tasks"],
        "coverage": outcome["coverage"],
        "partial": any(c["evaluated"] < c["size"] for c in outcome["coverage"].values()),
        "failures": outcome["failures"],
        "samples_file": samples_file.name,
    }
    result["bootstrap"] = outcome["bootstrap"]
    if "paired_vs_full" in outcome:
        result["paired_vs_full"] = outcome["paired_vs_full"]
    if "full_samples" in outcome:
        result["full_samples_file"] = samples_file.with_suffix(".full.jsonl").name
    if "batch_samples" in outcome:
        result["batch_samples_file"] = batch_samples_path(samples_file, benchmark.compare_batch_size).name
    if artifacts.is_dir():
        result["artifacts"] = artifacts.name
    write_result(path, result)
    log.info("wrote %s", path)
    print(summary(result))
    return result


def summary(result: dict[str, Any]) -> str:
    """A short human-readable table of a result."""
    eff = efficiency(result)
    lines = [
        f"result {result.get('name')}",
        f"  visual tokens kept: mean {eff.get('visual_tokens_mean')} "
        f"(min {eff.get('visual_tokens_min')}, max {eff.get('visual_tokens_max')}); "
        f"samples {eff.get('samples')}, failed {eff.get('failed_samples')}; {eff.get('wall_time_s')} s",
    ]
    if result.get("partial"):
        parts = ", ".join(f"{t} {c['evaluated']}/{c['size']}" for t, c in result["coverage"].items())
        lines.append(f"  PARTIAL (benchmark.limit): {parts} documents; tables mark it with *")
    for key in ("flops_prefill_mean", "prefill_flops_ratio", "ttft_ms_mean", "samples_per_s"):
        if eff.get(key) is not None:
            lines.append(f"  {'efficiency/' + key:<48} {eff[key]:.4g}")
    metrics = result.get("metrics") or {}
    if any(key.startswith("full/") for key in metrics):  # compare_to_full: reduced | unreduced | %
        lines.append(f"  {'metric':<48} {'reduced':>8} {'full':>8} {'% full':>7}")
        for key, value in sorted(metrics.items()):
            if key.startswith("bench/"):
                full = metrics.get("full/" + key.removeprefix("bench/"))
                pct = metrics.get("pct_of_full/" + key.removeprefix("bench/"))
                lines.append(f"  {key:<48} {value:8.4f} {_or_dash(full, '8.4f')} {_or_dash(pct, '7.1f')}")
        return "\n".join(lines)
    lines += [f"  {key:<48} {value:.4f}" for key, value in sorted(metrics.items())]
    return "\n".join(lines)


def _or_dash(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{value:{spec}}" if value is not None else "-".rjust(width)
