"""The LLaVA-OneVision adapter against plain Hugging Face: logits and greedy generation (anyres with
and without the canvas shrink, multi-image, video), batches with different kept counts, the view
and newline layout, signals vs eager, every reducer config end to end, and the eval entry point."""

import functools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import random_images, reducer_options
from hydra.utils import instantiate
from PIL import Image
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from tokenprune.config import compose
from tokenprune.models.llava_ov import LlavaOnevisionAdapter
from tokenprune.reducers._ops import resolve_budget
from tokenprune.reducers.baselines import UniformSample
from tokenprune.reducers.prumerge import PruMerge
from tokenprune.types import LLM_SIGNALS, VIT_CLS_ATTN, VIT_KEYS, Video, VisualTokens

QUESTIONS = ["What color is the square?", "How many objects are there?", "Is there a circle?", "Say yes."]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


@pytest.fixture(scope="module")
def ov_path(tmp_path_factory):
    from tokenprune.models.tiny import build_tiny_llava_ov

    return str(build_tiny_llava_ov(tmp_path_factory.mktemp("ov") / "tiny_llava_ov"))


def load(path, reducer=None):
    return LlavaOnevisionAdapter.from_pretrained(path, reducer=reducer, dtype="float32", device="cpu")


def big_image(seed=3):
    """100 x 95: 3x3 tiles, whose unpadded canvas exceeds anyres_max_4 and is shrunk by the model."""
    return Image.fromarray((np.random.default_rng(seed).random((100, 95, 3)) * 255).astype("uint8"))


def video_array(frames=4, seed=0):
    return (np.random.default_rng(seed).random((frames, 40, 56, 3)) * 255).astype("uint8")


def processor_counts(adapter):
    """LlavaOnevisionProcessor's own placeholder arithmetic (its class needs torchvision to be built)."""
    side = adapter.side
    stand_in = SimpleNamespace(
        image_processor=adapter.image_processor,
        num_image_tokens=side * side,
        vision_aspect_ratio=adapter.model.config.vision_aspect_ratio,
    )
    stand_in._get_unpadded_features = functools.partial(
        LlavaOnevisionProcessor._get_unpadded_features, stand_in
    )
    size = adapter.crop_size

    def image(height, width, alone):
        if not alone:
            return side * side + 1
        return LlavaOnevisionProcessor._get_number_of_features(stand_in, height, width, size, size)

    def video(frames):
        return frames * math.ceil(side / 2) ** 2 + 1

    return image, video


def reference_frames(adapter, video):
    """LlavaOnevisionVideoProcessor's preprocessing written out: resize to S x S, rescale, normalise."""
    processor, size = adapter.image_processor, adapter.crop_size
    frames = [
        np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
        for f in video
    ]
    x = (np.stack(frames) - np.array(processor.image_mean)) / np.array(processor.image_std)
    return torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2)  # [T, 3, S, S]


