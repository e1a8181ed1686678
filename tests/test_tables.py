"""Tables and plots from result files: golden Markdown/LaTeX on fixture results, plotted points, selectors.

Regenerate the golden files after an intended change with
`TOKENPRUNE_UPDATE_GOLDEN=1 pytest tests/test_tables.py` (and the fixtures with
`python tests/fixtures/results/make_fixtures.py`); review the diff.
"""

from __future__ import annotations

import json
import os

import pytest

from tokenprune.config import PROJECT_ROOT
from tokenprune.tables import build_table, load_published, matches, render_markdown
from tokenprune.tables.__main__ import experiment_spec, load_results, main, make

FIXTURES = PROJECT_ROOT / "tests" / "fixtures" / "results"
GOLDEN = PROJECT_ROOT / "tests" / "golden" / "tables"
GOLDEN_EXPERIMENTS = ["prumerge_main_released", "prumerge_ablation_sampling"]


@pytest.mark.parametrize("experiment", GOLDEN_EXPERIMENTS)
def test_tables_match_the_golden_files(experiment, tmp_path):
    make(experiment, [f"paths.results={FIXTURES}", f"paths.outputs={tmp_path}"], plots=False)
    for ext in ("md", "tex"):
        got = (tmp_path / "tables" / f"{experiment}.{ext}").read_text(encoding="utf-8")
        golden = GOLDEN / f"{experiment}.{ext}"
        if os.environ.get("TOKENPRUNE_UPDATE_GOLDEN"):
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(got, encoding="utf-8")
        assert got == golden.read_text(encoding="utf-8"), (
            f"{golden} differs (TOKENPRUNE_UPDATE_GOLDEN=1 updates)"
        )


def _fixture(name_start: str) -> dict:
    (path,) = [p for p in FIXTURES.glob(f"{name_start}*.json")]
    return json.loads(path.read_text())


def test_table_cells_are_the_result_values_and_the_paper_numbers():
    spec, _ = experiment_spec("prumerge_main_released")
    table = build_table("prumerge_main_released", spec["table"], load_results(FIXTURES), load_published())
    prumerge_7b = table.rows[2]
    assert prumerge_7b.label == "+ PruMerge"
    result = _fixture("llava15_7b-prumerge-llava_suite")
    assert prumerge_7b.ours["pope"] == pytest.approx(100 * result["metrics"]["bench/pope/pope_f1_score"])
    assert prumerge_7b.ours["mme"] == result["metrics"]["bench/mme/mme_perception_score"]
    assert prumerge_7b.ours["tokens"] == result["efficiency"]["visual_tokens_mean"]
    assert prumerge_7b.ours["flops_ratio"] == pytest.approx(result["eff"]["eff/prefill_flops_ratio"])
    assert (prumerge_7b.paper["vqav2"], prumerge_7b.paper["tokens"]) == (72.0, 32.0)  # published.yaml
    assert prumerge_7b.results == [result["name"]]
    # a missing metric and a missing row are missing cells, not errors
    assert table.rows[6].ours["mmbench"] is None and table.rows[6].ours["mme"] is not None
    assert all(v is None for k, v in table.rows[7].ours.items())
    # two results for one row: the newest is used and a note says so
    newest = max(
        FIXTURES.glob("llava15_13b-none-*.json"), key=lambda p: json.loads(p.read_text())["run"]["finished"]
    )
    assert table.rows[5].results == [newest.stem] and "2 results match" in table.rows[5].notes[-1]


def test_tables_are_a_pure_function_of_the_result_files(tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in FIXTURES.glob("*.json")}
    main(
        [
            "experiment=prumerge_main_released",
            f"paths.results={FIXTURES}",
            f"paths.outputs={tmp_path / 'a'}",
            "plots=false",
        ]
    )
    main(
        [
            "experiment=prumerge_main_released",
            f"paths.results={FIXTURES}",
            f"paths.outputs={tmp_path / 'b'}",
            "plots=false",
        ]
    )
    for ext in ("md", "tex"):
        a = (tmp_path / "a" / "tables" / f"prumerge_main_released.{ext}").read_bytes()
        assert a == (tmp_path / "b" / "tables" / f"prumerge_main_released.{ext}").read_bytes()
    assert before == {p.name: p.stat().st_mtime_ns for p in FIXTURES.glob("*.json")}


def test_markdown_marks_missing_cells_and_bolds_the_best(tmp_path):
    spec, _ = experiment_spec("prumerge_ablation_sampling")
    table = build_table("s", spec["table"], load_results(FIXTURES), load_published())
    text = render_markdown(table)
    iqr, sequential, uniform = text.split("\n")[5:8]
    assert iqr.startswith("| PruMerge (IQR) | **54.13** | **54.00** | +0.13 |")
    assert sequential.startswith("| Sequential (first N) | — | 42.72 |  |")  # no reducer: paper only
    # the uniform cell takes the 40-token run, not the uniform run at 144 tokens on the same benchmark
    assert uniform.startswith("| Spatial uniform | 47.21 | 46.85 | +0.36 |")


