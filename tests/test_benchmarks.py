"""Every benchmark config runs on its fixture end to end, scored by lmms-eval's own code.

The fixtures (tests/fixtures/benchmarks/<dataset id>/, made by scripts/make_benchmark_fixtures.py)
are local copies of the real datasets' repositories in their schemas, so `paths.data_root` points
at them exactly as it would at real downloads. One lmms-eval TaskManager and one tiny LLaVA are
shared by the whole module.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from transformers import LlamaConfig

from tokenprune.config import PROJECT_ROOT, compose, group_options
from tokenprune.models.base import Capabilities
from tokenprune.reducers.baselines import NoReduction

FIXTURES = PROJECT_ROOT / "tests" / "fixtures" / "benchmarks"
IMAGE_CONFIGS = ["vqav2", "sqa", "textvqa", "pope", "mme", "mmbench", "gqa"]
VIDEO_CONFIGS = ["videomme", "mvbench", "egoschema", "nextqa"]
SUITES = {"llava_suite": IMAGE_CONFIGS, "video_suite": VIDEO_CONFIGS}
SUBMISSION_ONLY = {"vqav2_test"}  # writes the EvalAI file, no local score
# metric -> its value for perfect answers
PERFECT = {
    "exact_match": 1.0,
    "score": 1.0,
    "gpt_eval_score": 100.0,
    "mme_perception_score": 200.0,  # acc + acc+ of the one perception category in the fixture
    "mme_cognition_score": 200.0,
    "mvbench_accuracy": 100.0,
    "videomme_perception_score": 100.0,
    "pope_accuracy": 1.0,
    "pope_precision": 1.0,
    "pope_recall": 1.0,
    "pope_f1_score": 1.0,
    "pope_yes_ratio": 0.5,  # lmms-eval counts ground-truth yes
}


def _fixtures_module() -> Any:
    name = "_tp_make_benchmark_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, PROJECT_ROOT / "scripts" / "make_benchmark_fixtures.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No hub, a private datasets cache and an empty HF_HOME (nothing cached: local copies only)."""
    from lmms_eval.api import task as task_mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("LOGURU_LEVEL", "WARNING")
        mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets_cache")))
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        task_mod._resolve_hf_datasets_cache_dir.cache_clear()
        yield
    task_mod._resolve_hf_datasets_cache_dir.cache_clear()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread per test worker avoids oversubscribing the cores under xdist."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def manager(offline):
    from lmms_eval.tasks import TaskManager

    return TaskManager()


@pytest.fixture(scope="module")
def model(tiny_llava_path):
    from tokenprune.models.llava import LlavaAdapter

    return LlavaAdapter.from_pretrained(tiny_llava_path, dtype="float32", device="cpu")


def benchmark(name: str, *overrides: str):
    cfg = compose([f"benchmark={name}", f"paths.data_root={FIXTURES}", *overrides])
    return instantiate(cfg.benchmark)


@functools.cache
def _oracle_table() -> dict[str, str]:
    return _fixtures_module().build_oracle()


class Oracle:
    """An adapter that answers each fixture question perfectly (from the fixture generator's table)."""

    capabilities = Capabilities(
        family="oracle",
        supports_video=False,
        supports_training=False,
        supports_visualize=False,
        image_aspects=("pad", "crop"),
    )
    device = torch.device("cpu")
    image_aspect = "pad"
    model = SimpleNamespace(config=SimpleNamespace(text_config=LlamaConfig(num_hidden_layers=2)))

    def vision_flops(self) -> None:
        return None

    def __init__(self) -> None:
        self.reducer = NoReduction()
        self.table = _oracle_table()
        self.seen: list[tuple[str, int, str]] = []  # prompt, images, image_aspect

    def answer(self, prompt: str) -> str:
        keys = [k for k in self.table if all(part in prompt for part in k.split(" || "))]
        assert keys, f"no fixture question in prompt {prompt!r}"
        return self.table[max(keys, key=lambda k: len(k.split(" || ")))]

    def generate(self, questions, images, max_new_tokens=16, timing=None, **kwargs):
        self.seen += [(q, len(i), self.image_aspect) for q, i in zip(questions, images)]
        if timing is not None:
            timing.update(
                encode_ms=1.0, prefill_ms=2.0, decode_ms=0.0, decode_steps=0, total_ms=3.0, timer="wall_clock"
            )
            timing.update(text_tokens=[20] * len(questions), new_tokens=[1] * len(questions))
        return [self.answer(q) for q in questions], [576 * len(i) for i in images]


