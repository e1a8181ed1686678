"""Launchers (local, submitit_local, slurm) and resumable, deduplicated sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from tokenprune.config import CONFIG_DIR, PROJECT_ROOT, register_resolvers
from tokenprune.results import config_hash, finished, write_result

SLURM_KEYS = {
    "partition", "account", "qos", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb",
    "timeout_min", "array_parallelism", "max_num_timeout", "signal_delay_s", "setup", "submitit_folder",
}  # fmt: skip


def launcher_config(overrides: list[str]) -> dict:
    """hydra.launcher of the composed train config, resolved against the whole config (as Hydra does)."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_default_launcher_is_hydras_basic_one():
    assert launcher_config([])["_target_"].endswith("BasicLauncher")
    assert launcher_config(["launcher=submitit_local"])["_target_"].endswith(
        "submitit_launcher.LocalLauncher"
    )


def test_slurm_launcher_takes_site_from_env_and_shape_from_experiment(monkeypatch):
    monkeypatch.setenv("TOKENPRUNE_SLURM_PARTITION", "a100")
    monkeypatch.setenv("TOKENPRUNE_SLURM_ACCOUNT", "vision_lab")
    monkeypatch.setenv("TOKENPRUNE_SLURM_QOS", "high")
    monkeypatch.setenv("TOKENPRUNE_SLURM_MAX_REQUEUE", "5")
    plain = launcher_config(["launcher=slurm"])
    assert plain["_target_"].endswith("submitit_launcher.SlurmLauncher") and set(plain) >= SLURM_KEYS
    assert (plain["partition"], plain["account"], plain["qos"]) == ("a100", "vision_lab", "high")
    assert (plain["gpus_per_node"], plain["timeout_min"], plain["max_num_timeout"]) == (1, 240, 5)
    assert isinstance(plain["mem_gb"], int) and plain["array_parallelism"] == 16
    assert any(line.startswith("source ") and line.endswith("/bin/activate") for line in plain["setup"])
    paper = launcher_config(["launcher=slurm", "experiment=prumerge_main"])
    assert (paper["gpus_per_node"], paper["tasks_per_node"], paper["timeout_min"]) == (8, 8, 2880)
    assert paper["name"] == "tokenprune-prumerge_main"
    cli = launcher_config(["launcher=slurm", "experiment=prumerge_main", "hydra.launcher.gpus_per_node=4"])
    assert cli["gpus_per_node"] == 4  # the command line wins over the experiment


def test_unset_site_variables_are_null(monkeypatch):
    for name in ("TOKENPRUNE_SLURM_ACCOUNT", "TOKENPRUNE_SLURM_QOS", "TOKENPRUNE_SLURM_PARTITION"):
        monkeypatch.delenv(name, raising=False)
    config = launcher_config(["launcher=slurm"])
    assert (config["partition"], config["account"], config["qos"]) == ("gpu", None, None)


@pytest.mark.integration
def test_printing_the_composed_slurm_launcher_config():
    """`--cfg all -p hydra.launcher --resolve` shows what would be submitted, without a cluster."""
    env = {**os.environ, "TOKENPRUNE_SLURM_PARTITION": "h100", "TOKENPRUNE_SLURM_ACCOUNT": "lab42"}
    out = subprocess.run(
        [sys.executable, "-m", "tokenprune.train", "experiment=prumerge_main", "launcher=slurm",
         "--cfg", "all", "-p", "hydra.launcher", "--resolve"],
        capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT, env=env, check=True,
    ).stdout  # fmt: skip
    printed = OmegaConf.to_container(OmegaConf.create(out))
    assert printed["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (printed["partition"], printed["account"], printed["gpus_per_node"]) == ("h100", "lab42", 8)
    assert printed["max_num_timeout"] == 3 and printed["submitit_folder"].endswith("/.submitit/%j")


def test_finished_needs_the_same_config_hash(tmp_path):
    path = tmp_path / "r.json"
    assert finished(path, "abc") is None
    write_result(path, {"name": "r", "config_hash": "abc"})
    assert finished(path, "abc")["name"] == "r"
    assert finished(path, "def") is None  # same name, other config (an explicit run.name): redo
    write_result(path, {"name": "r"})  # written before hashes were recorded: its name carries the hash
    assert finished(path, "def") is not None


def test_force_and_experiment_do_not_change_the_hash():
    base = {"model": {"path": "m"}, "reducer": {"keep": 64}, "seed": 0}
    assert config_hash(base) == config_hash({**base, "force": True, "experiment": {"name": "x"}})
    assert config_hash(base) != config_hash({**base, "seed": 1})


def _sweep(tiny_llava_path: str, out: Path) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "-m", "tokenprune.train", "-m", "experiment=smoke", "launcher=submitit_local",
        "benchmark.limit=2", f"model.path={tiny_llava_path}", f"paths.outputs={out}",
        f"hydra.sweep.dir={out / 'multirun'}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _job_logs(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((out / "multirun" / ".submitit").rglob("*_log.*")))


@pytest.mark.slow
@pytest.mark.integration
def test_submitit_local_sweep_runs_then_resumes_only_what_is_missing(tiny_llava_path, tmp_path):
    """experiment=smoke as 2 submitit jobs; a result deleted (a sweep killed half-way) is all a rerun redoes."""
    _sweep(tiny_llava_path, tmp_path)
    results = tmp_path / "results"
    files = sorted(results.glob("*.json"))
    assert [f.name.split("-")[1] for f in files] == ["random", "uniform"]
    for file in files:
        result = json.loads(file.read_text())
        assert file.stem.endswith("-" + result["config_hash"]) and result["efficiency"]["samples"] == 4
        assert result["config"]["experiment"]["name"] == "smoke" and result["choices"]["train"] == "none"
    assert len(list((tmp_path / "multirun" / ".submitit").glob("*/*_result.pkl"))) == 2

    kept, lost = files
    kept_mtime = kept.stat().st_mtime_ns
    lost.unlink()
    for extra in results.glob(lost.stem + ".*"):
        extra.unlink()
    _sweep(tiny_llava_path, tmp_path)
    assert lost.exists() and kept.stat().st_mtime_ns == kept_mtime  # only the missing point ran
    assert "result exists, skipping" in _job_logs(tmp_path)

    from tokenprune.tables.__main__ import make

    written = make("smoke", [f"paths.outputs={tmp_path}"])
    markdown = (tmp_path / "tables" / "smoke.md").read_text()
    for file in files:
        result = json.loads(file.read_text())
        vqa = 100 * result["metrics"]["bench/tp_smoke_vqa/exact_match"]
        assert f"{vqa:.1f}" in markdown and result["name"] in markdown
    assert {p.suffix for p in written} == {".md", ".tex", ".png", ".pdf"}


def test_a_finished_training_point_is_skipped_before_any_fit(tmp_path, monkeypatch):
    """train=lora with its result on disk: returned as is, nothing built or fitted (a resumed sweep)."""
    from tokenprune.config import choices, compose
    from tokenprune.results import result_name
    from tokenprune.train import pipeline

    cfg = compose(["train=lora", "reducer=random", f"paths.outputs={tmp_path}"], config_name="train")
    name = result_name(cfg, choices())
    write_result(tmp_path / "results" / f"{name}.json", {"name": name, "config_hash": config_hash(cfg)})
    monkeypatch.setattr("hydra.utils.instantiate", lambda *a, **k: pytest.fail("a finished point was run"))
    assert pipeline.run(cfg)["name"] == name