def test_selectors():
    result = {
        "choices": {"model": "m", "reducer": "uniform"},
        "config": {"reducer": {"keep": 40, "ratio": None}},
    }
    assert matches(result, {"reducer": "uniform", "reducer.keep": 40.0})
    assert matches(result, {"reducer": ["random", "uniform"], "reducer.ratio": None, "reducer.merge": None})
    assert not matches(result, {"reducer.keep": 35})
    assert not matches(result, {"reducer.merge": "none"})
    assert not matches(result, {"train": "none"})  # a choice the result does not have


def test_every_paper_reference_resolves():
    published = load_published()
    for paper in published.values():
        assert paper["arxiv"] and paper["title"]
        for table in paper["tables"].values():
            assert table["source"] and table["rows"]
    from tokenprune.config import group_options

    for name in group_options("experiment"):
        spec, _ = experiment_spec(name)  # a config the experiment names but lacks fails here
        build_table(name, spec["table"], [], published)  # raises on a dangling `paper:` reference


def test_plots_are_written_and_show_the_result_values(tmp_path):
    from tokenprune.tables.build import table_columns
    from tokenprune.tables.plots import collect_points, figure, write_plots

    spec, _ = experiment_spec("prumerge_main_released")
    results = load_results(FIXTURES)
    written = write_plots("prumerge_main_released", spec, results, load_published(), tmp_path)
    ids = ["vqav2", "sqa", "textvqa", "pope", "mme", "mmbench"]
    assert sorted(p.name for p in written) == sorted(f"{i}.{e}" for i in ids for e in ("png", "pdf"))
    assert all(p.stat().st_size > 1000 for p in written)
    assert (tmp_path / "pope.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "pope.pdf").read_bytes()[:5] == b"%PDF-"

    points = collect_points(spec, results)
    lora = [r for r in results if r["choices"]["train"] == "lora_paper"]
    expected = sorted(
        (r["efficiency"]["visual_tokens_mean"], 100 * r["metrics"]["bench/pope/pope_f1_score"]) for r in lora
    )
    got = sorted((x, y) for series in points["pope"].values() for x, y, _ in series)
    assert [v for p in got for v in p] == pytest.approx([v for p in expected for v in p])
    col = {c.id: c for c in table_columns(spec["table"])}["pope"]
    fig = figure(col, points["pope"], [], "t")
    lines = {line.get_label(): line.get_xydata().tolist() for line in fig.axes[0].lines}
    for label, series in points["pope"].items():
        assert [v for xy in lines[label] for v in xy] == pytest.approx(
            [v for x, y, _ in series for v in (x, y)]
        )
    assert "Pareto front (ours)" in lines

    again = write_plots("prumerge_main_released", spec, results, load_published(), tmp_path / "again")
    for a, b in zip(sorted(written), sorted(again)):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} is not deterministic"


def test_pareto_front():
    from tokenprune.tables.plots import pareto_front

    points = [(576, 80.0), (32, 70.0), (144, 78.0), (144, 75.0), (300, 77.0), (40, 69.0)]
    assert pareto_front(points) == [(32, 70.0), (144, 78.0), (576, 80.0)]


def test_unknown_experiment_is_an_error():
    from hydra.errors import HydraException

    with pytest.raises(HydraException):
        main(["experiment=no_such_experiment"])


def _result(name: str, reducer: str, metrics: dict, tokens: float, **config) -> dict:
    return {
        "name": name,
        "run": {"finished": f"2026-01-01T00:00:{len(name):02d}+00:00"},
        "choices": {"model": "m", "reducer": reducer, "benchmark": "b", "train": "none"},
        "config": {"reducer": config},
        "metrics": metrics,
        "efficiency": {"visual_tokens_mean": tokens, "samples": 10, "failed_samples": 0},
        "eff": {"eff/prefill_flops_ratio": tokens / 576},
    }


def test_relative_and_mean_columns():
    results = [
        _result("full", "mapper", {"bench/a/x": 0.80, "bench/b/y": 50.0}, 576, ratio=1.0),
        _result("half", "mapper", {"bench/a/x": 0.76, "bench/b/y": 45.0}, 288, ratio=0.5),
        _result("quarter", "mapper", {"bench/a/x": 0.60}, 144, ratio=0.25),
    ]
    spec = {
        "where": {"reducer": "mapper"},
        "columns": [
            {"id": "a", "metric": "bench/a/x", "relative_to": {"reducer.ratio": 1.0}},
            {"id": "b", "metric": "bench/b/y", "relative_to": {"reducer.ratio": 1.0}},
            {"id": "kept", "mean_of": ["a", "b"]},
        ],
        "rows": [
            {"label": "50%", "where": {"reducer.ratio": 0.5}},
            {"label": "25%", "where": {"reducer.ratio": 0.25}},
        ],
    }
    half, quarter = build_table("t", spec, results, load_published()).rows
    assert (half.ours["a"], half.ours["b"], half.ours["kept"]) == pytest.approx((95.0, 90.0, 92.5))
    assert half.results == ["half", "full"] and half.ours["tokens"] == 288
    assert (
        quarter.ours["a"] == pytest.approx(75.0)
        and quarter.ours["b"] is None
        and quarter.ours["kept"] is None
    )


