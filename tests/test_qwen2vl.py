"""The Qwen2-VL / Qwen2.5-VL adapter against plain Hugging Face: logits, greedy generation, video,
batches with different kept counts, M-RoPE gathered from the unpruned sequence, signals vs eager,
and every reducer config end to end."""

import numpy as np
import pytest
import torch
from conftest import random_images, reducer_options
from hydra.utils import instantiate
from PIL import Image
from transformers import AttentionInterface, AutoModelForImageTextToText
from transformers.models.qwen2_vl import modeling_qwen2_vl
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.vision_utils import get_vision_window_index

from tokenprune.config import compose
from tokenprune.models.qwen2vl import Qwen2VLAdapter
from tokenprune.reducers._ops import resolve_budget
from tokenprune.reducers.baselines import UniformSample
from tokenprune.reducers.prumerge import PruMerge
from tokenprune.types import LLM_SIGNALS, VIT_CLS_ATTN, VIT_KEYS, Video, VisualTokens

VERSIONS = ["tiny_qwen2vl", "tiny_qwen25vl"]
QUESTIONS = ["What color is the square?", "How many objects are there?", "Is there a circle?", "Say yes."]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tokenprune.models.tiny import BUILDERS

    root = tmp_path_factory.mktemp("qwen")
    return {name: str(BUILDERS[name](root / name)) for name in VERSIONS}


@pytest.fixture(params=VERSIONS)
def qwen_path(request, built):
    return built[request.param]


def load(path, reducer=None):
    return Qwen2VLAdapter.from_pretrained(
        path, reducer=reducer, dtype="float32", device="cpu", video_max_pixels=1600
    )


def video_array(frames=5, seed=0, height=48, width=64):
    return (np.random.default_rng(seed).random((frames, height, width, 3)) * 255).astype("uint8")