# ----------------------------------------------------------------------------- configs
def test_every_task_has_a_config_and_the_suites_match_them():
    options = set(group_options("benchmark"))
    assert set(IMAGE_CONFIGS + VIDEO_CONFIGS + ["activitynetqa", "llava_suite", "video_suite"]) <= options
    for suite, members in SUITES.items():
        combined = benchmark(suite)
        tasks, overrides, aggregates = [], {}, {}
        for name in members:
            single = benchmark(name)
            tasks += single.tasks
            overrides.update(single.task_overrides)
            aggregates.update(single.aggregates)
            assert single.prompt == combined.prompt and single.batch_size == combined.batch_size
        assert combined.tasks == tasks and combined.task_overrides == overrides
        assert combined.aggregates == aggregates
    assert benchmark("vqav2").tasks == ["vqav2_val", "vqav2_test"]
    assert benchmark("pope").aggregates["pope"]["tasks"] == ["pope_adv", "pope_pop", "pope_random"]
    assert benchmark("mmbench").tasks == ["mmbench_en_dev_static"]  # local scoring, no GPT judge
    assert benchmark("llava_suite").prompt == "llava15" and benchmark("video_suite").prompt == "lmms_eval"


@pytest.mark.integration  # lmms-eval's task index and evaluator
def test_fixtures_are_in_the_real_schemas(manager):
    """Every task resolves to its local fixture copy, whose columns are the dataset card's."""
    import datasets

    from tokenprune.data.schemas import schemas as fixture_schemas
    from tokenprune.eval.data import task_yaml
    from tokenprune.eval.runner import resolve_tasks

    schemas = fixture_schemas()
    expect = {
        "vqav2_val": "vqav2",
        "vqav2_test": "vqav2",
        "scienceqa_img": "scienceqa",
        "textvqa_val": "textvqa",
        "pope_adv": "pope",
        "mme": "mme",
        "mmbench_en_dev_static": "mmbench",
        "gqa": "gqa_instructions",
        "videomme": "videomme",
        "egoschema_subset": "egoschema",
        "nextqa_mc_test": "nextqa_mc",
    }
    for suite in SUITES:
        specs, where = resolve_tasks(benchmark(suite), manager)
        assert {info["source"] for info in where.values()} == {"local"}
        for spec in specs:
            task = spec["task"]
            config = task_yaml(manager, task)
            loaded = datasets.load_dataset(
                spec["dataset_path"], config.get("dataset_name"), split=spec["test_split"]
            )
            if task in expect:
                assert loaded.features == schemas[expect[task]], task
            elif task.startswith("mvbench_"):
                assert set(loaded.column_names) == {"video", "question", "candidates", "answer"}


# ----------------------------------------------------------------------------- scoring
@pytest.mark.integration  # lmms-eval's task index and evaluator
@pytest.mark.parametrize("suite", list(SUITES))
def test_suite_scores_perfect_answers_at_every_metrics_maximum(suite, manager, tmp_path):
    from tokenprune.eval.runner import evaluate

    oracle = Oracle()
    out = evaluate(
        oracle,
        benchmark(suite),
        samples_path=tmp_path / "s.jsonl",
        artifacts_dir=tmp_path / "files",
        task_manager=manager,
    )
    assert out["failures"] == []
    tasks = set(benchmark(suite).tasks) - SUBMISSION_ONLY
    reported = {key.split("/")[1] for key in out["metrics"]}
    assert tasks <= reported
    for key, value in out["metrics"].items():
        assert value == pytest.approx(PERFECT[key.rsplit("/", 1)[1]]), key
    if suite == "llava_suite":
        assert out["metrics"]["bench/pope/pope_f1_score"] == 1.0  # LLaVA's F1 averaged over the 3 splits
        submissions = {
            p.name.split("-")[0].split("_")[0] for p in (tmp_path / "files" / "submissions").iterdir()
        }
        assert {"vqav2", "textvqa", "mmbench"} <= submissions  # VQAv2 test-dev file for EvalAI
        aspects = {q.split("\n")[0]: a for q, _n, a in oracle.seen}
        assert aspects["Context: The picture shows one shape."] == "crop"  # SQA: LLaVA's plain CLIP crop
        assert aspects["Is there a circle?"] == "pad"
    else:
        assert {n for _q, n, _a in oracle.seen} == {6}  # video_frames frames per video, as images
        assert out["metrics"]["bench/mvbench/mvbench_accuracy"] == 100.0
    assert out["efficiency"]["samples"] == len(out["samples"]) and out["efficiency"]["timer"] == "wall_clock"


