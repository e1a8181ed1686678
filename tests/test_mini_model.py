"""The shipped `mini_shapes` checkpoint (models/mini_shapes): the properties it exists to show, measured
here on held-out test scenes, and the pieces of its build (make mini-model) at toy size.

The property thresholds are the design targets of issue 17 (docs/miniature.md §3); a property the
shipped model misses is a strict xfail carrying the measured value.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from conftest import SHIPPED_MINI as SHIPPED
from conftest import needs_shipped_mini as needs_shipped
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tokenprune.config import PROJECT_ROOT, compose
from tokenprune.data.shapes import Obj, Scene, all_questions, make_item, render, shapes_corpus
from tokenprune.eval.bootstrap import paired_bootstrap
from tokenprune.models.llava import LLAVA15_PROMPT, LlavaAdapter
from tokenprune.recipes import mini_checks, mini_language, mini_shapes, mini_vision
from tokenprune.reducers.baselines import NoReduction
from tokenprune.reducers.prumerge import PruMerge, PruMergePlus

# Test-split items (never trained on): 30 scenes = 180 POPE questions + every colour question (~60).
PROPERTY_ITEMS = range(30)
TOKEN_ITEMS = range(40)  # for PruMerge's kept counts and the CLS attention


@pytest.fixture(scope="module")
def adapter() -> LlavaAdapter:
    """The shipped checkpoint, composed and instantiated exactly as `model=mini_shapes` runs."""
    if not (SHIPPED / "config.json").exists():
        pytest.skip("models/mini_shapes is not built yet: run `make mini-model`")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = compose(["model=mini_shapes", "reducer=none"])
    yield instantiate(cfg.model, reducer=instantiate(cfg.reducer), device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def questions() -> dict[str, dict[str, list]]:
    items = [make_item(i, "test") for i in PROPERTY_ITEMS]
    return {
        "seen": mini_checks.grounding_questions(items),
        "blind": mini_checks.grounding_questions(items, blind=True),
    }


@pytest.fixture(scope="module")
def unreduced(adapter, questions) -> dict[str, dict[str, np.ndarray]]:
    """Per kind, 0/1 per question: with the right images and with images shuffled across questions."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for view, by_kind in questions.items():
        for kind, kind_questions in by_kind.items():
            answers, kept = mini_checks.answer(adapter, NoReduction(), kind_questions)
            assert set(kept) == {576}
            out.setdefault(view, {})[kind] = mini_checks.correct(answers, kind_questions)
            if kind == "existence":
                out[view]["pope_f1"] = np.array([mini_checks.pope_f1(answers, kind_questions)])
    return out


def test_config_loads_the_shipped_folder_with_the_training_prompt():
    cfg = compose(["model=mini_shapes"])
    assert cfg.model.path == str(SHIPPED) and cfg.model.build is None
    assert cfg.model.prompt == LLAVA15_PROMPT  # the prompt stages 1 and 2 were trained with (vicuna_v1)
    assert cfg.model.image_aspect == "pad" and cfg.model.dtype == "float32"


