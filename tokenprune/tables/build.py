"""From result files and a table spec to a table of numbers (no formatting): see the package docstring."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tokenprune.results import coverage_text, efficiency, is_partial

PARTIAL = "*"  # appended to the label of a row with a partial result (benchmark.limit), with a note
PUBLISHED = Path(__file__).resolve().parent / "published.yaml"
CHOICE_KEYS = ("model", "reducer", "benchmark", "train")  # read from a result's `choices`
# Efficiency columns appended to every table (unless `efficiency: false`): id, label, source, published key.
EFFICIENCY = (
    ("tokens", "Tokens", "visual_tokens", "tokens"),
    ("prefill_flops", "Prefill FLOPs", "flops_prefill_mean", None),
    ("flops_ratio", "FLOPs ratio", "prefill_flops_ratio", "flops_ratio"),
)


@dataclass
class Column:
    """One column of numbers; `kind` is metric, relative, mean, ci or efficiency.

    A ci column (`ci_of: <metric column id>`) holds the half-width of the 95% bootstrap interval
    of that column's metric in the same result (`result["bootstrap"]`, tokenprune.eval.bootstrap),
    on the column's scale: the "± ci" of the number beside it.
    """

    id: str
    label: str
    kind: str
    metric: str | None = None
    scale: float = 1.0
    digits: int = 1
    best: str | None = "max"
    relative_to: dict[str, Any] = field(default_factory=dict)
    mean_of: list[str] = field(default_factory=list)
    ci_of: str | None = None
    published: str | None = None  # key of the paper's value in a published row
    fmt: str = "fixed"  # fixed | si
    note: str | None = None


@dataclass
class Row:
    label: str
    section: str | None
    ours: dict[str, float | None]
    paper: dict[str, float | None]
    results: list[str]  # names of the result files the row's numbers come from
    notes: list[str] = field(default_factory=list)


@dataclass
class Table:
    name: str
    title: str
    columns: list[Column]
    rows: list[Row]
    sources: list[str]  # one line per paper table the numbers come from
    notes: list[str]

    @property
    def has_paper(self) -> bool:
        return any(v is not None for row in self.rows for v in row.paper.values())

    def paper_columns(self) -> set[str]:
        """Columns for which some row has a published number (they get paper and delta columns)."""
        return {c.id for c in self.columns if any(r.paper.get(c.id) is not None for r in self.rows)}


def load_published(path: str | Path = PUBLISHED) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def value_at(result: dict[str, Any], key: str) -> Any:
    """A result's value for a selector key: a config group's choice, else a dotted config path (None if absent)."""
    if key in CHOICE_KEYS:
        return (result.get("choices") or {}).get(key)
    node: Any = result.get("config") or {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _same(got: Any, want: Any) -> bool:
    if isinstance(got, bool) or isinstance(want, bool):
        return got is want
    if isinstance(got, int | float) and isinstance(want, int | float):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
    return got == want


def matches(result: dict[str, Any], where: dict[str, Any]) -> bool:
    """True when every key of `where` has the wanted value (a list: any of them) in the result."""
    for key, want in where.items():
        options = want if isinstance(want, list) else [want]
        if not any(_same(value_at(result, key), w) for w in options):
            return False
    return True


def _newest(results: list[dict[str, Any]]) -> dict[str, Any]:
    return max(results, key=lambda r: ((r.get("run") or {}).get("finished") or "", r.get("name", "")))


def _pick(
    results: list[dict[str, Any]], where: dict[str, Any], metric: str
) -> tuple[dict[str, Any] | None, int]:
    found = [r for r in results if matches(r, where) and (r.get("metrics") or {}).get(metric) is not None]
    return (_newest(found), len(found)) if found else (None, 0)


def table_columns(spec: dict[str, Any]) -> list[Column]:
    columns = []
    for c in spec.get("columns") or []:
        kind = (
            "mean"
            if c.get("mean_of")
            else "ci"
            if c.get("ci_of")
            else "relative"
            if c.get("relative_to")
            else "metric"
        )
        columns.append(
            Column(
                id=str(c["id"]),
                label=str(c.get("label", c["id"])),
                kind=kind,
                metric=c.get("metric"),
                scale=float(c.get("scale", 1.0)),
                digits=int(c.get("digits", 1)),
                best=None if c.get("ci_of") else c.get("best", "max"),
                relative_to=dict(c.get("relative_to") or {}),
                mean_of=list(c.get("mean_of") or []),
                ci_of=c.get("ci_of"),
                published=str(c["id"]),
                note=c.get("note"),
            )
        )
    if spec.get("efficiency", True):
        for cid, label, _, published in EFFICIENCY:
            columns.append(
                Column(
                    id=cid,
                    label=label,
                    kind="efficiency",
                    digits=2 if cid == "flops_ratio" else 1,
                    best=None,
                    published=published,
                    fmt="si" if cid == "prefill_flops" else "fixed",
                )
            )
    return columns


def paper_row(published: dict[str, Any], default: str | None, ref: str | None) -> tuple[dict, str | None]:
    """The published row a table row points to, and the '<paper>/<table>' it is from."""
    if not ref:
        return {}, None
    parts = str(ref).split("/")
    if len(parts) == 1:
        if not default:
            raise ValueError(f"row paper={ref!r} needs the table's `published: <paper>/<table>`")
        paper, table, row = *default.split("/"), parts[0]
    elif len(parts) == 3:
        paper, table, row = parts
    else:
        raise ValueError(f"paper reference {ref!r}: want <row> or <paper>/<table>/<row>")
    try:
        values = published[paper]["tables"][table]["rows"][row]
    except KeyError as error:
        raise KeyError(f"no published row {paper}/{table}/{row} in published.yaml") from error
    return values, f"{paper}/{table}"


def _source_line(published: dict[str, Any], ref: str) -> str:
    paper, table = ref.split("/")
    entry = published[paper]
    table_entry = entry["tables"][table]
    line = f"{entry['title']} (arXiv {entry['arxiv']}): {table_entry['source']}."
    return f"{line} Note: {table_entry['notes']}." if table_entry.get("notes") else line


def _weighted(results: list[dict[str, Any]], source: str) -> float | None:
    """Sample-weighted mean of an efficiency number over the results a row uses."""
    total = weight = 0.0
    for r in results:
        summary = efficiency(r)
        if source == "visual_tokens":  # inside the LLM: the count averaged over the LLM's layers
            value = summary.get("visual_tokens_layer_avg", summary.get("visual_tokens_mean"))
        else:
            value = summary.get(source)
        if value is None:
            continue
        n = max(1, int(summary.get("samples") or 1) - int(summary.get("failed_samples") or 0))
        total, weight = total + float(value) * n, weight + n
    return total / weight if weight else None


def label_of(template: str, result: dict[str, Any]) -> str:
    def one(match: re.Match) -> str:
        value = value_at(result, match.group(1))
        return "" if value is None else str(value)

    return re.sub(r"\s+", " ", re.sub(r"\{([^{}]+)\}", one, template)).replace("()", "").strip()


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


ROW_KEYS = {"label", "section", "where", "cells", "paper", "note"}


def _row_specs(spec: dict[str, Any], candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if spec.get("rows"):
        for row in spec["rows"]:
            unknown = sorted(set(row) - ROW_KEYS)
            if unknown:  # e.g. an unquoted label with a comma in a YAML flow mapping: `{label: a, b}`
                raise ValueError(
                    f"table row {row.get('label')!r} has unknown keys {unknown} (allowed: {sorted(ROW_KEYS)}); "
                    "quote a label that holds a comma"
                )
        return list(spec["rows"])
    template = spec.get("group_by")
    if not template:
        raise ValueError("a table needs `rows` or `group_by`")
    groups: dict[str, list[str]] = {}
    for r in candidates:
        groups.setdefault(label_of(template, r), []).append(r["name"])
    return [
        {"label": label, "names": names}
        for label, names in sorted(groups.items(), key=lambda g: _natural(g[0]))
    ]


def build_table(
    name: str, spec: dict[str, Any], results: list[dict[str, Any]], published: dict[str, Any]
) -> Table:
    """Compute every cell of an experiment's table from result dicts (see the package docstring)."""
    columns = table_columns(spec)
    base_where = dict(spec.get("where") or {})
    candidates = [r for r in results if matches(r, base_where)]
    sources: list[str] = []
    notes: list[str] = []
    rows: list[Row] = []
    for row_spec in _row_specs(spec, candidates):
        label = str(row_spec["label"])
        where = {**base_where, **(row_spec.get("where") or {})}
        pool = candidates
        if "names" in row_spec:  # a group_by row: exactly its results
            pool = [r for r in candidates if r["name"] in row_spec["names"]]
        paper_values, source = paper_row(published, spec.get("published"), row_spec.get("paper"))
        if source and source not in sources:
            sources.append(source)
        row = Row(label, row_spec.get("section"), {}, {}, [])
        half_widths: dict[str, float | None] = {}  # metric column id -> its ci half-width
        used: list[dict[str, Any]] = []
        ambiguous: dict[tuple[int, str], list[str]] = {}
        for col in columns:
            row.paper[col.id] = _number(paper_values.get(col.published)) if col.published else None
            if col.kind not in ("metric", "relative"):
                continue
            cell_where = {**where, **((row_spec.get("cells") or {}).get(col.id) or {})}
            result, n = _pick(pool, cell_where, col.metric)
            if n > 1:
                ambiguous.setdefault((n, result["name"]), []).append(col.label)
            value = None if result is None else float(result["metrics"][col.metric])
            if result is not None and result not in used:
                used.append(result)
                if result["name"] not in row.results:
                    row.results.append(result["name"])
            if result is not None and col.kind == "relative":
                base, _ = _pick(results, {**cell_where, **col.relative_to}, col.metric)
                base_value = None if base is None else float(base["metrics"][col.metric])
                value = 100.0 * value / base_value if base_value else None
                if base is not None and base["name"] not in row.results:
                    row.results.append(base["name"])
            elif value is not None:
                value *= col.scale
                interval = (result.get("bootstrap") or {}).get(col.metric)
                if interval is not None:
                    half_widths[col.id] = (interval["high"] - interval["low"]) / 2 * col.scale
            row.ours[col.id] = value
        note = str(row_spec.get("note") or "")
        if note and ("{" not in note or used):  # `{dotted.key}`: the row's first result's values
            row.notes.insert(0, label_of(note, used[0]) if "{" in note else note)
        for (n, chosen), labels in ambiguous.items():
            row.notes.append(f"{n} results match ({', '.join(labels)}); the newest is used: {chosen}")
        partial = [r for r in results if r["name"] in row.results and is_partial(r)]
        if partial:
            row.label = f"{row.label} {PARTIAL}"
            for r in partial:
                row.notes.append(
                    f"{PARTIAL} partial result {r['name']}: {coverage_text(r)}, not comparable with full runs"
                )
        for col in columns:
            if col.kind == "mean":
                parts = [row.ours.get(i) for i in col.mean_of]
                row.ours[col.id] = sum(parts) / len(parts) if parts and None not in parts else None
            elif col.kind == "ci":
                row.ours[col.id] = half_widths.get(col.ci_of or "")
            elif col.kind == "efficiency":
                source_key = next(s for cid, _, s, _ in EFFICIENCY if cid == col.id)
                row.ours[col.id] = _weighted(used, source_key)
        rows.append(row)
    for col in columns:
        if col.note:
            notes.append(f"{col.label}: {col.note}.")
    return Table(
        name=name,
        title=str(spec.get("title", name)),
        columns=columns,
        rows=rows,
        sources=[_source_line(published, s) for s in sources],
        notes=notes,
    )


def _number(value: Any) -> float | None:
    return None if value is None else float(value)
