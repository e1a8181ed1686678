"""The shipped `mini_shapes` checkpoint (models/mini_shapes) and the pieces of its build (make mini-model)."""

from __future__ import annotations

import json
import re
import runpy
import sys

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
# Hand-picked: test-split items 0-9 (never trained on), each image's first existence question
# (POPE "adversarial", answer yes) and its colour question where the scene has one.
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
    assert build["heldout"]["accuracy"]["existence"] >= 0.85


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


def test_answers_held_out_test_questions(adapter):
    questions, images, truths = [], [], []
    for index in TEST_ITEMS:
        item = make_item(index, "test")
        picked = [next(q for q in item.questions if q.kind == "existence")]
        picked += [q for q in item.questions if q.kind == "color"][:1]
        for question in picked:
            questions.append(question.prompt)
            images.append([item.image()])
            truths.append(question.answer)
    answers, kept = adapter.generate(questions, images, max_new_tokens=8)
    assert kept == [576] * len(questions)
    right = sum(answer == truth for answer, truth in zip(answers, truths))
    # measured on the shipped model: see docs/miniature.md §3 (threshold leaves room for 2-3 misses)
    assert right / len(questions) >= 0.8, list(zip(questions, answers, truths))


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
    assert kept.max() < 576 and kept.min() >= 1
    if isinstance(reducer, PruMerge):
        assert kept.mean() <= 0.15 * 576


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
    "--heldout-items", "1", "--log-every", "1", "--threads", "1",
]  # fmt: skip


def test_make_mini_model_script_builds_a_loadable_checkpoint(tmp_path, monkeypatch, capsys):
    """The `make mini-model` script end to end at toy size: 3 + 2 steps, atomic write, BUILD.json."""
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