@needs_shipped
def test_shipped_folder_is_small_safetensors_with_its_build_record():
    sizes = {p.name: p.stat().st_size for p in SHIPPED.iterdir()}
    assert "model.safetensors" in sizes and not any(n.endswith((".bin", ".pt")) for n in sizes)
    assert sum(sizes.values()) <= 25 * 2**20
    weights = load_file(SHIPPED / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    build = json.loads((SHIPPED / "BUILD.json").read_text())
    assert build["command"].startswith("python -m tokenprune.recipes.mini_shapes")
    assert build["recipe"]["seed"] == 0 and build["stage2"]["steps"] > 0
    config = OmegaConf.to_container(compose(config_name="recipe/mini_shapes").recipe)
    run_only = ("init_from", "init_stages", "log_every")  # how a build was started, not what it is
    assert {k: v for k, v in build["recipe"].items() if k not in run_only} == {
        k: v for k, v in config.items() if k not in run_only
    }  # the config's knobs are the shipped build's
    seconds = build["seconds"]  # a build started from another (init_from) adds that one's stages
    assert seconds.get("total_with_init", seconds["total"]) <= 3600


def test_processor_and_tokenizer_round_trip(adapter):
    tokenizer, config = adapter.tokenizer, adapter.model.config
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    for line in shapes_corpus()[::97]:
        ids = tokenizer(line)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == line.replace("<image>", "")
    assert len(tokenizer(" red circle", add_special_tokens=False)["input_ids"]) == 2  # one token a word
    image = make_item(0, "test").image()
    prompt = adapter.format_prompt("What color is the star?", 1)
    inputs = adapter.processor(images=[image], text=[prompt], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 96, 96)
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 576
    torch.testing.assert_close(adapter.preprocess([image]), inputs["pixel_values"])


# ------------------------------------------------------------------ properties of the shipped model
MISSED = "docs/miniature.md §3: the v4 LM grounds existence, colour less well"


@pytest.mark.slow
def test_unreduced_model_grounds_existence(unreduced):
    """Design target: POPE F1 >= 0.85 on held-out test scenes (measured 0.877, accuracy 0.86)."""
    assert unreduced["seen"]["pope_f1"][0] >= 0.85, unreduced["seen"]["pope_f1"]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=f"measured colour accuracy 0.69 (58 questions); {MISSED}")
def test_unreduced_model_names_colours(unreduced):
    """Design target: colour accuracy >= 0.85 on held-out test scenes."""
    assert unreduced["seen"]["color"].mean() >= 0.85, unreduced["seen"]["color"].mean()


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [
        "existence",  # measured 0.86 with the image, 0.42 blind: +0.44, paired [0.36, 0.54]
        "color",  # measured 0.69 with the image, 0.17 blind: +0.52, paired [0.38, 0.66]
    ],
)
def test_answers_depend_on_the_image_not_on_the_question_alone(unreduced, kind):
    """The image-blind control: the same questions with every image swapped for another scene's.
    The model must do clearly better with the right image (paired bootstrap over questions)."""
    seen, blind = unreduced["seen"][kind], unreduced["blind"][kind]
    diff, low, _ = paired_bootstrap(seen, blind)
    assert diff >= 0.2 and low > 0, (kind, seen.mean(), blind.mean(), diff, low)


def _visual_tokens(adapter: LlavaAdapter, reducer, images):
    """The adapter's visual tokens with the signals `reducer` asks for (the adapter keeps its reducer)."""
    saved, adapter.reducer = adapter.reducer, reducer
    try:
        return adapter.visual_tokens(adapter.preprocess(images))
    finally:
        adapter.reducer = saved


def test_cls_attention_concentrates_on_object_patches(adapter):
    images = [make_item(i, "test").image() for i in range(10)]
    attention = _visual_tokens(adapter, PruMerge(), images).signals["vit_cls_attn"]  # [B, 576]
    ratios = []
    for row, image in zip(attention, images):
        on = mini_vision.object_patches(image)  # [576] patches with object pixels
        ratios.append(float(row[on].mean() / row[~on].mean()))
    assert min(ratios) > 1.0 and sum(ratios) / len(ratios) > 3.0, ratios


@pytest.fixture(scope="module")
def prumerge_kept(adapter) -> tuple[torch.Tensor, list[int]]:
    """PruMerge's kept counts [40] on test scenes and their object counts."""
    items = [make_item(i, "test") for i in TOKEN_ITEMS]
    reducer = PruMerge()
    kept = reducer(_visual_tokens(adapter, reducer, [item.image() for item in items])).lengths.float()
    return kept, [len(item.scene.objects) for item in items]


