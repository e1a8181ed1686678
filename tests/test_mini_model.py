"""The shipped `mini_shapes` checkpoint (models/mini_shapes) and the pieces of its build (make mini-model)."""

from __future__ import annotations

import json
import re
import runpy
import sys
from collections import Counter

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from tokenprune.config import PROJECT_ROOT, compose
from tokenprune.data.shapes import Obj, Scene, make_item, render, shapes_corpus
from tokenprune.models import mini
from tokenprune.models.llava import LLAVA15_PROMPT, LlavaAdapter
from tokenprune.reducers.prumerge import PruMerge, PruMergePlus

SHIPPED = PROJECT_ROOT / "models" / "mini_shapes"
# Test-split items 0-9 (never trained on) for the attention and token checks.
TEST_ITEMS = range(10)


needs_shipped = pytest.mark.skipif(
    not (SHIPPED / "config.json").exists(),
    reason="models/mini_shapes is not built yet: run `make mini-model` (issue 5)",
)


@pytest.fixture(scope="module")
def adapter() -> LlavaAdapter:
    """The shipped checkpoint, composed and instantiated exactly as `model=mini_shapes` runs."""
    if not (SHIPPED / "config.json").exists():
        pytest.skip("models/mini_shapes is not built yet: run `make mini-model` (issue 5)")
    cfg = compose(["model=mini_shapes", "reducer=none"])
    return instantiate(cfg.model, reducer=instantiate(cfg.reducer), device="cpu")


def test_config_loads_the_shipped_folder_with_the_training_prompt():
    cfg = compose(["model=mini_shapes"])
    assert cfg.model.path == str(SHIPPED) and cfg.model.build is None
    assert cfg.model.prompt == LLAVA15_PROMPT  # the prompt stage 1 was trained with (vicuna_v1)
    assert cfg.model.image_aspect == "pad" and cfg.model.dtype == "float32"