def hf_inputs(adapter, question, images=(), videos=()):
    """The model's own inputs built the HF way: image processor + tokenizer + the processor's counts."""
    image_count, video_count = processor_counts(adapter)
    kwargs, counts = {}, {adapter.image_token_id: iter([]), adapter.video_token_id: iter([])}
    if images:
        out = adapter.image_processor(images=[list(images)], return_tensors="pt")
        kwargs.update(pixel_values=out["pixel_values"], image_sizes=out["image_sizes"])
        kwargs["batch_num_images"] = out["batch_num_images"]
        counts[adapter.image_token_id] = iter(
            image_count(*s, len(images) == 1) for s in out["image_sizes"].tolist()
        )
    if videos:  # the frames as the adapter resizes them (== reference_frames to 1e-6, tested below)
        kwargs["pixel_values_videos"] = torch.stack(adapter.preprocess_videos(videos))
        counts[adapter.video_token_id] = iter(video_count(len(v)) for v in videos)
    ids = []
    for token in adapter.tokenizer(adapter.format_prompt(question, len(images), len(videos)))["input_ids"]:
        ids += [token] * next(counts[token]) if token in counts else [token]
    ids = torch.tensor([ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **kwargs}


def test_video_frames_match_the_video_processor(ov_path):
    adapter = load(ov_path)
    video = video_array()
    (frames,) = adapter.preprocess_videos([video])
    torch.testing.assert_close(frames, reference_frames(adapter, video), rtol=0, atol=1e-6)


@pytest.mark.parametrize("media", ["anyres", "anyres_shrunk", "two_images", "video"])
def test_no_reduction_logits_equal_plain_hf_forward(ov_path, media):
    adapter = load(ov_path)
    reference = LlavaOnevisionForConditionalGeneration.from_pretrained(ov_path, dtype=torch.float32)
    images = {
        "anyres": random_images(1),
        "anyres_shrunk": [big_image()],
        "two_images": random_images(2),
        "video": [],
    }
    images = images[media]
    videos = [video_array()] if media == "video" else []
    inputs = hf_inputs(adapter, QUESTIONS[0], images, videos)
    ours = adapter.prepare([QUESTIONS[0]], [images], videos=[videos])
    assert torch.equal(ours.input_ids, inputs["input_ids"])
    with torch.no_grad():
        want = reference(**inputs).logits
        got = adapter.model(**ours.as_kwargs()).logits
    torch.testing.assert_close(got, want)


def test_no_reduction_greedy_generate_equals_plain_hf(ov_path):
    adapter = load(ov_path)
    reference = LlavaOnevisionForConditionalGeneration.from_pretrained(ov_path, dtype=torch.float32)
    cases = [([big_image()], []), (random_images(2, seed=4), []), ([], [video_array(3, seed=1)])]
    for question, (images, videos) in zip(QUESTIONS, cases):
        inputs = hf_inputs(adapter, question, images, videos)
        with torch.no_grad():
            want = reference.generate(**inputs, max_new_tokens=8, do_sample=False)[
                :, inputs["input_ids"].shape[1] :
            ]
        texts, kept = adapter.generate([question], [images], videos=[videos], max_new_tokens=8)
        assert texts == [adapter.tokenizer.decode(want[0], skip_special_tokens=True).strip()]
        placeholders = (inputs["input_ids"] == adapter.image_token_id) | (
            inputs["input_ids"] == adapter.video_token_id
        )
        assert kept == [int(placeholders.sum())]


def test_batch_with_different_kept_counts_answers_like_singles(ov_path):
    adapter = load(ov_path, PruMerge())
    images = random_images(4, seed=1)
    samples = [[big_image()], [images[1], images[2]], [], [images[3]]]
    videos = [[], [], [Video(video_array(5), fps=1.0)], [video_array(3, seed=2)]]
    singles = [
        adapter.generate([q], [s], videos=[v], max_new_tokens=8)
        for q, s, v in zip(QUESTIONS, samples, videos)
    ]
    inputs = adapter.prepare(QUESTIONS, samples, videos=videos)
    texts, kept = adapter.generate(QUESTIONS, samples, videos=videos, max_new_tokens=8)
    assert kept == [s[1][0] for s in singles] == inputs.visual_tokens
    assert len(set(kept)) >= 3, kept
    assert texts == [s[0][0] for s in singles]
    with torch.no_grad():
        batched = adapter.model(**inputs.as_kwargs()).logits[:, -1]
        for b, (q, s, v) in enumerate(zip(QUESTIONS, samples, videos)):
            one = adapter.prepare([q], [s], videos=[v])
            torch.testing.assert_close(
                batched[b], adapter.model(**one.as_kwargs()).logits[0, -1], rtol=1e-4, atol=1e-4
            )


def test_views_and_newlines(ov_path):
    """Anyres image: base view + canvas view (unpadded, shrunk grid); reduced canvas = kept + one newline;
    multi-image: base views + one newline each; video: frames' kept tokens + one newline."""
    keep = 5
    adapter = load(ov_path, UniformSample(keep=keep))
    crops = adapter.preprocess([[big_image()], random_images(2)])
    assert crops.crops[0] == 10 and crops.crops[1:] == [1, 1] and crops.anyres == [True, False, False]
    rows, cols = adapter.canvas_grid(crops.crops[0], crops.sizes[0])
    none = load(ov_path)
    with torch.no_grad():
        full = none.encode_images(crops)
        views = adapter.image_views(crops, adapter.tower(crops.pixel_values), None)
        reduced = adapter.encode_images(crops)
    assert full[0].shape[0] == 64 + rows * (cols + 1)  # the model's packing: newline after every row
    assert [v.grid for v in views[0]] == [(8, 8), (rows, cols)] and rows * cols < 24 * 23  # shrunk
    assert [v.grid for v in views[1]] == [(8, 8)]
    newline = adapter.model.model.image_newline
    assert [r.shape[0] for r in reduced] == [2 * keep + 1, keep + 1, keep + 1]
    assert all(torch.equal(r[-1], newline) for r in reduced)
    with torch.no_grad():
        projector = adapter.model.model.multi_modal_projector
        canvas = views[0][1].features  # [cells, C] vision features of the packed canvas
        from tokenprune.reducers.baselines import uniform_indices

        kept = uniform_indices(keep, (rows, cols))
        torch.testing.assert_close(reduced[0][keep : 2 * keep], projector(canvas[kept]))
        (video,) = adapter.encode_videos(adapter.preprocess_videos([video_array(3)]))
    assert video.shape[0] == 3 * keep + 1 and torch.equal(video[-1], newline)


class LlmSpaceUniform(UniformSample):
    space = "llm"


def test_llm_space_reducer_gets_the_models_packed_tokens(ov_path):
    """space="llm": the reducer sees the model's own projected, packed canvas (newlines removed)."""
    adapter = load(ov_path, LlmSpaceUniform(keep=5))
    crops = adapter.preprocess([[big_image()]])
    rows, cols = adapter.canvas_grid(crops.crops[0], crops.sizes[0])
    with torch.no_grad():
        (tokens,) = adapter.encode_images(crops)
        (packed,) = adapter.model.model.get_image_features(
            crops.pixel_values[None], torch.tensor(crops.sizes)
        ).pooler_output
    from tokenprune.reducers.baselines import uniform_indices

    canvas = packed[64:].view(rows, cols + 1, -1)[:, :cols].reshape(rows * cols, -1)  # drop the row newlines
    torch.testing.assert_close(tokens[:5], packed[:64][uniform_indices(5, (8, 8))])
    torch.testing.assert_close(tokens[5:10], canvas[uniform_indices(5, (rows, cols))])


def test_signals_match_eager_attention(ov_path):
    """vit_cls_attn = mean attention received in the last SigLIP layer (eager output_attentions);
    vit_keys = its k_proj output; each view's attention is a distribution."""
    adapter = load(ov_path, PruMerge())
    assert adapter.model.config.vision_config._attn_implementation == "sdpa"
    crops = adapter.preprocess([[big_image()]])
    with torch.no_grad():
        tower = adapter.tower(crops.pixel_values)
        views = adapter.image_views(crops, tower, None)
    reference = LlavaOnevisionForConditionalGeneration.from_pretrained(
        ov_path, dtype=torch.float32, attn_implementation={"vision_config": "eager", "text_config": "sdpa"}
    )
    captured = {}
    last = reference.model.vision_tower.encoder.layers[-1].self_attn
    last.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))
    with torch.no_grad():
        out = reference.model.vision_tower(
            crops.pixel_values, output_attentions=True, output_hidden_states=True
        )
    probs = out.attentions[-1]  # [B, H, N, N]
    torch.testing.assert_close(tower[VIT_CLS_ATTN], probs.mean(1).mean(1))
    torch.testing.assert_close(tower[VIT_KEYS], captured["k"])
    torch.testing.assert_close(
        tower["features"], out.hidden_states[-1], rtol=1e-4, atol=1e-4
    )  # sdpa vs eager
    for view in views[0]:
        assert view.signals[VIT_CLS_ATTN].sum().item() == pytest.approx(1, abs=1e-5)
        assert view.signals[VIT_KEYS].shape[0] == view.features.shape[0]


