"""Every experiment config composes, with every point of its sweep, and names each point's result apart.

An experiment whose configs are not all in the checkout yet (a reducer, model or train stage another
issue is still building) is skipped with the missing file named.
"""

from __future__ import annotations

import inspect
import itertools
import re

import pytest
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method
from omegaconf import OmegaConf

from tokenprune.config import CONFIG_DIR, GROUPS, register_resolvers
from tokenprune.results import result_name

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
OVERRIDE = re.compile(r"^\s*-\s*override\s+/([\w/]+)\s*:\s*(\w+)", re.MULTILINE)


def missing_configs(text: str, sweep: dict[str, str]) -> list[str]:
    """configs/<group>/<option>.yaml files the experiment names (defaults or sweep) that do not exist."""
    wanted = OVERRIDE.findall(text)
    for key, values in sweep.items():
        group = key.lstrip("+")
        if (CONFIG_DIR / group).is_dir():
            wanted += [(group, v.strip()) for v in str(values).split(",")]
    return [f"configs/{g}/{o}.yaml" for g, o in wanted if not (CONFIG_DIR / g / f"{o}.yaml").is_file()]


def grid(sweep: dict[str, str]) -> list[list[str]]:
    """Hydra's basic sweeper: the cartesian product of the comma-separated values."""
    axes = [[f"{key}={v.strip()}" for v in str(values).split(",")] for key, values in sweep.items()]
    return [list(point) for point in itertools.product(*axes)]


def bind(node) -> None:
    """Bind a `_target_` node's keys to its target's signature, recursively, without calling it."""
    container = OmegaConf.to_container(node, resolve=True)
    target = get_method(container.pop("_target_"))
    inspect.signature(target).bind_partial(**{k: v for k, v in container.items() if not k.startswith("_")})
    for value in node.values():
        if OmegaConf.is_dict(value) and "_target_" in value:
            bind(value)


def load(name: str) -> tuple[str, dict]:
    text = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
    return text, yaml.safe_load(text)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_header_says_what_it_reproduces_and_costs(name):
    text, body = load(name)
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert text.startswith("# @package _global_\n"), "experiments are global packages"
    for word in ("Reproduces:", "Cost", "Hardware"):
        assert word in header, f"{name}.yaml: the header comment needs a {word!r} line"
    meta = body["experiment"]
    assert meta["name"] == name and meta["cost"] and meta["hardware"] and meta["reproduces"]
    assert body["hydra"]["sweeper"]["params"], "an experiment is a sweep (hydra.sweeper.params)"
    assert meta["table"]["columns"] and (meta["table"].get("rows") or meta["table"].get("group_by"))


def by_grid_size(names: list[str], slow_above: int = 20) -> list:
    """The experiments, those whose grid has over `slow_above` points (~0.3 s each to compose) marked slow."""
    return [
        pytest.param(name, marks=pytest.mark.slow)
        if len(grid(load(name)[1]["hydra"]["sweeper"]["params"])) > slow_above
        else name
        for name in names
    ]


@pytest.mark.parametrize("name", by_grid_size(EXPERIMENTS))
def test_every_sweep_point_composes_binds_and_has_its_own_result(name):
    text, body = load(name)
    sweep = body["hydra"]["sweeper"]["params"]
    missing = missing_configs(text, sweep)
    assert not missing, f"{name} names configs that do not exist: {', '.join(missing)}"
    register_resolvers()
    GlobalHydra.instance().clear()
    names = {}
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for point in grid(sweep):
            cfg = hydra_compose(
                config_name="train", overrides=[f"experiment={name}", *point], return_hydra_config=True
            )
            HydraConfig.instance().set_config(cfg)
            picked = cfg.hydra.runtime.choices
            for key in point:  # the sweep really selects what it says
                group, _, value = key.lstrip("+").partition("=")
                if group in GROUPS:
                    assert picked[group] == value, key
            job = OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"})
            for group in GROUPS:
                if "_target_" in job[group]:
                    bind(job[group])
            resolved = OmegaConf.to_container(job, resolve=True)
            result = result_name(resolved, {g: picked[g] for g in GROUPS})
            assert result not in names, f"{point} and {names.get(result)} would share the result {result}"
            names[result] = point
    assert len(names) == len(grid(sweep))


def test_sweep_grid_matches_hydra():
    assert grid({"a": "1,2", "+b/c": "x,y,z"})[:2] == [["a=1", "+b/c=x"], ["a=1", "+b/c=y"]]
    assert len(grid({"a": "1,2", "+b/c": "x,y,z"})) == 6


def test_the_sampling_ablation_keeps_equal_tokens_per_benchmark():
    _, body = load("prumerge_ablation_sampling")
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for benchmark, tokens in body["experiment"]["equal_tokens"].items():
            overrides = [
                "experiment=prumerge_ablation_sampling",
                "+experiment/sampling=uniform",
                f"benchmark={benchmark}",
            ]
            cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            assert cfg.reducer.keep == tokens and cfg.hydra.runtime.choices.reducer == "uniform"
            iqr = hydra_compose(
                config_name="train",
                overrides=[*overrides[:1], "+experiment/sampling=iqr", f"benchmark={benchmark}"],
            )
            assert "keep" not in iqr.reducer and iqr.reducer._target_.endswith("PruMerge")


def test_identical_points_of_two_experiments_share_one_result():
    """The IQR arm of the sampling ablation is prumerge_training_free's point: same file, run once."""
    register_resolvers()
    names = []
    for overrides in (
        ["experiment=prumerge_ablation_sampling", "+experiment/sampling=iqr", "benchmark=pope"],
        ["experiment=prumerge_training_free", "model=llava15_7b", "reducer=prumerge", "benchmark=pope"],
    ):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        job = OmegaConf.to_container(
            OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"}), resolve=True
        )
        names.append(result_name(job, {g: cfg.hydra.runtime.choices[g] for g in GROUPS}))
    assert names[0] == names[1]
