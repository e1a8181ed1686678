"""`python -m tokenprune.eval model=... reducer=... benchmark=...`: evaluate only."""

import hydra
from omegaconf import DictConfig

from tokenprune.cli import one_line_errors, preflight
from tokenprune.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from tokenprune.eval.runner import run

    with one_line_errors():
        run(cfg)


if __name__ == "__main__":
    preflight("eval")
    main()