@pytest.mark.integration  # lmms-eval's task index and evaluator
def test_llava15_prompts_differ_from_lmms_eval_where_llava_did(manager, tmp_path):
    from tokenprune.eval.runner import evaluate

    prompts = {}
    for mode in ("llava15", "lmms_eval"):
        oracle = Oracle()
        bench = benchmark(
            "llava_suite",
            f"benchmark.prompt={mode}",
            "benchmark.tasks=[textvqa_val,mmbench_en_dev_static,vqav2_val]",
        )
        evaluate(oracle, bench, artifacts_dir=tmp_path / mode, task_manager=manager)
        prompts[mode] = [q for q, _n, _a in oracle.seen]
    llava, lmms = prompts["llava15"], prompts["lmms_eval"]
    short = "\nAnswer the question using a single word or phrase."
    assert "What word is written on the card?\nReference OCR token: stop, sign" + short in llava
    assert "What word is written on the card?" + short in lmms
    assert (
        "The image shows one shape.\nWhich shape is it?\nA. square\nB. triangle\nC. circle\n"
        "Answer with the option's letter from the given choices directly." in llava
    )
    assert any(
        q.startswith("The image shows one shape. Which shape is it? There are several options:") for q in lmms
    )
    assert "What color is the square?" + short in llava and "What color is the square?" + short in lmms


# ----------------------------------------------------------------------------- tiny LLaVA
CASES = [
    pytest.param(name, marks=pytest.mark.slow) if name in VIDEO_CONFIGS else name
    for name in IMAGE_CONFIGS + VIDEO_CONFIGS
]


@pytest.mark.integration  # lmms-eval's task index and evaluator
@pytest.mark.parametrize("name", CASES)
def test_task_config_runs_on_its_fixture_with_tiny_llava(name, model, manager):
    from tokenprune.eval.runner import evaluate
    from tokenprune.reducers.baselines import UniformSample
    from tokenprune.reducers.prumerge import PruMergePlus

    video = name in VIDEO_CONFIGS
    # video configs: 2 frames of 16 tokens each keep the 20 MVBench subtasks cheap
    model.reducer = UniformSample(keep=16) if video else PruMergePlus()
    bench = benchmark(
        name,
        "benchmark.limit=2",
        f"benchmark.batch_size={4 if video else 2}",
        "benchmark.video_frames=2",
        "benchmark.gen_kwargs='max_new_tokens=4'",
    )
    out = evaluate(model, bench, task_manager=manager)
    assert out["failures"] == []
    assert {key.split("/")[1] for key in out["metrics"]} >= set(bench.tasks) - SUBMISSION_ONLY
    assert {r["task"] for r in out["samples"]} == set(bench.tasks)
    eff = out["efficiency"]
    assert eff["samples"] == len(out["samples"]) > 0
    assert eff["flops_prefill_mean"] > 0 and 0 < eff["prefill_flops_ratio"] <= 1
    assert eff["prefill_ms_mean"] > 0 and eff["visual_tokens_max"] <= (1152 if name in VIDEO_CONFIGS else 576)
    if name in VIDEO_CONFIGS:
        assert {r["images"] for r in out["samples"]} == {2}


@pytest.mark.integration  # lmms-eval's task index and evaluator
def test_batch_1_and_batch_n_give_identical_answers(model, manager):
    """Through lmms-eval: mixed per-sample token counts (PruMerge+) batched vs one at a time."""
    from tokenprune.eval.runner import evaluate
    from tokenprune.reducers.prumerge import PruMergePlus

    model.reducer = PruMergePlus()
    runs = {}
    for batch in (1, 4):
        bench = benchmark(
            "pope",
            "benchmark.limit=4",
            f"benchmark.batch_size={batch}",
            "benchmark.gen_kwargs='max_new_tokens=6'",
        )
        out = evaluate(model, bench, task_manager=manager)
        runs[batch] = {
            (r["task"], r["doc_id"]): (r["answer"], r["visual_tokens"], r["text_tokens"])
            for r in out["samples"]
        }
        assert out["efficiency"]["batch_size_mean"] == pytest.approx(batch if batch == 1 else 4)
    assert runs[1] == runs[4] and len(runs[1]) == 12
    assert len({tokens for _a, tokens, _t in runs[4].values()}) > 1  # the batches really mix counts


