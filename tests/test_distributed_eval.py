"""Data-parallel evaluation: torchrun with 2 CPU processes (gloo), lmms-eval's sharding, rank 0 gathers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tokenprune.config import PROJECT_ROOT

FIXTURES = PROJECT_ROOT / "tests" / "fixtures" / "benchmarks"
pytestmark = [pytest.mark.integration, pytest.mark.slow]
ARGS = [
    "benchmark=pope",
    "benchmark.limit=2",
    "benchmark.batch_size=2",
    "benchmark.gen_kwargs='max_new_tokens=5'",
]


def environment(tmp_path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        LMMS_EVAL_DATASETS_CACHE=str(tmp_path / "datasets_cache"),
        LOGURU_LEVEL="WARNING",
        OMP_NUM_THREADS="1",
    )
    return env


def test_two_rank_eval_matches_one_process(tiny_llava_path, tmp_path):
    out = tmp_path / "outputs"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "tokenprune.eval", "model=tiny_llava", f"model.path={tiny_llava_path}",
        f"paths.data_root={FIXTURES}", f"paths.outputs={out}", *ARGS,
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=PROJECT_ROOT, env=environment(tmp_path), capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result_file,) = (out / "results").glob("*.json")
    result = json.loads(result_file.read_text())
    lines = (out / "results" / result["samples_file"]).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 6 and result["efficiency"]["samples"] == 6  # gathered on rank 0, padding dropped
    assert len({(r["task"], r["doc_id"]) for r in records}) == 6
    assert {r["batch"]["id"].split("-")[1] for r in records} == {"0", "1"}  # both ranks answered
    assert not list((out / "results").glob("*.rank*.jsonl"))  # rank part files merged away

    # the same config in one process gives the same answers and scores
    from hydra.utils import instantiate

    from tokenprune.config import compose
    from tokenprune.eval.runner import evaluate
    from tokenprune.models.llava import LlavaAdapter

    cfg = compose([f"paths.data_root={FIXTURES}", *ARGS])
    with pytest.MonkeyPatch.context() as mp:
        for key, value in environment(tmp_path).items():
            mp.setenv(key, value)
        from lmms_eval.api import task as task_mod

        task_mod._resolve_hf_datasets_cache_dir.cache_clear()
        single = evaluate(
            LlavaAdapter.from_pretrained(tiny_llava_path, dtype="float32", device="cpu"),
            instantiate(cfg.benchmark),
        )
        task_mod._resolve_hf_datasets_cache_dir.cache_clear()
    assert {(r["task"], r["doc_id"]): r["answer"] for r in single["samples"]} == {
        (r["task"], r["doc_id"]): r["answer"] for r in records
    }
    bench = {k: v for k, v in result["metrics"].items() if k.startswith("bench/")}
    assert bench == pytest.approx(single["metrics"])