def test_prumerge_keeps_at_most_15_percent_of_the_tokens(prumerge_kept):
    """Measured 6.2% (35.5 of 576; LLaVA-1.5: 5.5%), min 2."""
    kept, _ = prumerge_kept
    assert kept.min() >= 1 and kept.mean() <= 0.15 * 576, kept


@pytest.mark.xfail(
    strict=True,
    reason="measured r = 0.71 with the object count (0.91 with the object area) on 40 test scenes: the "
    "calibrated CLS attention falls on each object's core, the patches wholly inside it, so a large object "
    "adds more kept tokens than a small one (v1's uncalibrated tower: r = 0.88; docs/miniature.md §3)",
)
def test_prumerge_kept_count_grows_with_the_object_count(prumerge_kept):
    kept, objects = prumerge_kept
    assert np.corrcoef(kept.numpy(), objects)[0, 1] >= 0.8


def test_prumerge_plus_keeps_about_a_quarter_of_the_tokens(adapter):
    """LLaVA-1.5: ~25%; measured 25.3% on 40 test scenes (v1-v3's uncalibrated tower: 54%)."""
    reducer = PruMergePlus()
    images = [make_item(i, "test").image() for i in TOKEN_ITEMS]
    kept = reducer(_visual_tokens(adapter, reducer, images)).lengths.float()
    assert kept.mean() <= 0.35 * 576, kept.mean()


@pytest.fixture(scope="module")
def reduced(adapter, questions) -> dict[tuple[str, str], np.ndarray]:
    """(reducer, kind) -> 0/1 per question; random / uniform keep exactly as many tokens per image
    as the PruMerge variant they are matched with ("random@prumerge")."""
    out = {}
    for kind, kind_questions in questions["seen"].items():
        for name, reducer in (("prumerge", PruMerge()), ("prumerge_plus", PruMergePlus())):
            answers, kept = mini_checks.answer(adapter, reducer, kind_questions)
            out[name, kind] = mini_checks.correct(answers, kind_questions)
            for baseline in ("random", "uniform"):
                matched = mini_checks.matched(baseline)
                answers, counts = mini_checks.answer(adapter, matched, kind_questions, budgets=kept)
                assert counts == kept
                out[f"{baseline}@{name}", kind] = mini_checks.correct(answers, kind_questions)
    return out


# Measured on the shipped model (test scenes 0-29): method vs baseline, method - baseline, paired
# bootstrap 95% interval. PruMerge (~36 tokens) passes all four; PruMerge+ (~148) misses all four.
MEASURED = {
    ("prumerge", "random", "existence"): "0.78 vs 0.64: +0.14 [0.07, 0.22]",
    ("prumerge", "uniform", "existence"): "0.78 vs 0.65: +0.13 [0.06, 0.21]",
    ("prumerge", "random", "color"): "0.50 vs 0.29: +0.21 [0.05, 0.36]",
    ("prumerge", "uniform", "color"): "0.50 vs 0.28: +0.22 [0.09, 0.36]",
    ("prumerge_plus", "random", "existence"): "0.78 vs 0.79: -0.01 [-0.08, 0.06]",
    ("prumerge_plus", "uniform", "existence"): "0.78 vs 0.78: +0.01 [-0.06, 0.07]",
    ("prumerge_plus", "random", "color"): "0.52 vs 0.57: -0.05 [-0.19, 0.09]",
    ("prumerge_plus", "uniform", "color"): "0.52 vs 0.62: -0.10 [-0.21, 0.02]",
}
PLUS_MISSED = (
    "at ~148 tokens (a quarter of the image) random and uniform keep part of nearly every object too "
    "(an object of 10 patches keeps one with p = 0.95), so the outliers' edge is gone; PruMerge+ answers no "
    "better than PruMerge alone at a quarter of its tokens (colour 0.52 vs 0.50; docs/miniature.md §3)"
)
COMPARISONS = [
    pytest.param(
        method,
        baseline,
        kind,
        id=f"{method}-vs-{baseline}-{kind}",
        marks=[
            pytest.mark.xfail(
                strict=True, reason=f"measured {MEASURED[method, baseline, kind]}; {PLUS_MISSED}"
            )
        ]
        if method == "prumerge_plus"
        else [],
    )
    for method in ("prumerge", "prumerge_plus")
    for baseline in ("random", "uniform")
    for kind in ("existence", "color")
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "baseline", "kind"), COMPARISONS)
def test_prumerge_beats_content_blind_baselines_at_equal_token_counts(reduced, method, baseline, kind):
    """Training-free: the paired bootstrap 95% interval of (method - baseline) excludes zero."""
    ours, theirs = reduced[method, kind], reduced[f"{baseline}@{method}", kind]
    diff, low, high = paired_bootstrap(ours, theirs)
    assert low > 0, (ours.mean(), theirs.mean(), diff, low, high)