def reducer_cases():
    out = []
    for name in reducer_options():
        node = compose([f"reducer={name}"]).reducer
        overrides = [f"reducer.{k}=6" for k in ("keep", "budget") if k in node and node[k] is not None]
        if node.get("iqr_scope") == "batch":  # batch-coupled by design (prumerge_reference): the per-view
            overrides.append("reducer.iqr_scope=image")  # counts below assume invariance (contract test)
        if "dominant" in node:  # VisionZip: a budget below the tiny views' token counts
            overrides += ["reducer.dominant=4", "reducer.contextual=2"]
        out.append(pytest.param(name, overrides, id=name))
    return out


@pytest.mark.parametrize(("name", "overrides"), reducer_cases())
def test_every_reducer_runs(ov_path, name, overrides):
    """Forward + generate with every configs/reducer option; visual counts are the reducer's lengths
    per view plus the newlines of the layout (a view it keeps whole is packed as the model packs it)."""
    reducer = instantiate(compose([f"reducer={name}", *overrides]).reducer)
    adapter = load(ov_path, reducer)
    images, videos = [[big_image()], random_images(2, seed=7), []], [[], [], [video_array(3)]]
    if set(reducer.requires) & set(LLM_SIGNALS):  # at the LLM input: each image / video one sequence
        with torch.no_grad():
            full = load(ov_path).prepare(QUESTIONS[:3], images, videos=videos)
            expected = [0, 0, 0]
            for block in full.blocks:  # the kept non-newline tokens, then one newline
                expected[block.sample] += (
                    resolve_budget(block.columns.numel(), reducer.keep, reducer.ratio) + 1
                )
            inputs = adapter.prepare(QUESTIONS[:3], images, videos=videos)
            logits = adapter.model(**inputs.as_kwargs()).logits
        assert inputs.visual_tokens == expected and torch.isfinite(logits).all()
        placeholders = (inputs.input_ids == adapter.image_token_id) | (
            inputs.input_ids == adapter.video_token_id
        )
        assert placeholders.sum(-1).tolist() == expected
        texts, counts = adapter.generate(QUESTIONS[:3], images, videos=videos, max_new_tokens=3)
        assert counts == expected and len(texts) == 3
        return

    def kept(view):
        tokens = VisualTokens(view.features[None], view.grid, {k: v[None] for k, v in view.signals.items()})
        reduced = reducer(tokens)
        return int(reduced.lengths[0]), reduced.features is tokens.features

    def tower(pixel_values):  # an LLM-space reducer (DivPrune) reduces the projected tokens
        out = adapter.tower(pixel_values)
        llm = reducer.space == "llm"
        return out, adapter.projector()(out["features"]) if llm else None

    with torch.no_grad():
        expected = []
        for sample_images in images[:2]:
            crops = adapter.preprocess([sample_images])
            total = 0
            for views in adapter.image_views(crops, *tower(crops.pixel_values)):
                (base, _), *canvas = [kept(view) for view in views]
                rows = views[1].grid[0] if canvas else 0
                total += base + (canvas[0][0] + (rows if canvas[0][1] else 1) if canvas else 1)
            expected.append(total)
        frames = adapter.preprocess_videos(videos[2])[0]
        expected.append(sum(kept(v)[0] for v in adapter.video_views(*tower(frames))) + 1)
        inputs = adapter.prepare(QUESTIONS[:3], images, videos=videos)
        logits = adapter.model(**inputs.as_kwargs()).logits
    assert inputs.visual_tokens == expected
    placeholders = (inputs.input_ids == adapter.image_token_id) | (inputs.input_ids == adapter.video_token_id)
    assert placeholders.sum(-1).tolist() == expected
    assert torch.isfinite(logits).all()
    texts, counts = adapter.generate(QUESTIONS[:3], images, videos=videos, max_new_tokens=3)
    assert counts == expected and len(texts) == 3