@pytest.mark.integration  # lmms-eval's task index and evaluator
def test_compare_to_full_reports_percent_and_agreement(model, manager, tmp_path):
    from tokenprune.eval.runner import evaluate
    from tokenprune.reducers.baselines import UniformSample

    model.reducer = UniformSample(keep=16)
    bench = benchmark(
        "pope",
        "benchmark.tasks=[pope_adv]",
        "benchmark.limit=3",
        "benchmark.batch_size=3",
        "benchmark.compare_to_full=true",
        "benchmark.compare_batch_size=1",
        "benchmark.gen_kwargs='max_new_tokens=3'",
    )
    out = evaluate(model, bench, samples_path=tmp_path / "r.samples.jsonl", task_manager=manager)
    metrics = out["metrics"]
    # the batch-1 pass: same reducer, one request at a time, compared answer by answer
    alone = {r["doc_id"]: r for r in out["batch_samples"]}
    assert {r["batch"]["size"] for r in alone.values()} == {1} and {
        r["batch"]["size"] for r in out["samples"]
    } == {3}
    batch_same = sum(r["answer"] == alone[r["doc_id"]]["answer"] for r in out["samples"]) / 3
    assert metrics["batch_agreement/pope_adv"] == pytest.approx(batch_same) == 1.0  # batching changes nothing
    assert metrics["batch_agreement/batch_size"] == 1.0 and (tmp_path / "r.samples.batch1.jsonl").exists()
    assert "full/pope_adv/pope_accuracy" in metrics and 0 <= metrics["agreement/pope_adv"] <= 1
    full = {r["doc_id"]: r for r in out["full_samples"]}
    assert {r["visual_tokens"] for r in full.values()} == {576} and {
        r["visual_tokens"] for r in out["samples"]
    } == {16}
    same = sum(r["answer"] == full[r["doc_id"]]["answer"] for r in out["samples"]) / 3
    assert metrics["agreement/pope_adv"] == pytest.approx(same)
    if metrics["full/pope_adv/pope_accuracy"]:
        assert metrics["pct_of_full/pope_adv/pope_accuracy"] == pytest.approx(
            100 * metrics["bench/pope_adv/pope_accuracy"] / metrics["full/pope_adv/pope_accuracy"]
        )
    assert (tmp_path / "r.samples.full.jsonl").exists() and isinstance(model.reducer, UniformSample)


# ----------------------------------------------------------------------------- data errors
@pytest.mark.integration  # lmms-eval's task index and evaluator
def test_missing_dataset_fails_fast_with_the_id_and_how_to_fetch_it(manager, tmp_path):
    from tokenprune.eval.data import DatasetNotFound
    from tokenprune.eval.runner import resolve_tasks

    bench = benchmark("vqav2", f"paths.data_root={tmp_path}")
    with pytest.raises(DatasetNotFound) as error:
        resolve_tasks(bench, manager)
    message = str(error.value)
    assert "lmms-lab-encoder/VQAv2" in message and "vqav2_val" in message
    assert "huggingface-cli download --repo-type dataset lmms-lab-encoder/VQAv2" in message


@pytest.mark.integration  # lmms-eval's task index and evaluator
def test_video_task_in_the_hf_cache_needs_its_unpacked_videos(manager, tmp_path, monkeypatch):
    from tokenprune.eval import data
    from tokenprune.eval.runner import resolve_tasks

    monkeypatch.setattr(data, "in_hf_cache", lambda dataset_id: True)  # the parquet is "cached"
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(data.DatasetNotFound, match="videos of 'lmms-eval/Video-MME' are not unpacked"):
        resolve_tasks(benchmark("videomme", f"paths.data_root={tmp_path}"), manager)
    (tmp_path / "videomme" / "data").mkdir(parents=True)
    specs, where = resolve_tasks(benchmark("videomme", f"paths.data_root={tmp_path}"), manager)
    assert where["videomme"] == {
        "source": "hf_cache",
        "dataset": "lmms-eval/Video-MME",
        "videos": str(tmp_path / "videomme" / "data"),
    }
    assert (
        "dataset_path" not in specs[0] and "dataset_kwargs" not in specs[0]
    )  # lmms-eval loads it from the cache
    assert specs[0]["doc_to_visual"].__module__ == "tokenprune.eval.video"


