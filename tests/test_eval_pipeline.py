"""End to end: the Hydra entry points and lmms-eval's own CLI on the bundled smoke tasks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tokenprune.config import PROJECT_ROOT

pytestmark = pytest.mark.integration
SMOKE = PROJECT_ROOT / "tokenprune" / "eval" / "tasks" / "smoke"


def run_module(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def only_result(folder: Path) -> dict:
    files = sorted(folder.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.mark.slow
def test_eval_entry_point_writes_result_and_rerun_skips(tiny_llava_path, tmp_path):
    args = [
        "tokenprune.eval",
        "model=tiny_llava",
        "reducer=random",
        "benchmark=smoke",
        f"model.path={tiny_llava_path}",
        f"paths.outputs={tmp_path}",
    ]
    run_module(*args)
    results = tmp_path / "results"
    result = only_result(results)
    assert result["name"].startswith("tiny_llava-random-smoke-none-")
    assert result["choices"] == {
        "model": "tiny_llava",
        "reducer": "random",
        "benchmark": "smoke",
        "train": "none",
    }
    assert result["config"]["reducer"]["keep"] == 144
    assert {
        "bench/tp_smoke_pope/pope_f1_score",
        "bench/tp_smoke_pope/pope_accuracy",
        "bench/tp_smoke_vqa/exact_match",
    } <= set(result["metrics"])
    eff = result["efficiency"]
    assert (eff["visual_tokens_mean"], eff["visual_tokens_min"], eff["visual_tokens_max"]) == (144, 144, 144)
    assert eff["samples"] == 16 and eff["failed_samples"] == 0 and eff["wall_time_s"] > 0
    assert result["run"]["versions"]["transformers"].startswith("5.")
    assert result["run"]["git"]["sha"] is None or len(result["run"]["git"]["sha"]) == 40
    samples = (results / result["samples_file"]).read_text().splitlines()
    assert len(samples) == 16 and all(json.loads(s)["visual_tokens"] == 144 for s in samples)

    before = (results / f"{result['name']}.json").stat().st_mtime_ns
    again = run_module(*args)
    assert "result exists, skipping" in again.stdout + again.stderr
    assert (results / f"{result['name']}.json").stat().st_mtime_ns == before


@pytest.mark.slow
def test_lmms_eval_cli_runs_model_tokenprune(tiny_llava_path, tmp_path):
    out = run_module(
        "lmms_eval",
        "--model",
        "tokenprune",
        "--model_args",
        f"model=tiny_llava,reducer=uniform,reducer.keep=64,model.path={tiny_llava_path}",
        "--tasks",
        "tp_smoke_pope",
        "--include_path",
        str(SMOKE),
        "--batch_size",
        "4",
        "--limit",
        "4",
        "--output_path",
        str(tmp_path),
    )
    assert "pope_f1_score" in out.stdout + out.stderr
    written = list(tmp_path.rglob("*results*.json"))
    assert written, f"lmms-eval wrote no results under {tmp_path}"
    assert "pope_f1_score,none" in json.loads(written[0].read_text())["results"]["tp_smoke_pope"]


def test_corrupt_image_is_a_counted_failure_and_the_run_goes_on(tiny_llava, tmp_path):
    from tokenprune.config import compose
    from tokenprune.eval.runner import run

    cfg = compose(
        [
            "benchmark.tasks=[tp_smoke_corrupt]",
            f"benchmark.include_path={PROJECT_ROOT / 'tests' / 'fixtures' / 'smoke_corrupt'}",
            f"paths.outputs={tmp_path}",
        ]
    )
    result = run(cfg, adapter=tiny_llava)
    assert result["efficiency"]["failed_samples"] == 1 and result["efficiency"]["samples"] == 3
    (failure,) = result["failures"]
    assert failure["task"] == "tp_smoke_corrupt" and "image" in failure["failed"].lower()
    assert "bench/tp_smoke_corrupt/pope_accuracy" in result["metrics"]


def test_unknown_task_and_empty_benchmark_are_clear_errors(tiny_llava):
    from tokenprune.eval.runner import Benchmark, evaluate

    with pytest.raises(ValueError, match="unknown lmms-eval task"):
        evaluate(tiny_llava, Benchmark(tasks=["no_such_task"], include_path=str(SMOKE)))
    with pytest.raises(ValueError, match="lists no tasks"):
        evaluate(tiny_llava, Benchmark(tasks=[]))


def test_model_object_survives_two_evaluations(tiny_llava):
    """lmms-eval calls lm.clean() after each run; ours keeps the model so the object is reusable."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from tokenprune.eval.lmms_model import TokenPruneLMM

    lm = TokenPruneLMM(adapter=tiny_llava, batch_size=4)
    manager = TaskManager(include_path=str(SMOKE))
    first = simple_evaluate(
        model=lm, tasks=["tp_smoke_pope"], limit=2, task_manager=manager, bootstrap_iters=0
    )
    second = simple_evaluate(
        model=lm, tasks=["tp_smoke_pope"], limit=2, task_manager=manager, bootstrap_iters=0
    )
    assert lm.adapter.model is tiny_llava.model
    assert first["results"]["tp_smoke_pope"] == second["results"]["tp_smoke_pope"]
    assert [r["answer"] for r in lm.records[:2]] == [r["answer"] for r in lm.records[2:]]


def test_summary_tables_reduced_beside_full_when_compared():
    from tokenprune.eval.runner import summary

    efficiency = {"visual_tokens_mean": 40.5, "visual_tokens_min": 12, "visual_tokens_max": 90}
    efficiency |= {"samples": 3, "failed_samples": 0, "wall_time_s": 1.0}
    metrics = {"bench/shapes_vqa/exact_match": 0.6, "full/shapes_vqa/exact_match": 0.8}
    metrics |= {"pct_of_full/shapes_vqa/exact_match": 75.0, "bench/shapes_mc/exact_match": 0.5}
    text = summary({"name": "r", "efficiency": efficiency, "metrics": metrics})
    assert "visual tokens kept: mean 40.5 (min 12, max 90)" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]}
    assert rows["metric"] == ["reduced", "full", "%", "full"]
    assert rows["bench/shapes_vqa/exact_match"] == ["0.6000", "0.8000", "75.0"]
    assert rows["bench/shapes_mc/exact_match"] == ["0.5000", "-", "-"]  # no unreduced number
    assert not any(key.startswith(("full/", "pct_of_full/")) for key in rows)  # folded into the columns
    plain = summary({"name": "r", "efficiency": efficiency, "metrics": {"bench/t/m": 0.25}})
    assert plain.splitlines()[-1].split() == ["bench/t/m", "0.2500"]
