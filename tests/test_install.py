"""The installed environment is the committed lock, and the package runs installed, from anywhere.

* `pip check` reports nothing but the dependencies requirements/excluded.txt leaves out (and all of them,
  so the allow-list cannot go stale); every locked version is the installed one.
* `config_hash` does not depend on where the checkout, the shipped model or the outputs live.
* A non-editable wheel, run from another directory, finds its configs, bundled tasks and the shipped
  miniature, writes under that directory's outputs/, and names its results as the checkout does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tokenprune.config import PROJECT_ROOT, compose
from tokenprune.results import config_hash, result_name


def _check_env():
    spec = importlib.util.spec_from_file_location("check_env", PROJECT_ROOT / "scripts" / "check_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_env = _check_env()


@pytest.mark.integration  # pip check in a subprocess
def test_pip_check_reports_exactly_the_excluded_dependencies():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    unexpected, missing = check_env.pip_check_problems(out.stdout + out.stderr)
    assert unexpected == []
    assert missing == check_env.excluded() == {"torchvision", "timm"}


def test_pip_check_parsing_flags_anything_else():
    report = (
        "lmms-eval 0.7.3 requires torchvision, which is not installed.\n"
        "lmms-eval 0.7.3 has requirement wandb==0.25.0, but you have wandb 0.31.0.\n"
        "foo 1.0 requires bar, which is not installed.\n"
    )
    unexpected, missing = check_env.pip_check_problems(report)
    assert missing == {"torchvision"}
    assert unexpected == report.splitlines()[1:]


def test_environment_matches_the_lock():
    assert check_env.version_mismatches() == []
    pins = check_env.locked()
    assert len(pins) > 100 and pins["lmms-eval"] == "0.7.3"
    assert not check_env.excluded() & pins.keys(), "an excluded package is in the lock"
    # the release that broke every evaluation (filelock._api removed in 4.3) is kept out by pyproject.toml
    assert tuple(int(x) for x in pins["filelock"].split(".")[:2]) < (4, 3)


def test_torch_floor_is_what_transformers_requires():
    def floor(requirements: list[str], name: str) -> tuple[int, ...]:
        spec = next(r for r in requirements if re.match(rf"{name}\s*[>=]", r))
        return tuple(int(x) for x in re.search(r">=\s*([\d.]+)", spec)[1].split("."))

    ours = floor(metadata.requires("tokenprune"), "torch")
    theirs = floor(metadata.requires("transformers"), "torch")
    assert ours == theirs


def test_config_hash_is_the_same_under_two_roots(tmp_path, monkeypatch):
    def job(root: Path, outputs: Path | None = None) -> tuple[str, str, str]:
        if outputs:
            monkeypatch.setenv("TOKENPRUNE_OUTPUTS", str(outputs))
        cfg = compose([f"paths.root={root}", "reducer=prumerge", "benchmark=shapes"], config_name="train")
        return cfg.train.data.out, config_hash(cfg), result_name(cfg, {"model": "m"})

    first = job(tmp_path / "a" / "checkout")
    second = job(tmp_path / "elsewhere", outputs=tmp_path / "scratch")
    assert first[0] != second[0]  # the locations really differ
    assert first[1:] == second[1:]
    moved_model = compose(["model.path=/cluster/models/mini_shapes", "reducer=prumerge"], config_name="train")
    assert config_hash(moved_model) != first[1]  # an explicit model path is part of what runs
    assert config_hash(compose(["reducer=prumerge", "reducer.knn_k=8"])) != config_hash(
        compose(["reducer=prumerge"])
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """tokenprune built as a wheel and installed (not editable) into a folder of its own."""
    root = tmp_path_factory.mktemp("installed")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", PROJECT_ROOT], check=True
    )
    wheel = next((root / "dist").glob("tokenprune-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", root / "site", wheel], check=True)
    return root / "site"


def _run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("TOKENPRUNE_OUTPUTS", None)
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
@pytest.mark.integration
def test_non_editable_install_runs_eval_and_train_from_another_directory(installed, tmp_path):
    def modules(root: Path) -> set[str]:
        return {
            str(p.relative_to(root)) for p in (root / "tokenprune").rglob("*.py") if "_shipped" not in p.parts
        }

    assert modules(installed) == modules(PROJECT_ROOT)  # every module travels (a package without
    # __init__.py would not, and an editable install beside it would hide that)
    where = _run_installed(
        installed, tmp_path, "-c",
        "import tokenprune.config as c, tokenprune.models.llava as m; print(c.CONFIG_DIR); print(m.__file__)",
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():  # the wheel's configs and code, not the checkout's
        assert Path(line).is_relative_to(installed), line

    names = []
    for cwd in (tmp_path / "one", tmp_path / "two"):
        run = _run_installed(
            installed, cwd, "-m", "tokenprune.eval", "reducer=prumerge", "benchmark=shapes",
            "benchmark.limit=2",
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        (result,) = (cwd / "outputs" / "results").glob("*.json")
        record = json.loads(result.read_text())
        assert record["config"]["model"]["path"].startswith(str(installed))  # the shipped miniature
        assert record["metrics"], record
        names.append((result.name, record["config_hash"]))
    assert names[0] == names[1]  # two roots, one name: a moved run resumes and skips

    train = _run_installed(
        installed, tmp_path / "one", "-m", "tokenprune.train", "reducer=prumerge_plus",
        "train.trainer.max_steps=2", "train.data.n=8", "benchmark.limit=2",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    results = sorted((tmp_path / "one" / "outputs" / "results").glob("*lora_mini*.json"))
    assert len(results) == 1 and "train/loss" in json.loads(results[0].read_text())["metrics"]
