"""A new user's first hour (issue #21): partial results marked in tables, `make run` talks while it
fits, shows its result when it finds it done and lands in the miniature's table, the benchmarks run,
caches stay under outputs/, the README's examples show what they claim."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tokenprune.config import PROJECT_ROOT, choices, compose
from tokenprune.results import config_hash, result_name, write_result
from tokenprune.tables import build_table, load_published, render_markdown
from tokenprune.tables.__main__ import experiment_spec

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}


def fake_result(overrides: list[str], config_name: str, metrics: dict[str, float], **extra) -> dict:
    """A result dict as the runner writes it for this composed config (numbers made up)."""
    cfg = compose(overrides, config_name=config_name)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    picked = choices()
    return {
        "name": result_name(cfg, picked),
        "config_hash": config_hash(cfg),
        "run": {"finished": "2026-12-06T00:00:00+00:00"},
        "choices": picked,
        "config": resolved,
        "metrics": metrics,
        "efficiency": {
            "visual_tokens_mean": 300.0,
            "visual_tokens_min": 200,
            "visual_tokens_max": 400,
            "samples": 300,
            "failed_samples": 0,
            "wall_time_s": 1.0,
        },
        **extra,
    }


MINI_METRICS = {
    "bench/shapes_pope/pope_f1_score": 0.5,
    "bench/shapes_pope/pope_accuracy": 0.5,
    "bench/shapes_vqa/exact_match": 0.55,
    "bench/shapes_mc/exact_match": 0.3,
}


def mini_table(results: list[dict]):
    spec, _ = experiment_spec("mini_shapes")
    return build_table("mini_shapes", spec["table"], results, load_published())


def test_make_run_result_lands_in_the_miniature_table():
    """`make run` (train.yaml, PruMerge+, compare_to_full=true) fills the LoRA PruMerge+ row."""
    result = fake_result(["reducer=prumerge_plus"], "train", MINI_METRICS)
    assert result["config"]["benchmark"]["compare_to_full"] is True
    table = mini_table([result])
    (row,) = [r for r in table.rows if r.results]
    assert row.label == "PruMerge+" and row.results == [result["name"]]
    assert row.ours["vqa"] == pytest.approx(55.0)


def test_partial_results_are_marked_with_a_star_and_the_count():
    limited = fake_result(
        ["experiment=mini_shapes", "reducer=prumerge", "benchmark.limit=40"],
        "train",
        MINI_METRICS,
        coverage={t: {"evaluated": 40, "size": 100} for t in ("shapes_mc", "shapes_pope", "shapes_vqa")},
        partial=True,
    )
    full = fake_result(["experiment=mini_shapes", "reducer=none"], "train", MINI_METRICS)
    table = mini_table([limited, full])
    labels = [r.label for r in table.rows if r.results]
    assert labels == ["none (576 tokens)", "PruMerge *"]
    markdown = render_markdown(table)
    assert "| PruMerge * |" in markdown
    assert (
        f"* partial result {limited['name']}: 120 of 300 documents, not comparable with full runs" in markdown
    )
    # an older result without coverage: its config's limit marks it
    older = copy.deepcopy(limited)
    del older["coverage"], older["partial"]
    assert "benchmark.limit=40 per task" in render_markdown(mini_table([older]))


def test_a_skipped_rerun_prints_its_result(tmp_path, capsys):
    from tokenprune.eval import runner
    from tokenprune.train import pipeline

    for run, config_name in ((runner.run, "eval"), (pipeline.run, "train")):
        overrides = ["reducer=prumerge_plus", f"paths.outputs={tmp_path}"]
        result = fake_result(overrides, config_name, MINI_METRICS)
        write_result(tmp_path / "results" / f"{result['name']}.json", result)
        assert run(compose(overrides, config_name=config_name))["name"] == result["name"]
        printed = capsys.readouterr().out
        assert f"result {result['name']}" in printed and "bench/shapes_vqa/exact_match" in printed


def test_a_fit_without_progress_bar_logs_loss_and_eta(tiny_llava_path, tmp_path, caplog):
    cfg = compose(
        [
            "model=tiny_llava",
            f"model.path={tiny_llava_path}",
            "train=lora",
            f"paths.outputs={tmp_path}",
            "train.trainer.enable_progress_bar=false",
            "train.trainer.accelerator=cpu",
            "train.trainer.max_steps=2",
            "train.trainer.log_every_n_steps=1",
        ],
        "train",
    )
    stage = instantiate(cfg.train)
    with caplog.at_level(logging.INFO, logger="tokenprune.train"):
        stage.fit(lambda dtype: instantiate(cfg.model, reducer=instantiate(cfg.reducer)), tmp_path / "stage")
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenprune.train"]
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/2", "2/2"], lines
    assert all(" loss " in line and " s/step, ETA " in line for line in steps), steps


def test_lightning_adverts_and_library_deprecations_are_dropped():
    import warnings

    from tokenprune.fitting import quiet_lightning

    quiet_lightning()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    advert = rank_zero.makeRecord(
        rank_zero.name, logging.INFO, __file__, 1, "💡 Tip: try litlogger", (), None
    )
    banner = rank_zero.makeRecord(rank_zero.name, logging.INFO, __file__, 1, "GPU available: False", (), None)
    assert not rank_zero.filter(advert) and rank_zero.filter(banner)
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning, stacklevel=1
        )
    assert caught == []


@pytest.mark.integration  # each script in a subprocess
@pytest.mark.parametrize("script", sorted(p.name for p in (PROJECT_ROOT / "scripts").glob("bench_*.py")))
def test_every_benchmark_script_runs_in_smoke_mode(script):
    done = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / script), "--smoke"],
        env={**ENV, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x" in done.stdout and len(done.stdout.splitlines()) >= 3, done.stdout  # a table of speed-ups


@pytest.mark.integration  # the preflight's data check indexes lmms-eval's tasks
def test_datasets_cache_goes_under_outputs(tmp_path, monkeypatch):
    from tokenprune.eval.preflight import check_data

    monkeypatch.delenv("LMMS_EVAL_DATASETS_CACHE", raising=False)
    monkeypatch.delenv("TOKENPRUNE_CACHE", raising=False)
    check_data(compose(["model=tiny_llava", "benchmark=smoke", f"paths.outputs={tmp_path}"]))
    assert os.environ["LMMS_EVAL_DATASETS_CACHE"] == str(tmp_path / "cache" / "datasets")
    monkeypatch.delenv("LMMS_EVAL_DATASETS_CACHE")
    monkeypatch.setenv("TOKENPRUNE_CACHE", str(tmp_path / "elsewhere"))
    check_data(compose(["model=tiny_llava", "benchmark=smoke", f"paths.outputs={tmp_path}"]))
    assert os.environ["LMMS_EVAL_DATASETS_CACHE"] == str(tmp_path / "elsewhere" / "datasets")


@pytest.mark.slow
@pytest.mark.integration  # the eval entry point in a subprocess with its own HOME
def test_an_evaluation_writes_nothing_outside_outputs_and_flags_its_limit(tmp_path):
    """The datasets cache and its locks live under outputs/ (not ~/.cache); a limited run says PARTIAL."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v for k, v in ENV.items() if k not in ("HF_HOME", "HF_DATASETS_CACHE", "LMMS_EVAL_DATASETS_CACHE")
    }
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), TOKENPRUNE_OUTPUTS=str(tmp_path / "out"))
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "tokenprune.eval", "model=tiny_llava", "benchmark=smoke", "benchmark.limit=1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(home.iterdir()) == [], sorted(str(p) for p in home.rglob("*"))[:10]
    assert any((tmp_path / "out" / "cache" / "datasets").iterdir())
    assert "PARTIAL (benchmark.limit): tp_smoke_pope 1/" in done.stdout