@needs_shipped
def test_shipped_folder_is_small_safetensors_with_its_build_record():
    sizes = {p.name: p.stat().st_size for p in SHIPPED.iterdir()}
    assert "model.safetensors" in sizes and not any(n.endswith((".bin", ".pt")) for n in sizes)
    assert sum(sizes.values()) <= 25 * 2**20
    weights = load_file(SHIPPED / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    build = json.loads((SHIPPED / "BUILD.json").read_text())
    assert build["recipe"]["seed"] == 0 and "make_mini_model.py" in build["command"]
    assert set(build["seconds"]) >= {"stage0", "stage1", "total"}
    heldout = build["heldout"]  # measured by the build on 60 val scenes (docs/miniature.md §3)
    assert heldout["accuracy"]["all"] >= 0.45 and heldout["accuracy"]["color"] >= 0.4
    assert heldout["cls_attention"]["object_mass"] > 3 * heldout["cls_attention"]["object_area"]
    assert heldout["kept_tokens_mean"]["prumerge"] <= 0.15 * 576
    assert heldout["prumerge_kept_vs_objects_corr"] >= 0.8


def test_processor_and_tokenizer_round_trip(adapter):
    tokenizer, config = adapter.tokenizer, adapter.model.config
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    for line in shapes_corpus()[::97]:
        ids = tokenizer(line)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == line.replace("<image>", "")
    # every word of the world is one token
    assert len(tokenizer(" red circle", add_special_tokens=False)["input_ids"]) == 2
    image = make_item(0, "test").image()
    prompt = adapter.format_prompt("What color is the star?", 1)
    inputs = adapter.processor(images=[image], text=[prompt], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 96, 96)
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 576
    torch.testing.assert_close(adapter.preprocess([image]), inputs["pixel_values"])


def test_answers_held_out_attribute_questions_above_the_majority_answer(adapter):
    """Colour and shape questions of test scenes 0-19, greedy: measured 19/34 (docs/miniature.md §3).
    Existence questions are answered with yes/no but at chance (the LM does not ground objects)."""
    questions, images, truths, kinds = [], [], [], []
    for index in range(20):
        item = make_item(index, "test")
        for question in item.questions:
            if question.kind in ("color", "shape", "existence"):
                questions.append(question.prompt)
                images.append([item.image()])
                truths.append(question.answer)
                kinds.append(question.kind)
    answers, kept = adapter.generate(questions, images, max_new_tokens=8)
    assert kept == [576] * len(questions)
    attribute = [(a, t) for a, t, k in zip(answers, truths, kinds) if k != "existence"]
    accuracy = sum(a == t for a, t in attribute) / len(attribute)
    majority = max(Counter(t for _, t in attribute).values()) / len(attribute)
    assert accuracy >= majority + 0.15, (accuracy, majority, attribute)
    assert {a for a, k in zip(answers, kinds) if k == "existence"} <= {"yes", "no"}


def _visual_tokens(adapter: LlavaAdapter, reducer, images):
    """The adapter's visual tokens with the signals `reducer` asks for (the adapter keeps its reducer)."""
    saved, adapter.reducer = adapter.reducer, reducer
    try:
        return adapter.visual_tokens(adapter.preprocess(images))
    finally:
        adapter.reducer = saved


def test_cls_attention_concentrates_on_object_patches(adapter):
    images = [make_item(i, "test").image() for i in TEST_ITEMS]
    attention = _visual_tokens(adapter, PruMerge(), images).signals["vit_cls_attn"]  # [B, 576]
    ratios = []
    for row, image in zip(attention, images):
        on = mini.object_patches(image)  # [576] patches with object pixels
        ratios.append(float(row[on].mean() / row[~on].mean()))
    # measured on the shipped model: see docs/miniature.md §3
    assert min(ratios) > 1.0 and sum(ratios) / len(ratios) > 3.0, ratios


@pytest.mark.parametrize("reducer", [PruMerge(), PruMergePlus()], ids=["prumerge", "prumerge_plus"])
def test_prumerge_keeps_fewer_tokens_than_the_grid(adapter, reducer):
    images = [make_item(i, "test").image() for i in TEST_ITEMS]
    kept = reducer(_visual_tokens(adapter, reducer, images)).lengths.float()  # [B]
    assert kept.min() >= 1
    if isinstance(reducer, PruMerge):
        assert kept.max() < 576 and kept.mean() <= 0.15 * 576
    else:  # the adaptive stride reaches 1 (every token) on crowded scenes: docs/miniature.md §3
        assert kept.max() <= 576 and kept.mean() < 0.75 * 576


# ------------------------------------------------------------------------ the build, at toy size
def test_object_patches_on_a_hand_built_scene():
    # a small red square at (8, 8): pixels 8..19 on both axes = patches 2..4; clutter is grey
    scene = Scene((Obj("square", "red", "small", 8, 8),), 240, ((0, 60, 95, 60, 150),), ((50, 50, 2, 160),))
    mask = mini.object_patches(render(scene)).reshape(24, 24)
    want = torch.zeros(24, 24, dtype=torch.bool)
    want[2:5, 2:5] = True
    assert torch.equal(mask, want)


def test_scene_stream_matches_the_train_split_and_is_deterministic():
    images, presence, counts, _ = mini.scene_batch(seed=0, start=5, n=3)
    again = mini.scene_batch(seed=0, start=5, n=3)
    assert torch.equal(presence, again[1]) and torch.equal(counts, again[2])
    for k, image in enumerate(images):
        item = make_item(5 + k, "train")
        assert image.tobytes() == item.image().tobytes()
        assert int(counts[k]) == len(item.scene.objects) - 1
        assert int(presence[k].sum()) == len(item.scene.present())


TOY = [
    "--vision-width", "32", "--vision-layers", "2", "--vision-mlp", "64",
    "--lm-width", "32", "--lm-layers", "2", "--lm-mlp", "64",
    "--stage0-steps", "3", "--stage0-batch", "2", "--stage1-records", "4", "--stage1-batch", "2",
    "--stage1-rounds", "2",
    "--heldout-items", "1", "--log-every", "1", "--threads", "1",
]  # fmt: skip


def test_make_mini_model_script_builds_a_loadable_checkpoint(tmp_path, monkeypatch, capsys):
    """The `make mini-model` script end to end at toy size: 3 + 2 x 2 steps, atomic write, BUILD.json."""
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert re.search(r"^mini-model: install ## .+\n\t\$\(PY\) scripts/make_mini_model.py", makefile, re.M)
    out = tmp_path / "models" / "mini_shapes"
    argv = ["make_mini_model.py", "--out", str(out), "--data-dir", str(tmp_path / "data"), *TOY]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(PROJECT_ROOT / "scripts" / "make_mini_model.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    log = capsys.readouterr().out
    assert "[stage0] step 3/3" in log and "[stage1] round 2/2 step 2/2" in log and "elapsed" in log
    assert sorted(p.name for p in out.parent.iterdir()) == ["mini_shapes"]  # no staging left over
    build = json.loads((out / "BUILD.json").read_text())
    assert build["recipe"]["stage0_steps"] == 3 and build["stage1"]["steps"] == 4  # 2 rounds x 2 steps
    assert [r["records"] for r in build["stage1"]["rounds"]] == [4, 4]
    assert set(build["heldout"]["accuracy"]) >= {"existence", "color", "all"}
    loaded = LlavaAdapter.from_pretrained(str(out), dtype="float32", device="cpu", image_aspect="pad")
    assert loaded.model.config.vision_config.hidden_size == 32
    assert loaded.model.config._attn_implementation == "sdpa"


def test_stage0_is_deterministic_given_the_seed():
    recipe = mini.Recipe(
        vision_width=32, vision_layers=2, vision_mlp=64, lm_width=32, lm_layers=2, lm_mlp=64,
        stage0_steps=2, stage0_batch=2, threads=1,
    )  # fmt: skip
    tokenizer = mini.build_tokenizer(recipe)
    processor = mini.build_processor(tokenizer)
    threads = torch.get_num_threads()
    towers = []
    try:
        torch.set_num_threads(1)
        for _ in range(2):
            torch.manual_seed(recipe.seed)
            model = mini.build_model(recipe, tokenizer)
            torch.manual_seed(recipe.seed + 1)
            mini.train_stage0(model, processor, recipe, log=lambda line: None)
            towers.append(model.model.vision_tower.state_dict())
    finally:
        torch.set_num_threads(threads)
    for name, tensor in towers[0].items():
        assert torch.equal(tensor, towers[1][name]), name


@needs_shipped
@pytest.mark.integration
def test_default_train_job_fits_lora_with_prumerge_plus_and_compares_with_full(tmp_path):
    """`make run`'s job (python -m tokenprune.train reducer=prumerge_plus), shortened: 2 LoRA steps
    on 4 fresh scenes, 2 questions per task; the printed table holds reduced | full | % full."""
    import subprocess

    args = ["reducer=prumerge_plus", f"paths.outputs={tmp_path}", "train.trainer.max_steps=2"]
    args += ["train.data.n=4", "train.data.batch_size=2", "benchmark.limit=2"]
    run = subprocess.run(
        [sys.executable, "-m", "tokenprune.train", *args],
        capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (path,) = (tmp_path / "results").glob("*.json")
    result = json.loads(path.read_text())
    assert result["choices"] == {
        "model": "mini_shapes",
        "reducer": "prumerge_plus",
        "benchmark": "shapes",
        "train": "lora_mini",
    }
    assert result["metrics"]["train/steps"] == 2
    assert (tmp_path / "shapes" / "train_12000_4" / "shapes_train.json").exists()
    metrics = result["metrics"]
    for task in ("shapes_pope", "shapes_vqa", "shapes_mc"):
        assert any(k.startswith(f"full/{task}/") for k in metrics), task
    assert 0 < result["efficiency"]["visual_tokens_mean"] < 576
    assert "reduced" in run.stdout and "% full" in run.stdout and "bench/shapes_vqa/exact_match" in run.stdout
