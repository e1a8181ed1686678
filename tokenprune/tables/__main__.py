"""`python -m tokenprune.tables [experiment=NAME[,NAME...]] [plots=false] [publish=true] [Hydra overrides]`.

Writes `<paths.outputs>/tables/NAME.md` and `.tex` and `<paths.outputs>/plots/NAME/<column>.png|.pdf`
from the result files in `paths.results`, for the named experiments or, without `experiment=`, for every
experiment in configs/experiment/ that has a table (one whose configs are not all there yet is skipped
with a message). Other arguments are Hydra overrides of the composed config, e.g.
`paths.results=/scratch/results paths.outputs=/tmp/out`. Nothing is run: results are only read.
`publish=true` also puts each table and plot where the experiment's `experiment.publish` says
(README.md, docs/: tokenprune.tables.publish).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf import OmegaConf

from tokenprune.atomic import atomic_write_text
from tokenprune.config import compose, group_options
from tokenprune.results import read_result
from tokenprune.tables.build import build_table, load_published
from tokenprune.tables.render import render_latex, render_markdown

log = logging.getLogger("tokenprune.tables")


def load_results(folder: str | Path) -> list[dict[str, Any]]:
    """Every readable result file in a folder, sorted by name (unreadable ones are reported and skipped)."""
    results = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            results.append(read_result(path))
        except (ValueError, OSError) as error:
            log.warning("skipping %s: %s", path, error)
    return results


def experiment_spec(name: str, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """The experiment's `experiment` block and its `paths` (resolved), from the composed config."""
    cfg = compose([f"experiment={name}", *overrides], config_name="train")
    if "experiment" not in cfg:
        raise ValueError(f"configs/experiment/{name}.yaml has no `experiment:` block")
    spec = OmegaConf.to_container(cfg.experiment, resolve=True)
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    return spec, paths


def make(
    name: str,
    overrides: Sequence[str] = (),
    plots: bool = True,
    cache: dict | None = None,
    publish: bool = False,
) -> list[Path]:
    """Tables (and plots) of one experiment; returns the files written."""
    spec, paths = experiment_spec(name, overrides)
    if not spec.get("table"):
        log.info("experiment %s has no table", name)
        return []
    cache = {} if cache is None else cache
    folder = str(paths["results"])
    if folder not in cache:
        cache[folder] = load_results(folder)
    results = cache[folder]
    published = load_published()
    table = build_table(name, spec["table"], results, published)
    out = Path(paths["outputs"]) / "tables"
    markdown = render_markdown(table)
    written = [
        atomic_write_text(out / f"{name}.md", markdown),
        atomic_write_text(out / f"{name}.tex", render_latex(table)),
    ]
    print(markdown)
    plot_dir = Path(paths["outputs"]) / "plots" / name
    if plots or publish:
        from tokenprune.tables.plots import write_plots

        written += write_plots(name, spec, results, published, plot_dir)
    if publish and spec.get("publish"):
        from tokenprune.tables.publish import publish as publish_table

        written += publish_table(table, spec["publish"], plot_dir)
    for path in written:
        print(f"wrote {path}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[tables] %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    names: list[str] = []
    flags = {"plots": True, "publish": False}
    overrides = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "experiment":
            names += [n for n in value.split(",") if n]
        elif key in flags:
            flags[key] = value.lower() not in ("false", "0", "no")
        else:
            overrides.append(arg)
    explicit = bool(names)
    names = names or group_options("experiment")
    cache: dict = {}
    for name in names:
        try:
            make(name, overrides, cache=cache, **flags)
        except HydraException as error:  # a config the experiment needs is not there (yet)
            if explicit:
                raise
            log.warning("skipping experiment %s: %s", name, str(error).splitlines()[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