@pytest.mark.integration  # lmms-eval's task index and evaluator
def test_api_judged_task_needs_the_explicit_flag(manager):
    from tokenprune.eval.runner import resolve_tasks

    with pytest.raises(ValueError, match="api_judge=true"):
        resolve_tasks(benchmark("activitynetqa"), manager)


def test_sample_frames_decodes_uniformly():
    from tokenprune.eval.video import find_video, sample_frames

    folder = FIXTURES / "lmms-eval" / "Video-MME" / "data"
    path = find_video(folder, "fFjv93ACGo8")  # a red square moving left to right, 8 frames
    frames = sample_frames(path, 4)
    assert len(frames) == 4 and all(f.size == (64, 48) and f.mode == "RGB" for f in frames)
    xs = []
    for frame in frames:
        red = [x for x in range(64) if frame.getpixel((x, 22))[0] > 150 and frame.getpixel((x, 22))[1] < 100]
        xs.append(min(red))
    assert xs == sorted(xs) and xs[0] < xs[-1]
    assert len(sample_frames(path, 20)) == 8  # never more frames than the video has
    with pytest.raises(FileNotFoundError):
        find_video(folder, "missing")


def test_shipped_fixtures_are_what_the_generator_writes(tmp_path):
    """scripts/make_benchmark_fixtures.py regenerates tests/fixtures/benchmarks (text, layout, media sizes)."""
    import pyarrow.parquet as pq

    from tokenprune.eval.video import sample_frames

    _fixtures_module().make_all(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(FIXTURES) for p in FIXTURES.rglob("*") if p.is_file())
    assert fresh == shipped, "run python scripts/make_benchmark_fixtures.py"
    assert sum((FIXTURES / p).stat().st_size for p in shipped) < 400_000
    for rel in shipped:
        new, old = tmp_path / rel, FIXTURES / rel
        if rel.suffix == ".parquet":
            a, b = pq.read_table(new), pq.read_table(old)
            text = [c for c in a.column_names if c != "image"]
            assert a.select(text).equals(b.select(text)), rel
        elif rel.suffix == ".mp4":
            assert len(sample_frames(new, 50)) == len(sample_frames(old, 50)), rel
        else:
            assert new.read_text() == old.read_text(), rel


@pytest.mark.slow
@pytest.mark.integration
def test_video_task_goes_through_the_qwen_video_path(manager, tmp_path_factory):
    """A video task on tiny Qwen2-VL: each video reaches the adapter as one Video (temporal M-RoPE),
    with as many visual tokens as Qwen2-VL's own video input of those frames: 3 frames -> 2 temporal
    groups (the last frame repeated), each the merged grid of the smart_resize'd frame."""
    import math

    import pyarrow.parquet as pq
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from tokenprune.eval.runner import evaluate
    from tokenprune.eval.video import find_video, sample_frames
    from tokenprune.models.qwen2vl import Qwen2VLAdapter
    from tokenprune.models.tiny import BUILDERS

    path = BUILDERS["tiny_qwen2vl"](tmp_path_factory.mktemp("qwen_video") / "tiny_qwen2vl")
    adapter = Qwen2VLAdapter.from_pretrained(str(path), dtype="float32", device="cpu", video_max_pixels=1600)
    bench = benchmark(
        "egoschema",
        "benchmark.limit=2",
        "benchmark.video_frames=3",
        "benchmark.gen_kwargs='max_new_tokens=2'",
    )
    out = evaluate(adapter, bench, task_manager=manager)
    assert out["failures"] == [] and len(out["samples"]) == 2
    root = FIXTURES / "lmms-eval" / "egoschema"
    videos = pq.read_table(root / "Subset" / "test-00000-of-00001.parquet").column("video_idx").to_pylist()
    vision = adapter.model.config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    for record in out["samples"]:
        assert (record["videos"], record["images"]) == (1, 0)  # one video, not frames as images
        frame = sample_frames(find_video(root / "videos", videos[record["doc_id"]]), 3)[0]
        height, width = smart_resize(
            frame.height,
            frame.width,
            factor=factor,
            min_pixels=adapter.video_size["shortest_edge"],
            max_pixels=adapter.video_size["longest_edge"],
        )
        groups = math.ceil(3 / vision.temporal_patch_size)
        assert record["visual_tokens"] == groups * (height // factor) * (width // factor)