def reference_video_patches(adapter, video):
    """Qwen2VLVideoProcessor's layout, written out: resize, normalise, pad T, (t, h/2, w/2, 2, 2, C, 2, p, p)."""
    processor = adapter.image_processor
    t, h, w, _ = video.shape
    size = adapter.video_size
    rh, rw = smart_resize(h, w, factor=8, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    frames = [
        np.asarray(Image.fromarray(f).resize((rw, rh), Image.BICUBIC), dtype=np.float32) / 255 for f in video
    ]
    x = (np.stack(frames) - np.array(processor.image_mean)) / np.array(processor.image_std)
    if t % 2:
        x = np.concatenate([x, x[-1:]])
    x = torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2)  # [T, C, H, W]
    gt, gh, gw = x.shape[0] // 2, rh // 4, rw // 4
    patches = x.view(gt, 2, 3, gh // 2, 2, 4, gw // 2, 2, 4).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(gt * gh * gw, -1), torch.tensor([[gt, gh, gw]])


def hf_inputs(adapter, question, images=(), videos=()):
    """The model's own inputs built the HF way: image processor + tokenizer, placeholders expanded."""
    kwargs, counts = {}, {}
    if images:
        out = adapter.image_processor(images=list(images), return_tensors="pt")
        kwargs.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
        counts[adapter.image_token_id] = iter((out["image_grid_thw"].prod(-1) // 4).tolist())
    if videos:
        patches, grids = zip(*(reference_video_patches(adapter, v) for v in videos))
        grid = torch.cat(grids)
        kwargs.update(pixel_values_videos=torch.cat(patches), video_grid_thw=grid)
        if adapter.windowed:
            kwargs["second_per_grid_ts"] = torch.tensor([2 / adapter.video_fps] * len(videos))
        counts[adapter.video_token_id] = iter((grid.prod(-1) // 4).tolist())
    ids = []
    for token in adapter.tokenizer(adapter.format_prompt(question, len(images), len(videos)))["input_ids"]:
        ids += [token] * next(counts[token]) if token in counts else [token]
    ids = torch.tensor([ids])
    types = (ids == adapter.image_token_id).int() + 2 * (ids == adapter.video_token_id).int()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types, **kwargs}


def test_video_patches_match_the_video_processor_layout(qwen_path):
    adapter = load(qwen_path)
    video = video_array()
    patches, grid, seconds = adapter.preprocess_videos([video])
    want, want_grid = reference_video_patches(adapter, video)
    assert torch.equal(grid, want_grid) and seconds == [1.0]
    torch.testing.assert_close(patches, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("media", ["one_image", "two_images", "video", "image_and_video"])
def test_no_reduction_logits_equal_plain_hf_forward(qwen_path, media):
    adapter = load(qwen_path)
    reference = AutoModelForImageTextToText.from_pretrained(qwen_path, dtype=torch.float32)
    images = {"one_image": 1, "two_images": 2, "video": 0, "image_and_video": 1}[media]
    videos = [video_array()] if "video" in media else []
    images = random_images(images)
    inputs = hf_inputs(adapter, QUESTIONS[0], images, videos)
    ours = adapter.prepare([QUESTIONS[0]], [images], videos=[videos])
    assert torch.equal(ours.input_ids, inputs["input_ids"])
    with torch.no_grad():
        want = reference(**inputs).logits
        got = adapter.model(**ours.as_kwargs()).logits
    torch.testing.assert_close(got, want)


def test_no_reduction_greedy_generate_equals_plain_hf(qwen_path):
    adapter = load(qwen_path)
    reference = AutoModelForImageTextToText.from_pretrained(qwen_path, dtype=torch.float32)
    cases = [
        ([random_images(1)[0]], []),
        ([], [video_array(seed=1)]),
        (random_images(2, seed=3), [video_array(4)]),
    ]
    for question, (images, videos) in zip(QUESTIONS, cases):
        inputs = hf_inputs(adapter, question, images, videos)
        with torch.no_grad():
            want = reference.generate(**inputs, max_new_tokens=8, do_sample=False)[
                :, inputs["input_ids"].shape[1] :
            ]
        texts, kept = adapter.generate([question], [images], videos=[videos], max_new_tokens=8)
        assert texts == [adapter.tokenizer.decode(want[0], skip_special_tokens=True).strip()]
        assert kept == [int((inputs["mm_token_type_ids"] > 0).sum())]


def test_batch_with_different_kept_counts_answers_like_singles(qwen_path):
    """PruMerge (IQR per image) keeps data-dependent counts; images, videos (a Video, an array), none."""
    adapter = load(qwen_path, PruMerge())
    images = random_images(4, seed=1)
    samples = [[images[0]], [images[1], images[2]], [], [images[3]]]
    videos = [[], [], [Video(video_array(5), fps=1.0)], [video_array(3, seed=2)]]
    singles = [
        adapter.generate([q], [s], videos=[v], max_new_tokens=8)
        for q, s, v in zip(QUESTIONS, samples, videos)
    ]
    inputs = adapter.prepare(QUESTIONS, samples, videos=videos)
    texts, kept = adapter.generate(QUESTIONS, samples, videos=videos, max_new_tokens=8)
    assert kept == [s[1][0] for s in singles] == inputs.visual_tokens
    assert len(set(kept)) >= 3, kept  # visual lengths differ across the batch
    assert texts == [s[0][0] for s in singles]
    with torch.no_grad():  # the last prompt position's logits of each sample, batched vs alone
        batched = adapter.model(**inputs.as_kwargs()).logits[:, -1]
        for b, (q, s, v) in enumerate(zip(QUESTIONS, samples, videos)):
            one = adapter.prepare([q], [s], videos=[v])
            torch.testing.assert_close(
                batched[b], adapter.model(**one.as_kwargs()).logits[0, -1], rtol=1e-4, atol=1e-4
            )


def test_mrope_positions_are_the_unpruned_ones_gathered(qwen_path):
    """Kept tokens keep their (t, h, w); the extra token sits at its frame group's centre; text keeps its offset."""
    adapter = load(qwen_path, PruMerge(min_keep=3))
    images, videos = random_images(1, seed=5), [video_array(4)]
    full = load(qwen_path).prepare([QUESTIONS[1]], [images], videos=[videos])
    ours = adapter.prepare([QUESTIONS[1]], [images], videos=[videos])
    pixel_values, grid = adapter.preprocess(images)
    encoded = adapter.encode(pixel_values, grid)
    visual = (full.input_ids[0] == adapter.image_token_id).nonzero()[:, 0]
    first = int(visual[0])
    want = full.position_ids[1:, 0, first + encoded.sources[0]]  # [3, k]
    kept = (ours.input_ids[0] == adapter.image_token_id).nonzero()[:, 0]
    assert torch.equal(ours.position_ids[1:, 0, kept], want)
    rows, cols = (grid[0, 1:] // 2).tolist()
    centre = full.position_ids[1:, 0, first + (rows // 2) * cols + cols // 2]
    assert torch.equal(ours.position_ids[1:, 0, kept[-1]], centre)  # PruMerge's extra token is last
    tail = 6  # "<|im_end|>\n<|im_start|>assistant\n" and the question's end: same positions
    assert torch.equal(ours.position_ids[1:, 0, -tail:], full.position_ids[1:, 0, -tail:])
    assert torch.equal(ours.position_ids[0, 0], torch.arange(ours.input_ids.shape[1]))


def test_reduced_generation_continues_like_a_no_cache_loop(qwen_path):
    """With pruned tokens, cached greedy generation equals re-running the whole sequence each step
    with every position row extended by +1 (the continuation rule for M-RoPE after a text prompt)."""
    adapter = load(qwen_path, PruMerge(min_keep=2))
    images, videos = [random_images(1, seed=2), []], [[], [video_array(3)]]
    inputs = adapter.prepare(QUESTIONS[:2], images, videos=videos)
    ids, mask, positions = inputs.input_ids, inputs.attention_mask, inputs.position_ids
    with torch.no_grad():
        for _ in range(6):
            logits = adapter.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                mm_encoder_outputs=inputs.mm_encoder_outputs,
            ).logits
            token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            positions = torch.cat([positions, positions[..., -1:] + 1], -1)
    texts, _ = adapter.generate(QUESTIONS[:2], images, videos=videos, max_new_tokens=6)
    want = adapter.tokenizer.batch_decode(ids[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert texts == [t.strip() for t in want]


def test_vision_space_tokens_are_the_merged_kept_groups(qwen_path):
    adapter = load(qwen_path, UniformSample(keep=7))
    pixel_values, grid = adapter.preprocess(random_images(2))
    with torch.no_grad():
        encoded = adapter.encode(pixel_values, grid)
        tower = adapter.tower(pixel_values, grid)
        views = adapter.views(tower, grid)
        merger = adapter.model.model.visual.merger
        for i, view in enumerate(views):
            groups = view.features[encoded.sources[i]]  # [7, 4C]
            torch.testing.assert_close(encoded.features[i], merger(groups.reshape(-1, groups.shape[-1] // 4)))
        # the unreduced merged tokens are the model's own image features
        want = adapter.model.model.get_image_features(pixel_values, grid).pooler_output
        torch.testing.assert_close(tower["merged"], torch.cat(want))


class LlmSpaceUniform(UniformSample):
    space = "llm"


def test_llm_space_reducer_gets_the_merger_output(qwen_path):
    adapter = load(qwen_path, LlmSpaceUniform(keep=6))
    pixel_values, grid = adapter.preprocess(random_images(2))
    with torch.no_grad():
        encoded = adapter.encode(pixel_values, grid)
        merged = adapter.model.model.get_image_features(pixel_values, grid).pooler_output
    for i in range(2):
        torch.testing.assert_close(encoded.features[i], merged[i][encoded.sources[i]])


def eager_probe(module, query, key, value, attention_mask, **kwargs):
    """The model's eager attention, recording each call's probabilities on the module."""
    out, weights = modeling_qwen2_vl.eager_attention_forward(
        module, query, key, value, attention_mask, **kwargs
    )
    module.tp_probs = [*getattr(module, "tp_probs", []), weights.detach()]
    return out, weights


def test_signals_match_eager_attention(qwen_path):
    """vit_cls_attn = mean attention received in the last block (eager probabilities, per segment),
    summed per 2x2 group, per frame group; vit_keys = that block's pre-RoPE keys of the group."""
    AttentionInterface.register("tp_eager_probe", eager_probe)
    adapter = load(qwen_path, PruMerge())
    assert adapter.model.config.vision_config._attn_implementation == "sdpa"
    pixel_values, grid = adapter.preprocess(random_images(3))
    with torch.no_grad():
        views = adapter.views(adapter.tower(pixel_values, grid), grid)
    reference = AutoModelForImageTextToText.from_pretrained(
        qwen_path,
        dtype=torch.float32,
        attn_implementation={"vision_config": "tp_eager_probe", "text_config": "sdpa"},
    )
    block = reference.model.visual.blocks[-1]
    captured = {}
    block.attn.qkv.register_forward_hook(lambda m, i, o: captured.__setitem__("qkv", o))
    with torch.no_grad():
        reference.model.visual(pixel_values, grid_thw=grid)
    received = torch.cat([p[0].mean(0).sum(0) for p in block.attn.tp_probs])  # [L] block order
    c = block.attn.qkv.in_features
    keys = captured["qkv"][:, c : 2 * c]  # [L, C]
    if adapter.windowed:
        vision = reference.config.vision_config
        window, _ = get_vision_window_index(grid, 2, vision.window_size, vision.patch_size)
        order = torch.argsort(window)
    else:
        order = torch.arange(received.numel() // 4)
    received, keys = received.view(-1, 4).sum(-1)[order], keys.reshape(-1, 4 * c)[order]
    start = 0
    for view, (_, h, w) in zip(views, grid.tolist()):
        n = h * w // 4
        torch.testing.assert_close(view.signals[VIT_CLS_ATTN], received[start : start + n] / (h * w))
        torch.testing.assert_close(view.signals[VIT_KEYS], keys[start : start + n])
        assert view.signals[VIT_CLS_ATTN].sum().item() == pytest.approx(1, abs=1e-5)
        start += n


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
def test_every_reducer_runs(built, name, overrides):
    """Forward + generate with every configs/reducer option; visual counts are the reducer's lengths."""
    reducer = instantiate(compose([f"reducer={name}", *overrides]).reducer)
    adapter = load(built["tiny_qwen2vl"], reducer)
    images, videos = [random_images(2, seed=7), []], [[], [video_array(3)]]
    with torch.no_grad():
        expected = []
        if set(reducer.requires) & set(LLM_SIGNALS):  # at the LLM input: each image / video one sequence
            full = load(built["tiny_qwen2vl"]).prepare(QUESTIONS[:2], images, videos=videos)
            expected = [0, 0]
            for block in full.blocks:
                expected[block.sample] += resolve_budget(block.count, reducer.keep, reducer.ratio)
        else:  # per view (frame group)
            for sample_images, sample_videos in zip(images, videos):
                total = 0
                for batch in ([adapter.preprocess(sample_images)] if sample_images else []) + (
                    [adapter.preprocess_videos(sample_videos)[:2]] if sample_videos else []
                ):
                    for view in adapter.views(adapter.tower(*batch), batch[1]):
                        tokens = VisualTokens(
                            view.features[None], view.grid, {k: v[None] for k, v in view.signals.items()}
                        )
                        total += int(reducer(tokens).lengths[0])
                expected.append(total)
        inputs = adapter.prepare(QUESTIONS[:2], images, videos=videos)
        logits = adapter.model(**inputs.as_kwargs()).logits
    assert inputs.visual_tokens == expected
    placeholders = (inputs.input_ids == adapter.image_token_id) | (inputs.input_ids == adapter.video_token_id)
    assert placeholders.sum(-1).tolist() == expected
    assert torch.isfinite(logits).all()
    texts, kept = adapter.generate(QUESTIONS[:2], images, videos=videos, max_new_tokens=3)
    assert kept == expected and len(texts) == 2


def test_labels_cover_only_answers(qwen_path):
    adapter = load(qwen_path, UniformSample(keep=5))
    inputs = adapter.prepare(
        QUESTIONS[:2], [random_images(1), []], videos=[[], [video_array(2)]], answers=["red", "two"]
    )
    for b, answer in enumerate(["red", "two"]):
        labelled = inputs.labels[b][inputs.labels[b] != -100].tolist()
        assert labelled == adapter.answer_ids(answer) and labelled[-1] == adapter.tokenizer.eos_token_id
    loss = adapter.model(**inputs.as_kwargs()).loss
    loss.backward()
    assert adapter.model.model.visual.merger.mlp[0].weight.grad.abs().sum() > 0


def test_mismatched_prompt_is_an_error(built):
    adapter = load(built["tiny_qwen2vl"])
    adapter.prompt = "<|im_start|>user\n{question}<|im_end|>\n"
    with pytest.raises(ValueError, match="placeholders"):
        adapter.prepare(["hi"], [random_images(1)])


@pytest.mark.slow
@pytest.mark.integration
def test_eval_runs_end_to_end(tmp_path):
    """What `python -m tokenprune.eval model=tiny_qwen2vl reducer=prumerge_plus benchmark=smoke` runs, in-process."""
    from tokenprune.eval.runner import run

    cfg = compose(
        ["model=tiny_qwen2vl", "reducer=prumerge_plus", "benchmark=smoke", f"paths.outputs={tmp_path}"]
    )
    result = run(cfg)
    assert result["choices"]["model"] == "tiny_qwen2vl" and result["efficiency"]["failed_samples"] == 0
    assert result["efficiency"]["samples"] == 16 and result["efficiency"]["visual_tokens_mean"] > 0
    assert "bench/tp_smoke_pope/pope_accuracy" in result["metrics"]