def test_labels_and_gradients(ov_path):
    adapter = load(ov_path, UniformSample(keep=5))
    inputs = adapter.prepare(
        QUESTIONS[:2], [random_images(1), []], videos=[[], [video_array(2)]], answers=["red", "two"]
    )
    for b, answer in enumerate(["red", "two"]):
        labelled = inputs.labels[b][inputs.labels[b] != -100].tolist()
        assert labelled == adapter.answer_ids(answer) and labelled[-1] == adapter.tokenizer.eos_token_id
    adapter.model(**inputs.as_kwargs()).loss.backward()
    assert adapter.model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.integration
def test_eval_runs_end_to_end(tmp_path):
    """What `python -m tokenprune.eval model=tiny_llava_ov reducer=prumerge_plus benchmark=smoke` runs, in-process."""
    from tokenprune.eval.runner import run

    cfg = compose(
        ["model=tiny_llava_ov", "reducer=prumerge_plus", "benchmark=smoke", f"paths.outputs={tmp_path}"]
    )
    result = run(cfg)
    assert result["choices"]["model"] == "tiny_llava_ov" and result["efficiency"]["failed_samples"] == 0
    assert result["efficiency"]["samples"] == 16 and result["efficiency"]["visual_tokens_mean"] > 0
    assert "bench/tp_smoke_pope/pope_accuracy" in result["metrics"]
