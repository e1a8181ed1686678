"""Hydra config plumbing shared by the entry points, the lmms-eval plugin and the tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent  # the checkout, when the package runs from one (editable install)
GROUPS = ("model", "reducer", "benchmark", "train")


def shipped(name: str) -> Path:
    """The shipped `configs` or `models` folder: inside an installed package, else the checkout's.

    A wheel carries the checkout's `configs/` and `models/` as `tokenprune/_shipped/<name>` (setup.py).
    """
    installed = PACKAGE_DIR / "_shipped" / name
    return installed if installed.is_dir() else PROJECT_ROOT / name


CONFIG_DIR = shipped("configs")


def work_root() -> Path:
    """Where outputs/ and data/ live by default: the checkout, or for an installed package the current directory."""
    return PROJECT_ROOT if CONFIG_DIR == PROJECT_ROOT / "configs" else Path.cwd()


class UserError(ValueError):
    """Bad input (config, data, environment): a one-line message naming the problem and the fix.

    The entry points print it as one line and exit with status 2 (`tokenprune.cli`).
    """


def register_resolvers() -> None:
    """`${tp_root:}` (work_root), `${tp_package:}` (the package folder), `${tp_models:}` (shipped models)."""
    resolvers = {
        "tp_root": lambda: str(work_root()),
        "tp_package": lambda: str(PACKAGE_DIR),
        "tp_models": lambda: str(shipped("models")),
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def group_options(group: str) -> list[str]:
    """The config names available in a config group (configs/<group>/*.yaml)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose(overrides: Sequence[str] = (), config_name: str = "eval") -> DictConfig:
    """Compose a config outside @hydra.main (tests, the lmms-eval plugin), with hydra's runtime info.

    HydraConfig is set as under @hydra.main, so `hydra.runtime.choices` works the same way.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with_hydra = OmegaConf.to_container(cfg, resolve=False)
    with_hydra.pop("hydra")
    return OmegaConf.create(with_hydra)


def choices() -> dict[str, str]:
    """The option picked in each config group for the running job (model, reducer, ...)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    picked = HydraConfig.get().runtime.choices
    return {group: picked[group] for group in GROUPS if picked.get(group) is not None}
