"""Put an experiment's table and plots where the project shows them (README.md, docs/), from the result
files: `python -m tokenprune.tables experiment=NAME publish=true` (`make miniature` does it).

Spec (`experiment.publish`), paths relative to the repository root:

    markdown: [README.md, docs/experiments.md]   # the table replaces the text between the file's markers
                                                 #   <!-- table:NAME --> and <!-- /table:NAME -->
    columns: [pope, pope_ci, vqa, tokens]         # optional: these columns of the table, in this order
    plots: {vqa: docs/images/NAME_vqa.png}       # optional: a plot column's PNG, copied there

The published table is the table's rows and legend without its list of result files (that stays in
`<paths.outputs>/tables/NAME.md`). Nothing is written unless `publish=true` is given, so tabulating
other results (a cluster's, a test's) never touches the repository.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from tokenprune.atomic import atomic_write_bytes, atomic_write_text
from tokenprune.config import PROJECT_ROOT
from tokenprune.tables.build import Table
from tokenprune.tables.render import render_markdown


def markers(name: str) -> tuple[str, str]:
    return f"<!-- table:{name} -->", f"<!-- /table:{name} -->"


def select_columns(table: Table, ids: list[str] | None) -> Table:
    """The table with only the named columns, in that order (unknown ids are an error)."""
    if not ids:
        return table
    by_id = {c.id: c for c in table.columns}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ValueError(
            f"experiment {table.name}: publish.columns names {unknown}, which the table does not have "
            f"(its columns: {list(by_id)}); fix experiment.publish.columns"
        )
    return dataclasses.replace(table, columns=[by_id[i] for i in ids])


def splice(path: Path, name: str, body: str) -> Path:
    """Replace the text between the table's two markers in a Markdown file with `body` (atomically)."""
    start, end = markers(name)
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise ValueError(
            f"{path} must hold the markers {start} and {end} once each, on lines of their own, to receive "
            f"the table of experiment {name}; add them where the table belongs"
        )
    return atomic_write_text(path, pattern.sub(lambda _: f"{start}\n{body.strip()}\n{end}", text))


def publish(
    table: Table, spec: dict[str, Any], plot_dir: Path, root: str | Path = PROJECT_ROOT
) -> list[Path]:
    """Write the table into each `spec["markdown"]` file and copy each `spec["plots"]` PNG; returns the paths."""
    root = Path(root)
    body = render_markdown(select_columns(table, spec.get("columns")), files=False)
    written = [splice(root / rel, table.name, body) for rel in spec.get("markdown") or []]
    for column, rel in (spec.get("plots") or {}).items():
        source = Path(plot_dir) / f"{column}.png"
        if not source.exists():
            raise FileNotFoundError(
                f"experiment {table.name}: no plot {source} to publish (is `{column}` a metric column with "
                "results?); fix experiment.publish.plots"
            )
        written.append(atomic_write_bytes(root / rel, source.read_bytes()))
    return written
