"""Bootstrap intervals over benchmark documents (tokenprune/eval/bootstrap.py) and their table column."""

from __future__ import annotations

import numpy as np
import pytest
from lmms_eval.tasks.pope.utils import pope_aggregate_f1_score, pope_process_results

from tokenprune.eval.bootstrap import (
    bootstrap_ci,
    doc_scores,
    paired_bootstrap,
    paired_intervals,
    score_intervals,
)
from tokenprune.tables.build import build_table


def _resampled_means(values, resamples=2000, seed=0):
    """An independent loop over resamples: the mean of each resampled set."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    return np.array([np.mean([values[i] for i in row]) for row in picks])


def test_interval_is_the_percentile_interval_of_resampled_means():
    scores = [1.0] * 30 + [0.0] * 20
    low, high = bootstrap_ci(scores)
    want = np.quantile(_resampled_means(scores), [0.025, 0.975])
    assert (low, high) == pytest.approx(tuple(want))
    assert low < 0.6 < high and high - low == pytest.approx(2 * 1.96 * np.sqrt(0.24 / 50), abs=0.03)


def test_paired_interval_of_a_difference_excludes_zero_only_when_it_should():
    rng = np.random.default_rng(1)
    a = (rng.random(400) < 0.8).astype(float)
    better = np.where(rng.random(400) < 0.25, 0.0, a)  # b loses a quarter of a's hits
    diff, low, high = paired_bootstrap(a, better)
    assert diff == pytest.approx(a.mean() - better.mean()) and 0 < low <= diff <= high
    same = paired_bootstrap(a, a)
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same questions"):
        paired_bootstrap(a, a[:-1])


def _pope_samples(predictions, truths):
    docs = [{"question_id": str(i), "answer": t} for i, t in enumerate(truths)]
    return [
        {"doc_id": i, "doc": doc, **pope_process_results(doc, [p])}
        for i, (doc, p) in enumerate(zip(docs, predictions))
    ]


def test_pope_f1_interval_recomputes_lmms_evals_f1_on_resamples():
    rng = np.random.default_rng(2)
    truths = ["yes" if x else "no" for x in rng.random(120) < 0.5]
    predictions = [t if r < 0.8 else ("no" if t == "yes" else "yes") for t, r in zip(truths, rng.random(120))]
    samples = _pope_samples(predictions, truths)
    scores = doc_scores({"shapes_pope": samples})
    intervals = score_intervals(scores)
    f1 = pope_aggregate_f1_score([s["pope_f1_score"] for s in samples])
    accuracy = np.mean([p == t for p, t in zip(predictions, truths)])
    assert (
        intervals["bench/shapes_pope/pope_f1_score"]["low"]
        < f1
        < intervals["bench/shapes_pope/pope_f1_score"]["high"]
    )
    assert (
        intervals["bench/shapes_pope/pope_accuracy"]["low"]
        < accuracy
        < intervals["bench/shapes_pope/pope_accuracy"]["high"]
    )
    assert "bench/shapes_pope/pope_precision" not in intervals  # not a per-document mean: no interval
    full = doc_scores({"shapes_pope": _pope_samples(truths, truths)})
    paired = paired_intervals(scores, full)["bench/shapes_pope/pope_accuracy"]
    assert paired["diff"] == pytest.approx(accuracy - 1.0) and paired["high"] < 0 and paired["n"] == 120


def test_ci_column_shows_the_half_width_on_the_columns_scale():
    result = {
        "name": "r1",
        "choices": {"reducer": "none"},
        "metrics": {"bench/shapes_vqa/exact_match": 0.5},
        "bootstrap": {"bench/shapes_vqa/exact_match": {"low": 0.46, "high": 0.54, "n": 1000}},
    }
    spec = {
        "columns": [
            {"id": "vqa", "label": "VQA", "metric": "bench/shapes_vqa/exact_match", "scale": 100},
            {"id": "vqa_ci", "label": "± ci", "ci_of": "vqa"},
        ],
        "rows": [{"label": "none", "where": {"reducer": "none"}}],
        "efficiency": False,
    }
    table = build_table("t", spec, [result], {})
    assert table.rows[0].ours["vqa"] == pytest.approx(50.0) and table.rows[0].ours["vqa_ci"] == pytest.approx(
        4.0
    )
    assert table.columns[1].kind == "ci" and table.columns[1].best is None
    del result["bootstrap"]  # results written before the intervals existed: an empty cell
    assert build_table("t", spec, [result], {}).rows[0].ours["vqa_ci"] is None