# ------------------------------------------------------------------------ the build, at toy size
def test_object_patches_on_a_hand_built_scene():
    # a small red square at (8, 8): pixels 8..19 on both axes = patches 2..4; clutter is grey
    scene = Scene((Obj("square", "red", "small", 8, 8),), 240, ((0, 60, 95, 60, 150),), ((50, 50, 2, 160),))
    image = render(scene)
    want = torch.zeros(24, 24, dtype=torch.bool)
    want[2:5, 2:5] = True
    assert torch.equal(mini_vision.object_patches(image).reshape(24, 24), want)
    assert torch.equal(mini_vision.object_masks(scene, image).reshape(1, 24, 24), want[None])


def test_core_patches_are_the_ones_wholly_inside_an_object():
    # the red square covers pixels 8..19 = patches 2..4 exactly; the blue circle at (60, 60) does not
    scene = Scene((Obj("square", "red", "small", 8, 8), Obj("circle", "blue", "small", 60, 60)), 240, (), ())
    coverage = mini_vision.object_coverage(scene, render(scene))  # [2, 576]
    square = torch.zeros(24, 24, dtype=torch.long)
    square[2:5, 2:5] = 16
    assert torch.equal(coverage[0].reshape(24, 24), square)
    cores = mini_vision.core_patches(coverage)
    assert torch.equal(cores, (coverage == 16).any(0)) and cores.reshape(24, 24)[2:5, 2:5].all()
    thin = torch.zeros(1, 576, dtype=torch.long)
    thin[0, [7, 8, 31]] = torch.tensor([6, 11, 3])  # no patch wholly inside: the most covered one
    assert mini_vision.core_patches(thin).nonzero().flatten().tolist() == [8]


def test_cls_target_puts_its_mass_on_cores_and_background_none_on_rims():
    cores, objects = torch.zeros(3, 576, dtype=torch.bool), torch.zeros(3, 576, dtype=torch.bool)
    cores[0, :4] = objects[0, :10] = True  # 4 cores, 6 rim patches, 566 background
    cores[2], objects[2] = True, True  # all core
    target = mini_vision.cls_target(cores, objects, 0.6)
    assert torch.allclose(target.sum(1), torch.ones(3))
    assert torch.allclose(target[0, :4], torch.full((4,), 0.15)) and (target[0, 4:10] == 0).all()
    assert torch.allclose(target[0, 10:], torch.full((566,), 0.4 / 566))
    assert torch.allclose(target[1], torch.full((576,), 1 / 576))  # no objects: uniform
    assert torch.allclose(target[2], torch.full((576,), 1 / 576))


def test_scene_stream_matches_the_train_split_and_is_deterministic():
    images, presence, counts, patches, cores = mini_vision.scene_batch(seed=0, start=5, n=3)
    again = mini_vision.scene_batch(seed=0, start=5, n=3)
    assert all(torch.equal(a, b) for a, b in zip((presence, counts, patches, cores), again[1:]))
    assert not (cores & (patches == 0)).any() and (cores.sum(1) >= 1).all()
    for k, image in enumerate(images):
        item = make_item(5 + k, "train")
        assert image.tobytes() == item.image().tobytes()
        assert int(counts[k]) == len(item.scene.objects) - 1
        assert int(presence[k].sum()) == len(item.scene.present())
        assert torch.equal(patches[k] > 0, mini_vision.object_patches(image))


