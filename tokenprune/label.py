"""`python -m tokenprune.label model=... source=...`: GAE relevance labels for the explainability mapper."""

import hydra
from omegaconf import DictConfig

from tokenprune.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="label", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from tokenprune.explain.labels import run

    run(cfg)


if __name__ == "__main__":
    main()
