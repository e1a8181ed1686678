"""Every option of every config group composes and binds to its target's signature (no weights loaded)."""

import inspect

import pytest
from hydra.errors import MissingConfigException
from hydra.utils import get_method
from omegaconf import OmegaConf

from tokenprune.config import GROUPS, compose, group_options


def bind(node) -> None:
    """Bind a `_target_` node's keys to the target's signature, recursively, without calling it."""
    container = OmegaConf.to_container(node, resolve=True)
    target = get_method(container.pop("_target_"))
    signature = inspect.signature(target)
    signature.bind_partial(**{k: v for k, v in container.items() if not k.startswith("_")})
    for value in node.values():
        if OmegaConf.is_dict(value) and "_target_" in value:
            bind(value)


CASES = [(group, option) for group in GROUPS for option in group_options(group)]


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_binds(group, option):
    for config_name in ("eval", "train"):
        cfg = compose([f"{group}={option}"], config_name=config_name)
        node = cfg[group]
        if "_target_" in node:
            bind(node)
        else:
            assert OmegaConf.to_container(node) == {}, f"{group}={option} has keys but no _target_"


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as error:
        compose(["reducer=prumerge_typo"])
    message = str(error.value)
    assert "reducer/prumerge_typo" in message and all(
        name in message for name in ("none", "random", "uniform")
    )


def test_entry_points_compose_the_same_job():
    """python -m tokenprune.eval and tokenprune.train name (and so reuse) the same result."""
    assert compose(["reducer=random", "train=none"], "eval") == compose(
        ["reducer=random", "train=none"], "train"
    )
    assert compose(["reducer=random"], "train").train.trainer.max_steps > 0  # train.yaml fits by default


def test_defaults_run_offline():
    cfg = compose([], config_name="train")
    assert cfg.model.path.endswith("models/mini_shapes") and cfg.model.build is None
    assert cfg.benchmark.include_path.endswith("tasks/shapes") and cfg.benchmark.compare_to_full
    assert cfg.train.data._target_.endswith("shapes_instruct_data")  # generated locally, no download
    assert OmegaConf.to_container(compose([], config_name="eval").train) == {}