def test_group_by_rows_are_one_per_label_in_natural_order():
    results = [_result(f"u{k}", "uniform", {"bench/a/x": k / 1000}, k, keep=k) for k in (144, 16, 36)] + [
        _result("p", "prumerge", {"bench/a/x": 0.5}, 30)
    ]
    spec = {
        "columns": [{"id": "a", "metric": "bench/a/x", "scale": 100}],
        "group_by": "{reducer} ({reducer.keep})",
    }
    table = build_table("t", spec, results, load_published())
    assert [r.label for r in table.rows] == ["prumerge", "uniform (16)", "uniform (36)", "uniform (144)"]
    assert [r.ours["a"] for r in table.rows] == pytest.approx([50.0, 1.6, 3.6, 14.4])
    assert "| prumerge | **50.0** |" in render_markdown(table)


def test_publish_splices_the_table_between_its_markers_and_copies_the_plot(tmp_path):
    from tokenprune.tables.publish import markers, publish

    name = "prumerge_main_released"
    spec, _ = experiment_spec(name)
    table = build_table(name, spec["table"], load_results(FIXTURES), load_published())
    start, end = markers(name)
    page = tmp_path / "README.md"
    page.write_text(f"# before\n\n{start}\nold table\n{end}\n\nafter\n", encoding="utf-8")
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "pope.png").write_bytes(b"\x89PNG fake")
    spec = {"markdown": ["README.md"], "columns": ["pope", "tokens"], "plots": {"pope": "img/pope.png"}}

    written = publish(table, spec, plots, root=tmp_path)
    assert written == [page, tmp_path / "img" / "pope.png"]
    assert (tmp_path / "img" / "pope.png").read_bytes() == b"\x89PNG fake"
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"# before\n\n{start}\n<!-- generated by") and text.endswith(f"{end}\n\nafter\n")
    assert "old table" not in text and "Result files:" not in text  # the file list stays in outputs/
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    assert header.startswith("| Method | POPE | POPE paper | POPE Δ | Tokens |")  # the chosen columns only
    prumerge = next(line for line in text.splitlines() if line.startswith("| + PruMerge |"))
    assert f"{table.rows[2].ours['pope']:.1f}" in prumerge

    publish(table, spec, plots, root=tmp_path)  # again: same text, the markers still there once
    assert page.read_text(encoding="utf-8") == text


@pytest.mark.parametrize(
    ("page", "spec", "error"),
    [
        ("no markers here\n", {"markdown": ["README.md"]}, "must hold the markers"),
        (
            "<!-- table:prumerge_main_released -->\n<!-- /table:prumerge_main_released -->\n",
            {"markdown": ["README.md"], "columns": ["nope"]},
            "publish.columns names \\['nope'\\]",
        ),
        ("", {"plots": {"vqa": "x.png"}}, "no plot"),
    ],
)
def test_publish_names_what_is_missing(tmp_path, page, spec, error):
    from tokenprune.tables.publish import publish

    spec_, _ = experiment_spec("prumerge_main_released")
    table = build_table("prumerge_main_released", spec_["table"], [], load_published())
    (tmp_path / "README.md").write_text(page, encoding="utf-8")
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        publish(table, spec, tmp_path, root=tmp_path)


def test_published_experiments_have_their_markers_in_the_repository():
    from tokenprune.config import group_options
    from tokenprune.tables.publish import markers

    published = 0
    for name in group_options("experiment"):
        spec, _ = experiment_spec(name)
        for rel in (spec.get("publish") or {}).get("markdown") or []:
            text = (PROJECT_ROOT / rel).read_text(encoding="utf-8")
            assert all(text.count(marker) == 1 for marker in markers(name)), (rel, name)
            published += 1
    assert published >= 3  # mini_shapes in README.md and docs/experiments.md, mini_shapes_peers


def test_a_row_with_an_unknown_key_is_an_error():
    """An unquoted label with a comma in a YAML flow mapping splits into a second key."""
    spec = {"columns": [], "rows": [{"label": "SparseVLM (layer avg", "cuts 1/2/3)": None}]}
    with pytest.raises(ValueError, match=r"unknown keys \['cuts 1/2/3\)'\].*quote a label"):
        build_table("t", spec, [], {})
