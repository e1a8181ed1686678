"""Hydra config plumbing shared by the entry points, the lmms-eval plugin and the tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
CONFIG_DIR = PROJECT_ROOT / "configs"
GROUPS = ("model", "reducer", "benchmark", "train")


class UserError(ValueError):
    """Bad input (config, data, environment): a one-line message naming the problem and the fix.

    The entry points print it as one line and exit with status 2 (`tokenprune.cli`).
    """


def register_resolvers() -> None:
    """`${tp_root:}` is the checkout (or install) root that holds configs/ and outputs/."""
    if not OmegaConf.has_resolver("tp_root"):
        OmegaConf.register_new_resolver("tp_root", lambda: str(PROJECT_ROOT))


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
