"""Accuracy vs. visual tokens (Pareto) per benchmark metric and method, from result files (PNG + PDF).

One figure per metric column of the experiment's table: every matching result is a point (x: mean visual
tokens kept per sample, y: the metric x the column's scale), one series per method (`plot.series`, a label
template), joined in token order; the Pareto front over all our points (fewest tokens for the accuracy)
is a dashed step line; the paper's rows that state a token count are hollow markers. Output is
deterministic (Agg backend, no timestamps in the files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenprune.results import efficiency
from tokenprune.tables.build import Column, label_of, matches, paper_row, table_columns

Point = tuple[float, float, str]  # tokens, value, result name
METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
}


def collect_points(spec: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, dict[str, list[Point]]]:
    """Per metric column id, per series label, the (tokens, value, name) of every matching result."""
    table = spec.get("table") or {}
    plot = spec.get("plot") or {}
    where = dict(plot.get("where", table.get("where")) or {})
    template = plot.get("series", "{reducer}")
    wanted = plot.get("columns")
    out: dict[str, dict[str, list[Point]]] = {}
    for col in table_columns({**table, "efficiency": False}):
        if col.kind != "metric" or (wanted and col.id not in wanted):
            continue
        series: dict[str, list[Point]] = {}
        for r in results:
            value = (r.get("metrics") or {}).get(col.metric)
            tokens = efficiency(r).get("visual_tokens_mean")
            if value is None or tokens is None or not matches(r, where):
                continue
            series.setdefault(label_of(template, r), []).append(
                (float(tokens), float(value) * col.scale, r["name"])
            )
        if series:
            out[col.id] = {k: sorted(v) for k, v in sorted(series.items())}
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with fewer (or as many) tokens and a higher value, by tokens."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def figure(
    col: Column, series: dict[str, list[Point]], paper: list[tuple[str, float, float]], title: str
) -> Any:
    """The matplotlib Figure for one metric (lines carry the series labels; tested point by point)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(7.5, 3.6), dpi=150)
    ax = fig.add_subplot()
    fig.subplots_adjust(left=0.09, right=0.6, bottom=0.14, top=0.9)
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    front = pareto_front([(p[0], p[1]) for pts in series.values() for p in pts])
    if len(front) > 1:
        ax.step(
            [p[0] for p in front],
            [p[1] for p in front],
            where="post",
            linestyle="--",
            color="0.5",
            linewidth=0.8,
            label="Pareto front (ours)",
        )
    for label, x, y in paper:
        ax.plot([x], [y], marker="D", fillstyle="none", linestyle="none", label=f"paper: {label}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("visual tokens kept per sample (mean, log scale)")
    ax.set_ylabel(col.label)
    ax.set_title(title, fontsize=9)
    ax.grid(True, linewidth=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return fig


def write_plots(
    name: str,
    spec: dict[str, Any],
    results: list[dict[str, Any]],
    published: dict[str, Any],
    out_dir: str | Path,
) -> list[Path]:
    """One PNG and one PDF per metric column with points, under out_dir; returns the paths written."""
    import matplotlib

    table = spec.get("table") or {}
    columns = {c.id: c for c in table_columns({**table, "efficiency": False})}
    out_dir = Path(out_dir)
    written: list[Path] = []
    for col_id, series in collect_points(spec, results).items():
        col = columns[col_id]
        paper, section = [], None
        for row in table.get("rows") or []:
            section = row.get("section") or section
            values, _ = paper_row(published, table.get("published"), row.get("paper"))
            if values.get("tokens") is not None and values.get(col.published) is not None:
                label = f"{section} {row['label']}" if section else row["label"]
                paper.append((label, float(values["tokens"]), float(values[col.published])))
        with matplotlib.rc_context({"svg.hashsalt": "tokenprune", "pdf.compression": 6}):
            fig = figure(col, series, paper, f"{name}: {col.label}")
            out_dir.mkdir(parents=True, exist_ok=True)
            for ext in ("png", "pdf"):
                path = out_dir / f"{col_id}.{ext}"
                fig.savefig(path, format=ext, metadata=METADATA[ext])
                written.append(path)
    return written
