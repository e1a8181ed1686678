"""Bootstrap confidence intervals over questions: one per score, and paired for two methods.

Both resample question indices with replacement (`resamples` times, a seeded generator), so an
interval says how much a score (or a difference) moves with the benchmark's question sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    if n == 0:
        raise ValueError("a bootstrap needs at least one scored question")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # [R, n]


def bootstrap_ci(
    scores: Sequence[float],
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile interval of `statistic` (default: the mean; it maps [R, n] -> [R]) over resamples."""
    values = np.asarray(scores, dtype=np.float64)
    picked = values[_indices(len(values), resamples, seed)]  # [R, n] (or [R, n, k] for rows)
    stats = statistic(picked) if statistic is not None else picked.mean(axis=1)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean(a - b), low, high): the difference of two methods' per-question scores on the same
    questions, with the percentile interval of the difference over resampled question sets."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired scores need the same questions: {x.shape} vs {y.shape}")
    difference = x - y
    low, high = bootstrap_ci(difference, resamples=resamples, level=level, seed=seed)
    return float(difference.mean()), low, high


# ------------------------------------------------------------------ lmms-eval's per-document scores
def doc_scores(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[int, Any]]:
    """`bench/<task>/<metric>` -> {doc_id: per-document value} from lmms-eval's logged samples.

    A value is a float (e.g. `exact_match`) or, for POPE, a dict with the document's `score`,
    `prediction` and `ground_truth`.
    """
    out: dict[str, dict[int, Any]] = {}
    for task, logged in samples.items():
        for sample in logged:
            for metric, value in sample.items():
                if metric in _LOGGED_FIELDS:
                    continue
                if isinstance(value, bool | int | float) or (isinstance(value, dict) and "score" in value):
                    out.setdefault(f"bench/{task}/{metric}", {})[int(sample["doc_id"])] = value
    return out


_LOGGED_FIELDS = frozenset(
    {
        "doc_id",
        "doc",
        "target",
        "arguments",
        "resps",
        "filtered_resps",
        "token_counts",
        "doc_hash",
        "input_media",
    }
)


def _yes_f1(rows: np.ndarray) -> np.ndarray:
    """POPE's F1 of "yes" per resample; rows [R, n, 2] = (said yes, truly yes)."""
    said, truth = rows[..., 0], rows[..., 1]
    tp = (said * truth).sum(axis=1)
    return 2 * tp / np.maximum(1.0, said.sum(axis=1) + truth.sum(axis=1))


def _as_rows(metric: str, values: list[Any]) -> tuple[np.ndarray, Callable | None] | None:
    """Per-document numbers for a bootstrap of `metric`, and the statistic (None: the mean)."""
    name = metric.rsplit("/", 1)[-1]
    if all(isinstance(v, bool | int | float) for v in values):
        return np.asarray(values, dtype=np.float64), None
    if name.endswith("accuracy"):
        return np.asarray([v["score"] for v in values], dtype=np.float64), None
    if name == "pope_f1_score":
        rows = [(str(v["prediction"]).startswith("yes"), v["ground_truth"] == "yes") for v in values]
        return np.asarray(rows, dtype=np.float64), _yes_f1
    return None  # precision, recall, yes-ratio: no interval


def score_intervals(scores: dict[str, dict[int, Any]], seed: int = 0) -> dict[str, dict[str, float]]:
    """Per metric with per-document scores: {"low", "high", "n"} (95% bootstrap over documents)."""
    out = {}
    for metric, by_doc in sorted(scores.items()):
        rows = _as_rows(metric, [by_doc[k] for k in sorted(by_doc)])
        if rows is None or len(rows[0]) == 0:
            continue
        low, high = bootstrap_ci(rows[0], rows[1], seed=seed)
        out[metric] = {"low": low, "high": high, "n": len(rows[0])}
    return out


def paired_intervals(
    scores: dict[str, dict[int, Any]], reference: dict[str, dict[int, Any]], seed: int = 0
) -> dict[str, dict[str, float]]:
    """Per mean-type metric: {"diff", "low", "high", "n"} of scores - reference on their common documents."""
    out = {}
    for metric, by_doc in sorted(scores.items()):
        other = reference.get(metric) or {}
        common = sorted(set(by_doc) & set(other))
        if not common:
            continue
        mine, theirs = (
            _as_rows(metric, [by_doc[k] for k in common]),
            _as_rows(metric, [other[k] for k in common]),
        )
        if mine is None or theirs is None or mine[1] is not None:
            continue
        diff, low, high = paired_bootstrap(mine[0], theirs[0], seed=seed)
        out[metric] = {"diff": diff, "low": low, "high": high, "n": len(common)}
    return out
