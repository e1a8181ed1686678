"""Resumable runs: per-sample records appended per batch; a killed run resumes from them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tokenprune.config import PROJECT_ROOT
from tokenprune.eval.records import SampleStore, read_records

FIXTURES = PROJECT_ROOT / "tests" / "fixtures" / "benchmarks"


def _record(doc_id, task="t", **extra):
    return {"task": task, "doc_id": doc_id, "answer": f"a{doc_id}", "visual_tokens": 4, **extra}


def test_store_appends_durably_and_skips_a_half_written_line(tmp_path):
    store = SampleStore(tmp_path / "r.samples.jsonl")
    store.append([_record(0), _record(1)])
    store.append([{"task": "t", "doc_id": 2, "failed": "OSError: gone", "visual_tokens": 0}])
    with open(store.path, "a") as handle:
        handle.write('{"task": "t", "doc_id": 3, "answ')  # the process died mid-write
    assert [r["doc_id"] for r in read_records(store.path)] == [0, 1, 2]
    done = store.load()
    assert sorted(done) == [("t", 0), ("t", 1)]  # failed samples are retried
    store.finalize([_record(1), _record(0), _record(1, answer="again")])
    assert [json.loads(line)["doc_id"] for line in store.path.read_text().splitlines()] == [0, 1]


def test_rank_part_files_are_loaded_and_merged(tmp_path):
    path = tmp_path / "r.samples.jsonl"
    SampleStore(path, rank=0, world_size=2).append([_record(0)])
    SampleStore(path, rank=1, world_size=2).append([_record(1)])
    assert sorted(SampleStore(path).load()) == [("t", 0), ("t", 1)]  # a 1-process rerun sees both
    SampleStore(path, rank=0, world_size=2).finalize([_record(1), _record(0)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.samples.jsonl"]


COMMAND = [
    "benchmark=pope",
    "benchmark.tasks=[pope_adv,pope_pop]",
    "benchmark.limit=3",
    "benchmark.batch_size=2",
    "benchmark.gen_kwargs='max_new_tokens=64'",  # slow enough to be killed between batches
]


@pytest.mark.slow
@pytest.mark.integration
def test_killed_run_resumes_and_reuses_recorded_answers(tiny_llava_path, tmp_path):
    out = tmp_path / "outputs"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "datasets_cache"),
        "LOGURU_LEVEL": "WARNING",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "tokenprune.eval", "model=tiny_llava", f"model.path={tiny_llava_path}",
        f"paths.data_root={FIXTURES}", f"paths.outputs={out}", *COMMAND,
    ]  # fmt: skip
    results = out / "results"
    process = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    recorded: list[dict] = []
    while time.monotonic() < deadline and process.poll() is None:
        files = list(results.glob("*.samples.jsonl")) if results.exists() else []
        recorded = read_records(files[0]) if files else []
        if recorded:
            os.kill(process.pid, signal.SIGKILL)  # killed right after its first batch was recorded
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    assert recorded, (
        "the run finished or failed before a batch was recorded: " + process.stderr.read().decode()[-2000:]
    )
    assert process.returncode == -signal.SIGKILL
    assert not list(results.glob("*.json"))  # no result file from a killed run
    (samples_file,) = results.glob("*.samples.jsonl")
    survived = read_records(samples_file)
    assert 2 <= len(survived) < 6 and len(survived) % 2 == 0  # whole batches only (3 batches of 2)

    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (result_file,) = results.glob("*.json")
    result = json.loads(result_file.read_text())
    assert result["efficiency"]["resumed_samples"] == len(survived)
    assert result["efficiency"]["samples"] == 6 and result["efficiency"]["failed_samples"] == 0
    final = read_records(samples_file)
    assert len(final) == 6 and [(r["task"], r["doc_id"]) for r in final] == sorted(
        (r["task"], r["doc_id"]) for r in final
    )
    by_key = {(r["task"], r["doc_id"]): r for r in final}
    for old in survived:  # recorded answers are reused, not regenerated
        again = by_key[(old["task"], old["doc_id"])]
        assert again["answer"] == old["answer"] and again["batch"]["id"] == old["batch"]["id"]

    # and the resumed result equals an uninterrupted run of the same config
    from hydra.utils import instantiate

    from tokenprune.config import compose
    from tokenprune.eval.runner import evaluate
    from tokenprune.models.llava import LlavaAdapter

    with pytest.MonkeyPatch.context() as mp:
        for key in ("HF_HOME", "LMMS_EVAL_DATASETS_CACHE", "LOGURU_LEVEL"):
            mp.setenv(key, env[key])
        from lmms_eval.api import task as task_mod

        task_mod._resolve_hf_datasets_cache_dir.cache_clear()
        cfg = compose([f"paths.data_root={FIXTURES}", *COMMAND])
        fresh = evaluate(
            LlavaAdapter.from_pretrained(tiny_llava_path, dtype="float32", device="cpu"),
            instantiate(cfg.benchmark),
        )
        task_mod._resolve_hf_datasets_cache_dir.cache_clear()
    assert {(r["task"], r["doc_id"]): r["answer"] for r in fresh["samples"]} == {
        k: r["answer"] for k, r in by_key.items()
    }
    assert {k: v for k, v in result["metrics"].items()} == pytest.approx(fresh["metrics"])