def test_grounding_targets_name_the_right_objects():
    scene = Scene(
        (
            Obj("circle", "red", "small", 4, 4),
            Obj("square", "blue", "large", 40, 40),
            Obj("circle", "blue", "small", 70, 10),
        )
    )
    by_text = {q.text: q for q in all_questions(scene)}
    named = {text: mini_language.named_objects(scene, q) for text, q in by_text.items()}
    assert named["Is there a red circle in the image?"] == [0]
    assert named["Is there a green circle in the image?"] == []  # answer no: nothing to ground
    assert named["What color is the square?"] == [1]
    assert named["What shape is the red object?"] == [0]
    assert named["How many circles are there?"] == [0, 2]
    assert named["How many blue objects are there?"] == [1, 2]
    assert named["How many objects are there?"] == [0, 1, 2]
    assert named["What size is the blue square?"] == [1]
    assert all(named[t] == [] for t, q in by_text.items() if q.kind in ("position", "which"))


@pytest.mark.parametrize("pattern", mini_language.DROP_PATTERNS)
def test_drop_patterns_keep_exactly_the_budget_in_raster_order(pattern):
    objects = torch.zeros(576, dtype=torch.bool)
    objects[100:130] = True
    for keep in (1, 20, 30, 300, 575):
        kept = mini_language.drop_indices(pattern, keep, objects, torch.Generator().manual_seed(0))
        assert kept.numel() == keep and torch.equal(kept, kept.unique())  # sorted, no repeats
        if pattern == "object":  # object patches first
            assert int(objects[kept].sum()) == min(keep, 30)


def test_gather_rows_find_the_words_of_the_query_turn_only():
    """Two turns: the second answer's gather keys are its own question's colour and shape words,
    not the first turn's, and a turn without such words gets no row."""
    from types import SimpleNamespace

    red, circle, blue = 11, 12, 13
    ids = torch.tensor([[1, 5, red, circle, 6, 7, 40, 41, 5, blue, 9, 6, 7, 42, 41, 8, 6, 7, 43, 41]])
    labels = torch.full_like(ids, -100)
    labels[0, [6, 7, 13, 14, 18, 19]] = ids[0, [6, 7, 13, 14, 18, 19]]  # three answers: 2 tokens each
    inputs = SimpleNamespace(input_ids=ids, labels=labels)
    rows = [(0, 5, None), (0, 12, None), (0, 17, None)]  # the positions before each answer
    got = mini_language.gather_rows(inputs, rows, torch.tensor([red, circle, blue]))
    assert [(b, q, k.tolist()) for b, q, k in got] == [(0, 5, [2, 3]), (0, 12, [9])]


def test_short_visual_contexts_keep_every_object_patch_and_a_few_others():
    recipe = mini_shapes.Recipe(stage2_records=80, stage2_batch=8, short_fraction=0.5, short_extra=10)
    objects = torch.zeros(576, dtype=torch.bool)
    objects[[3, 50, 51, 400]] = True
    generator = torch.Generator().manual_seed(0)
    sizes = set()
    for step in range(5):  # 80 / 8 x 0.5 = 5 short steps
        kept = mini_language.visual_budget(step, recipe, objects, generator, dropping=False)
        assert bool(objects[kept].sum() == 4) and 4 <= kept.numel() <= 14 and torch.equal(kept, kept.unique())
        sizes.add(kept.numel())
    assert len(sizes) > 1  # the background share varies
    assert torch.equal(
        mini_language.visual_budget(5, recipe, objects, generator, dropping=False), torch.arange(576)
    )


