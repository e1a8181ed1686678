"""Result files: deterministic names, atomic writes, schema, collection."""

import json
import os
from pathlib import Path

import pytest

from tokenprune.atomic import atomic_file, atomic_folder, atomic_write_text
from tokenprune.results import (
    SCHEMA,
    collect,
    config_hash,
    efficiency,
    read_result,
    result_name,
    write_result,
)


def test_name_is_deterministic_and_ignores_locations():
    a = {"model": {"path": "x"}, "reducer": {"keep": 64}, "paths": {"outputs": "/a"}, "run": {"name": None}}
    b = {**a, "paths": {"outputs": "/b"}}
    c = {**a, "reducer": {"keep": 128}}
    choices = {"model": "tiny_llava", "reducer": "random", "benchmark": "smoke", "train": "none"}
    assert (
        result_name(a, choices) == result_name(b, choices) == f"tiny_llava-random-smoke-none-{config_hash(a)}"
    )
    assert result_name(c, choices) != result_name(a, choices)
    assert result_name({**a, "run": {"name": "mine"}}, choices) == "mine"


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic_write_text(path, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"], "temp file left behind"


def test_atomic_file_and_folder_keep_the_old_state_when_the_write_fails(tmp_path):
    path, folder = tmp_path / "shard.bin", tmp_path / "stage"
    atomic_write_text(path, "old")
    folder.mkdir()
    (folder / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError), atomic_folder(folder) as staging:
        (staging / "a").write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and (folder / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.bin", "stage"], "temp files left behind"
    with atomic_file(path) as tmp:
        tmp.write_text("new")
    with atomic_folder(folder) as staging:
        (staging / "b").write_text("new")
    assert path.read_text() == "new" and [p.name for p in folder.iterdir()] == ["b"]
    with atomic_folder(folder, replace=False) as staging:  # someone else's finished folder is kept
        (staging / "c").write_text("mine")
    assert [p.name for p in folder.iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.bin", "stage"]


def test_write_read_collect(tmp_path):
    write_result(tmp_path / "b.json", {"name": "b", "metrics": {"bench/t/m": 1.0}})
    write_result(tmp_path / "a.json", {"name": "a", "metrics": {}})
    assert json.loads((tmp_path / "a.json").read_text())["schema"] == SCHEMA
    assert [r["name"] for r in collect(tmp_path)] == ["a", "b"]
    (tmp_path / "c.json").write_text(json.dumps({"name": "c"}))
    with pytest.raises(ValueError, match="not a tokenprune result"):
        read_result(tmp_path / "c.json")


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_efficiency_reads_one_block_and_the_old_two():
    new = {
        "efficiency": {
            "visual_tokens_mean": 77.0,
            "samples": 3,
            "prefill_flops_ratio": 0.2,
            "wall_time_s": 5.0,
        }
    }
    # written before the block was one: a short summary beside the meter's eff/<name> block
    old = {
        "efficiency": {"visual_tokens_mean": 77.0, "samples": 3, "failed_samples": 0, "wall_time_s": 5.0},
        "eff": {"eff/visual_tokens_mean": 77.0, "eff/samples": 3, "eff/prefill_flops_ratio": 0.2},
    }
    assert efficiency(new) == new["efficiency"]
    assert efficiency(old) == {
        "visual_tokens_mean": 77.0,
        "samples": 3,
        "failed_samples": 0,
        "wall_time_s": 5.0,
        "prefill_flops_ratio": 0.2,
    }
    assert efficiency({}) == {}
    fixture = read_result(next((Path(__file__).parent / "fixtures" / "results").glob("*.json")))
    assert "eff" in fixture and efficiency(fixture)["flops_prefill_mean"] > 0  # an old-format file