@needs_shipped
def test_attribute_words_are_one_token_each_in_the_shipped_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    ids = mini_language.attribute_word_ids(tokenizer)
    assert ids.numel() == 6 + 5 + 5  # colours, shapes, plurals
    question = tokenizer("Is there a red circle in the image?", add_special_tokens=False).input_ids
    assert [tokenizer.decode([i]) for i in question if i in ids.tolist()] == [" red", " circle"]


def test_grounding_loss_is_the_layers_own_attention(tiny_llava):
    """The recomputed head-0 attention equals what the layer computes (eager attention weights)."""
    adapter = tiny_llava
    model = adapter.model
    model.config.text_config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    try:
        inputs = adapter.prepare(["Is there a red circle?"], [[render(make_item(0).scene)]])
        with torch.no_grad():
            out = model(**inputs.as_kwargs(), output_hidden_states=True, output_attentions=True)
            query = inputs.input_ids.shape[1] - 1
            keys = torch.tensor([3, 7])
            loss = mini_language.grounding_loss(model, inputs, out.hidden_states[1], 1, [(0, query, keys)])
        want = -out.attentions[1][0, 0, query, keys].sum().log()
        torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    finally:
        model.config.text_config._attn_implementation = "sdpa"
        model.model.language_model.config._attn_implementation = "sdpa"


TOY = [
    "recipe.vision_width=32", "recipe.vision_layers=2", "recipe.vision_mlp=64",
    "recipe.lm_width=32", "recipe.lm_layers=3", "recipe.lm_mlp=64",
    "recipe.stage0_steps=3", "recipe.stage0_batch=2", "recipe.stage1_records=4", "recipe.stage1_batch=2",
    "recipe.stage1_rounds=2", "recipe.stage2_records=4", "recipe.stage2_batch=2", "recipe.drop_prob=1",
    "recipe.heldout_items=1", "recipe.log_every=1", "recipe.threads=1", "recipe.stage0_cls_weight=1",
]  # fmt: skip


@pytest.mark.slow
def test_make_mini_model_entry_point_builds_a_loadable_checkpoint(tmp_path, monkeypatch, capsys):
    """`make mini-model`'s entry point end to end at toy size: 3 + 2 x 2 + 2 steps, atomic write, BUILD.json;
    then stage 2 again on that checkpoint (`init_from`), which records the loaded stages' times."""
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert re.search(
        r"^mini-model: install ## .+\n\t\$\(PY\) -m tokenprune.recipes.mini_shapes", makefile, re.M
    )
    out = tmp_path / "models" / "mini_shapes"
    threads = torch.get_num_threads()
    try:
        tower_only = [f"out={out}_3", f"recipe.init_from={out}", "recipe.init_stages=0", "recipe.stage1_records=0",
                      "recipe.gather_weight=1", "recipe.short_fraction=0.5"]  # fmt: skip
        for argv in ([f"out={out}"], [f"out={out}_2", f"recipe.init_from={out}"], tower_only):
            monkeypatch.setattr(sys, "argv", ["mini_shapes.py", f"hydra.run.dir={tmp_path}/run", *TOY, *argv])
            mini_shapes.main()
    finally:
        torch.set_num_threads(threads)
    log = capsys.readouterr().out
    assert (
        "[stage0] step 3/3" in log
        and "cls KL" in log
        and "[stage1] round 2/2 step 2/2" in log
        and "[stage2] step 2/2" in log
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["mini_shapes", "mini_shapes_2", "mini_shapes_3"]
    build = json.loads((out / "BUILD.json").read_text())
    assert build["recipe"]["stage0_steps"] == 3 and build["stage1"]["steps"] == 4  # 2 rounds x 2 steps
    assert [r["records"] for r in build["stage1"]["rounds"]] == [4, 4] and build["stage2"]["steps"] == 2
    assert set(build["heldout"]["grounding"]) >= {"existence", "color", "pope_f1", "color_image_blind"}
    again = json.loads((tmp_path / "models" / "mini_shapes_2" / "BUILD.json").read_text())
    assert again["stage1"]["from"] == str(out) and again["seconds"]["stage0"] == build["seconds"]["stage0"]
    assert again["seconds"]["total_with_init"] > again["seconds"]["total"]
    fresh = json.loads((tmp_path / "models" / "mini_shapes_3" / "BUILD.json").read_text())
    assert (
        fresh["stage1"]["steps"] == 0
        and "stage1" not in fresh["seconds"]
        and "gather" in fresh["stage2"]["history"][0]
    )
    first, third = load_file(out / "model.safetensors"), load_file(f"{out}_3/model.safetensors")
    for name, tensor in first.items():  # the tower is loaded; the projector and the LM start afresh
        assert torch.equal(tensor, third[name]) == ("vision_tower" in name), name
    loaded = LlavaAdapter.from_pretrained(str(out), dtype="float32", device="cpu", image_aspect="pad")
    assert loaded.model.config.vision_config.hidden_size == 32
    assert loaded.model.config._attn_implementation == "sdpa"


def test_unknown_recipe_knob_is_named():
    with pytest.raises(ValueError, match=r"unknown recipe knobs \['stage3_steps'\]"):
        mini_shapes.Recipe.from_config({"stage3_steps": 1})


def test_stage0_is_deterministic_given_the_seed():
    recipe = mini_shapes.Recipe(
        vision_width=32, vision_layers=2, vision_mlp=64, lm_width=32, lm_layers=2, lm_mlp=64,
        stage0_steps=2, stage0_batch=2, threads=1,
    )  # fmt: skip
    tokenizer = mini_shapes.build_tokenizer(recipe)
    processor = mini_shapes.build_processor(tokenizer)
    threads = torch.get_num_threads()
    towers = []
    try:
        torch.set_num_threads(1)
        for _ in range(2):
            torch.manual_seed(recipe.seed)
            model = mini_shapes.build_model(recipe, tokenizer)
            adapter = LlavaAdapter(model, processor, prompt=LLAVA15_PROMPT, image_aspect="pad")
            torch.manual_seed(recipe.seed + 1)
            mini_vision.train_stage0(model, adapter.preprocess, recipe, log=lambda line: None)
            towers.append(model.model.vision_tower.state_dict())
    finally:
        torch.set_num_threads(threads)
    for name, tensor in towers[0].items():
        assert torch.equal(tensor, towers[1][name]), name


@needs_shipped
@pytest.mark.integration
def test_default_train_job_fits_lora_with_prumerge_plus_and_compares_with_full(tmp_path):
    """`make run`'s job (python -m tokenprune.train reducer=prumerge_plus), shortened: 2 LoRA steps
    on 4 fresh scenes, 2 questions per task; the printed table holds reduced | full | % full, and the
    result holds the per-task bootstrap intervals and the paired intervals against the full model."""
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
    assert (tmp_path / "shapes" / "train_20000_4" / "shapes_train.json").exists()
    metrics = result["metrics"]
    for task in ("shapes_pope", "shapes_vqa", "shapes_mc"):
        assert any(k.startswith(f"full/{task}/") for k in metrics), task
    for key in (
        "bench/shapes_pope/pope_accuracy",
        "bench/shapes_pope/pope_f1_score",
        "bench/shapes_vqa/exact_match",
    ):
        interval = result["bootstrap"][key]
        assert interval["n"] == 2 and interval["low"] <= metrics[key] <= interval["high"], key
    paired = result["paired_vs_full"]["bench/shapes_vqa/exact_match"]
    assert paired["low"] <= paired["diff"] <= paired["high"] and paired["n"] == 2
    assert 0 < result["efficiency"]["visual_tokens_mean"] < 576
    assert "reduced" in run.stdout and "% full" in run.stdout and "bench/shapes_vqa/exact_match" in run.stdout
