"""The explainability mapper / oracle at the LLM input of Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision:
`llm_text_attn` (M-RoPE for Qwen) against the eager model's layer-0 attention, keep-all parity with
the plain HF forward, batched == per-sample with different kept counts, positions, video as one
sequence (and its own mapper), GAE relevance against brute force, labels, and the eval chain."""

import json

import numpy as np
import pytest
import torch
from conftest import random_images
from PIL import Image
from test_explain_pipeline import run_module
from test_explain_signal import RecordScores
from test_llava_ov import hf_inputs as ov_hf_inputs
from test_qwen2vl import hf_inputs as qwen_hf_inputs
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    LogitsProcessorList,
)

from tokenprune.explain.labels import LabelSample, LabelSettings, label
from tokenprune.explain.shards import read_labels
from tokenprune.models.llava_ov import LlavaOnevisionAdapter
from tokenprune.models.qwen2vl import Qwen2VLAdapter
from tokenprune.reducers._ops import resolve_budget
from tokenprune.reducers.explain_mapper import ExplainMapper, ExplainOracle, MapperNet, save_mapper
from tokenprune.types import LLM_TEXT_ATTN, VisualTokens

MODELS = ["tiny_qwen2vl", "tiny_qwen25vl", "tiny_llava_ov"]
QUESTIONS = ["What color is the square?", "How many objects are there?", "Is there a circle?"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tokenprune.models.tiny import BUILDERS

    root = tmp_path_factory.mktemp("explain_multigrid")
    return {name: str(BUILDERS[name](root / name)) for name in MODELS}


def load(built, name, reducer=None, path=None):
    path = path or built[name]
    if name == "tiny_llava_ov":
        return LlavaOnevisionAdapter.from_pretrained(path, reducer=reducer, dtype="float32", device="cpu")
    return Qwen2VLAdapter.from_pretrained(
        path, reducer=reducer, dtype="float32", device="cpu", video_max_pixels=1600
    )


def eager_model(path):
    return AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def video(frames=5, seed=0, height=48, width=64):
    return (np.random.default_rng(seed).random((frames, height, width, 3)) * 255).astype("uint8")


def big_image(seed=3):
    """100 x 95: LLaVA-OneVision packs 3x3 tiles and shrinks the canvas (anyres_max_4)."""
    return Image.fromarray((np.random.default_rng(seed).random((100, 95, 3)) * 255).astype("uint8"))


def batch(name):
    """Three samples of different lengths (left padding): one image (anyres for OneVision), two images,
    a video (Qwen: with an image before it)."""
    images = random_images(3, seed=1)
    first = [big_image()] if name == "tiny_llava_ov" else [images[0]]
    last = [] if name == "tiny_llava_ov" else random_images(1, seed=9)
    return QUESTIONS, [first, images[1:], last], [[], [], [video()]]


def eager_text_attention(model, inputs, adapter):
    """Layer 0's attention probabilities of the all-eager model (output_attentions), averaged over the
    rows after each block (real, non-visual, before the answer) and the heads, at the block's columns."""
    with torch.no_grad():
        probs = model(**inputs.as_kwargs(), output_attentions=True, use_cache=False).attentions[0]
    ids = inputs.input_ids
    visual = (ids == adapter.image_token_id) | (ids == adapter.video_token_id)
    text = inputs.attention_mask.bool() & ~visual
    if inputs.labels is not None:
        text &= torch.cumsum(inputs.labels != -100, -1) == 0
    positions = torch.arange(ids.shape[1])
    out = []
    for block in inputs.blocks:
        rows = text[block.sample] & (positions >= block.first + block.count)
        values = probs[block.sample][:, rows][:, :, block.first : block.first + block.count].mean(dim=(0, 1))
        out.append(values if block.columns is None else values[block.columns])
    return out


@pytest.mark.parametrize("name", MODELS)
def test_signal_equals_eager_attention(built, name):
    adapter = load(built, name)
    assert adapter.model.config.text_config._attn_implementation == "sdpa"
    questions, images, videos = batch(name)
    with torch.no_grad():
        inputs = adapter.prepare(questions, images, videos=videos)
        signal = adapter.text_attention(inputs)
    assert [b.sample for b in inputs.blocks] == [0, 1, 1] + [2] * (1 + (name != "tiny_llava_ov"))
    assert inputs.blocks[-1].modality == "video" and inputs.blocks[-1].grid[0] > 1
    for block in inputs.blocks:  # each block is one run of its modality's placeholders
        token = adapter.image_token_id if block.modality == "image" else adapter.video_token_id
        assert bool((inputs.input_ids[block.sample, block.first : block.first + block.count] == token).all())
        n = block.count if block.columns is None else block.columns.numel()
        assert n == block.grid[0] * block.grid[1] * block.grid[2]
    want = eager_text_attention(eager_model(built[name]), inputs, adapter)
    for got, expected in zip(signal, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
        assert float(got.sum()) < 1  # the softmax also covers the text keys


@pytest.mark.parametrize("name", ["tiny_qwen2vl", "tiny_qwen25vl"])
def test_signal_uses_the_models_own_mrope(built, name):
    """On the inputs built the HF way (the model computes its M-RoPE with get_rope_index itself)."""
    adapter = load(built, name)
    images, videos = random_images(1, seed=4), [video(4)]
    reference = qwen_hf_inputs(adapter, QUESTIONS[0], images, videos)
    with torch.no_grad():
        ours = adapter.prepare(QUESTIONS[:1], [images], videos=[videos])
        signal = adapter.text_attention(ours)
        probs = eager_model(built[name])(**reference, output_attentions=True).attentions[0][0]
    assert torch.equal(ours.input_ids, reference["input_ids"])
    ids = reference["input_ids"][0]
    for block, got in zip(ours.blocks, signal):
        rows = ~torch.isin(ids, torch.tensor([adapter.image_token_id, adapter.video_token_id]))
        rows &= torch.arange(ids.numel()) >= block.first + block.count
        want = probs[:, rows][:, :, block.first : block.first + block.count].mean(dim=(0, 1))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["tiny_qwen2vl", "tiny_llava_ov"])
def test_signal_rows_stop_before_the_answer(built, name):
    adapter = load(built, name)
    questions, images, videos = batch(name)
    with torch.no_grad():
        prompt_only = adapter.text_attention(adapter.prepare(questions[:1], images[:1], videos=videos[:1]))
        with_answer = adapter.prepare(questions[:1], images[:1], videos=videos[:1], answers=["red"])
        signal = adapter.text_attention(with_answer)
    want = eager_text_attention(eager_model(built[name]), with_answer, adapter)
    for got, alone, expected in zip(signal, prompt_only, want):
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


KEEP_ALL = {
    "tiny_qwen2vl": [
        (random_images(1, seed=2), []),
        ([], [video(3)]),
        (random_images(1, seed=5), [video(4)]),
    ],
    "tiny_llava_ov": [([big_image()], []), (random_images(2, seed=4), []), ([], [video(3)[:, :40, :56]])],
}


@pytest.mark.parametrize("reducer", ["mapper", "oracle"])
@pytest.mark.parametrize("name", ["tiny_qwen2vl", "tiny_llava_ov"])
def test_keep_all_reproduces_the_plain_hf_forward(built, name, reducer):
    """ratio=1.0 keeps every token: the splice is the unreduced one, the logits the plain HF model's."""
    keep_all = ExplainMapper(ratio=1.0) if reducer == "mapper" else ExplainOracle(ratio=1.0, answer_tokens=2)
    adapter, plain = load(built, name, keep_all), load(built, name)
    reference = AutoModelForImageTextToText.from_pretrained(built[name], dtype=torch.float32)
    hf_inputs = ov_hf_inputs if name == "tiny_llava_ov" else qwen_hf_inputs
    for question, (images, videos) in zip(QUESTIONS, KEEP_ALL[name]):
        hf = hf_inputs(adapter, question, images, videos)
        with torch.no_grad():
            ours = adapter.prepare([question], [images], videos=[videos])
            unreduced = plain.prepare([question], [images], videos=[videos])
            got = adapter.model(**ours.as_kwargs()).logits
            want = reference(**hf).logits
        assert torch.equal(ours.input_ids, hf["input_ids"])
        assert torch.equal(ours.position_ids, unreduced.position_ids)
        assert torch.equal(got, adapter.model(**unreduced.as_kwargs()).logits)
        # OneVision: bit-exact; Qwen: the adapter's own (unreduced) tower call differs from HF's
        # get_image_features in the last bits (~3e-7), as for reducer=none (tests/test_qwen2vl.py)
        exact = {"rtol": 0, "atol": 0} if name == "tiny_llava_ov" else {}
        torch.testing.assert_close(got, want, **exact)
        assert adapter.generate([question], [images], videos=[videos], max_new_tokens=5) == plain.generate(
            [question], [images], videos=[videos], max_new_tokens=5
        )


CASES = [
    pytest.param("tiny_qwen2vl", "mapper", id="qwen2vl-mapper"),
    pytest.param("tiny_qwen25vl", "mapper", id="qwen25vl-mapper"),
    pytest.param("tiny_llava_ov", "mapper", id="ov-mapper"),
    pytest.param("tiny_qwen2vl", "oracle", id="qwen2vl-oracle"),
    pytest.param("tiny_llava_ov", "oracle", id="ov-oracle"),
]


@pytest.mark.parametrize(("name", "reducer"), CASES)
def test_batch_with_different_kept_counts_answers_like_singles(built, name, reducer):
    """ratio 0.5 of images / videos of different sizes: the kept counts differ within the batch."""
    half = ExplainMapper(ratio=0.5) if reducer == "mapper" else ExplainOracle(ratio=0.5, answer_tokens=3)
    adapter = load(built, name, half)
    questions, images, videos = batch(name)
    singles = [
        adapter.generate([q], [i], videos=[v], max_new_tokens=6) for q, i, v in zip(questions, images, videos)
    ]
    with torch.no_grad():
        inputs = adapter.prepare(questions, images, videos=videos)
        full = load(built, name).prepare(questions, images, videos=videos)
    texts, kept = adapter.generate(questions, images, videos=videos, max_new_tokens=6)
    assert kept == [s[1][0] for s in singles] == inputs.visual_tokens
    assert len(set(kept)) == 3, kept
    newline = int(name == "tiny_llava_ov")  # a reduced OneVision item: kept tokens + one newline
    per_sample = [0, 0, 0]
    for block in full.blocks:
        n = block.count if block.columns is None else block.columns.numel()
        per_sample[block.sample] += resolve_budget(n, None, 0.5) + newline
    assert kept == per_sample
    assert texts == [s[0][0] for s in singles]
    with torch.no_grad():
        batched = adapter.model(**inputs.as_kwargs()).logits[:, -1]
        for b, (q, i, v) in enumerate(zip(questions, images, videos)):
            one = adapter.prepare([q], [i], videos=[v])
            torch.testing.assert_close(
                batched[b], adapter.model(**one.as_kwargs()).logits[0, -1], rtol=1e-4, atol=1e-4
            )


def greedy_by_hand(adapter, inputs, steps, banned):
    """Greedy decoding with full forwards (no cache), explicit positions continuing from the last one,
    never choosing a `banned` token (EOS, placeholders); the last-position logits of every step [B, steps, V]."""
    kwargs = inputs.as_kwargs()
    ids, mask, positions = kwargs["input_ids"], kwargs["attention_mask"], kwargs["position_ids"]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = adapter.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                mm_encoder_outputs=kwargs["mm_encoder_outputs"],
                use_cache=False,
            ).logits[:, -1]
            out.append(logits)
            allowed = logits.clone()
            allowed[:, banned] = float("-inf")
            token = allowed.argmax(-1, keepdim=True)  # [B, 1]
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            positions = torch.cat([positions, positions[..., -1:] + 1], -1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", ["tiny_qwen2vl", "tiny_llava_ov"])
def test_training_inputs_reach_the_mapper(built, name):
    """With answers (teacher forcing): labels cover the answers only, the signal rows stop before them,
    and the loss reaches the mapper's parameters (straight-through gate) and the projector."""
    mapper = ExplainMapper(ratio=0.5)
    adapter = load(built, name, mapper)
    questions, images, videos = batch(name)
    inputs = adapter.prepare(questions[1:], images[1:], videos=videos[1:], answers=["two", "yes"])
    for b, answer in enumerate(["two", "yes"]):
        assert inputs.labels[b][inputs.labels[b] != -100].tolist() == adapter.answer_ids(answer)
    adapter.model(**inputs.as_kwargs()).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mapper.net.parameters())
    projector = (
        adapter.model.model.visual.merger
        if name != "tiny_llava_ov"
        else adapter.model.model.multi_modal_projector
    )
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())


def mapper_choice(mapper, tokens, signal, grid):
    """The indices the mapper keeps of one item's tokens, from its signal (the reducer alone)."""
    kept = mapper(VisualTokens(tokens[None], grid, {LLM_TEXT_ATTN: signal[None]}))
    return kept.index[0, : int(kept.lengths[0])]


def test_qwen_positions_are_the_unpruned_mrope_gathered(built):
    """Every kept token keeps its (t, h, w) position, the text its offset; a video is one sequence
    (grid (t * h', w')) with one global budget; renumbering M-RoPE is refused."""
    mapper = ExplainMapper(ratio=0.25)
    adapter = load(built, "tiny_qwen2vl", mapper)
    images, videos = random_images(1, seed=5), [video(6)]
    with torch.no_grad():
        full = load(built, "tiny_qwen2vl").prepare(QUESTIONS[:1], [images], videos=[videos])
        reduced = adapter.prepare(QUESTIONS[:1], [images], videos=[videos])
        signal = adapter.text_attention(full)
    keep = torch.ones(full.input_ids.shape[1], dtype=torch.bool)
    for block, values in zip(full.blocks, signal):
        tokens = full.mm_encoder_outputs[block.modality].pooler_output[block.item]
        t, h, w = block.grid
        index = mapper_choice(mapper, tokens, values, (t * h, w))
        assert index.numel() == resolve_budget(t * h * w, None, 0.25)
        keep[block.first : block.first + block.count] = False
        keep[block.first + index] = True
    assert reduced.blocks[-1].modality == "video" and full.blocks[-1].grid[0] == 3  # 6 frames: 3 groups
    assert torch.equal(reduced.input_ids[0], full.input_ids[0, keep])
    assert torch.equal(reduced.position_ids[1:, 0], full.position_ids[1:, 0, keep])
    assert torch.equal(reduced.position_ids[0, 0], torch.arange(int(keep.sum())))
    mapper.positions = "renumber"
    with pytest.raises(ValueError, match="positions='renumber' is not supported"):
        adapter.prepare(QUESTIONS[:1], [images], videos=[videos])


def test_onevision_positions_gather_or_renumber(built):
    """gather: the kept tokens (base + canvas of an image, all frames of a video as one sequence) and
    the text keep their unreduced positions, a reduced item's newline its last newline's; generate
    (KV cache) continues them like full forwards; renumber: contiguous."""
    mapper = ExplainMapper(ratio=0.25)
    adapter = load(built, "tiny_llava_ov", mapper)
    images, videos = [[big_image()], []], [[], [video(3)]]
    with torch.no_grad():
        full = load(built, "tiny_llava_ov").prepare(QUESTIONS[:2], images, videos=videos)
        reduced = adapter.prepare(QUESTIONS[:2], images, videos=videos)
        signal = adapter.text_attention(full)
    assert reduced.gathered_positions
    newline = adapter.model.model.image_newline
    for b, (block, values) in enumerate(zip(full.blocks, signal)):
        assert block.sample == b
        item = full.mm_encoder_outputs[block.modality].pooler_output
        item = item[block.item] if block.modality == "image" else item[0]
        assert bool((item[~torch.isin(torch.arange(block.count), block.columns)] == newline).all())
        index = mapper_choice(mapper, item[block.columns], values, (1, block.columns.numel()))
        keep = full.attention_mask[b].bool().clone()
        keep[block.first : block.first + block.count] = False
        keep[block.first + block.columns[index]] = True
        keep[block.first + block.count - 1] = True  # the trailing newline
        valid = reduced.attention_mask[b].bool()
        assert torch.equal(reduced.input_ids[b, valid], full.input_ids[b, keep])
        assert torch.equal(reduced.position_ids[b, valid], full.position_ids[b, keep])
    banned = [adapter.tokenizer.eos_token_id, adapter.image_token_id, adapter.video_token_id]
    want = greedy_by_hand(adapter, reduced, 3, banned)
    contiguous = (reduced.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        renumbered_logits = adapter.model(**{**reduced.as_kwargs(), "position_ids": contiguous}).logits[:, -1]
    assert not torch.allclose(renumbered_logits, want[:, 0], atol=1e-3)  # the gathered positions matter
    recorder = RecordScores()
    adapter.generate(
        QUESTIONS[:2],
        images,
        videos=videos,
        max_new_tokens=3,
        min_new_tokens=3,
        suppress_tokens=banned[1:],
        logits_processor=LogitsProcessorList([recorder]),
    )
    assert len(recorder.scores) == 3
    for step, scores in enumerate(recorder.scores):
        scores = scores.clone()
        scores[:, banned] = want[:, step, banned]  # masked by min_new_tokens / suppress_tokens
        torch.testing.assert_close(scores, want[:, step], rtol=1e-4, atol=1e-4)
    mapper.positions = "renumber"
    with torch.no_grad():
        renumbered = adapter.prepare(QUESTIONS[:2], images, videos=videos)
    mask = renumbered.attention_mask
    assert not renumbered.gathered_positions and torch.equal(renumbered.input_ids, reduced.input_ids)
    assert torch.equal(renumbered.position_ids, (mask.cumsum(-1) - 1).clamp(min=0))


@pytest.mark.parametrize("name", ["tiny_qwen2vl", "tiny_llava_ov"])
def test_videos_use_the_video_mapper(built, name, tmp_path):
    """reducer.video_checkpoint: images are scored by the image mapper, videos by the video mapper."""
    nets = {}
    for seed, kind in ((1, "image"), (2, "video")):
        torch.manual_seed(seed)
        nets[kind] = MapperNet()
        save_mapper(nets[kind], tmp_path / kind)
    mapper = ExplainMapper(
        checkpoint=str(tmp_path / "image"), video_checkpoint=str(tmp_path / "video"), ratio=0.5
    )
    assert mapper.for_modality("image") is mapper and mapper.for_modality("video").mapper is mapper
    adapter = load(built, name, mapper)
    images, videos = [[random_images(1, seed=6)[0]]], [[video(4)]]
    with torch.no_grad():
        full = load(built, name).prepare(QUESTIONS[:1], images, videos=videos)
        reduced = adapter.prepare(QUESTIONS[:1], images, videos=videos)
        signal = adapter.text_attention(full)
    picked = {}
    for block, values in zip(full.blocks, signal):
        scores = {kind: net(values[None])[0] for kind, net in nets.items()}
        top = {
            kind: torch.sort(s, descending=True, stable=True).indices[: resolve_budget(len(s), None, 0.5)]
            for kind, s in scores.items()
        }
        assert not torch.equal(top["image"].sort().values, top["video"].sort().values)
        picked[block.modality] = top[block.modality].sort().values
    blocks = {block.modality: block for block in reduced.blocks}
    for modality, block in blocks.items():
        tokens = reduced.mm_encoder_outputs[modality].pooler_output
        got = tokens[block.item] if modality == "image" or name != "tiny_llava_ov" else tokens[0]
        source = full.mm_encoder_outputs[modality].pooler_output
        source = source[0] if modality == "video" and name == "tiny_llava_ov" else source[block.item]
        columns = full.blocks[[b.modality for b in full.blocks].index(modality)].columns
        source = source if columns is None else source[columns]
        torch.testing.assert_close(got[: picked[modality].numel()], source[picked[modality]])


@pytest.fixture(scope="module")
def deep_qwen(built, tmp_path_factory):
    """tiny_qwen2vl with 3 LLM layers (the recursion's order matters), saved and loaded like any checkpoint."""
    from transformers import Qwen2VLForConditionalGeneration

    source = built["tiny_qwen2vl"]
    config = AutoConfig.from_pretrained(source)
    config.text_config.num_hidden_layers = 3
    config.text_config.layer_types = ["full_attention"] * 3
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("models") / "tiny_qwen2vl_3"
    Qwen2VLForConditionalGeneration(config).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    AutoImageProcessor.from_pretrained(source).save_pretrained(path)
    return str(path)


def brute_force(model, ids, types, features, grid, modality, token_id, answer):
    """Per answer token: backward of its logit, Ā^l = mean_h clamp(A ⊙ ∇A, 0) as full S×S matrices,
    R = I, R ← R + Ā^l R for l = 0 … L-1, row of the predicting position; mean over the answer. The
    M-RoPE positions of prompt + answer come from the model's own get_rope_index."""
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == token_id)[..., None], features).detach().requires_grad_(True)
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, **{f"{modality}_grid_thw": grid})
    out = model(inputs_embeds=embeds, position_ids=positions, output_attentions=True, use_cache=False)
    for a in out.attentions:
        a.retain_grad()
    length = ids.shape[1]
    total = torch.zeros(length, dtype=torch.float64)
    for t, token in enumerate(answer):
        p = length - len(answer) - 1 + t
        for a in out.attentions:
            a.grad = None
        out.logits[0, p, token].backward(retain_graph=True)
        relevance = torch.eye(length, dtype=torch.float64)
        for a in out.attentions:
            relevance = (
                relevance + (a[0].detach().double() * a.grad[0].double()).clamp(min=0).mean(0) @ relevance
            )
        total += relevance[p]
    return (total / len(answer)).float()


def test_relevance_equals_brute_force(deep_qwen):
    """A left-padded batch of an image sample and a video sample (temporal M-RoPE positions)."""
    adapter = Qwen2VLAdapter.from_pretrained(deep_qwen, dtype="float32", device="cpu", video_max_pixels=1600)
    eager = eager_model(deep_qwen)
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS[:2], [random_images(1), []], videos=[[], [video(4)]])
        answers = adapter.greedy_answer_ids(inputs, 3)
    answers = [[t for t in a if t != adapter.tokenizer.eos_token_id] or [7] for a in answers]
    got = adapter.answer_relevance(inputs, answers)
    assert [b.modality for b in inputs.blocks] == ["image", "video"]
    for block, relevance, answer in zip(inputs.blocks, got, answers):
        valid = inputs.attention_mask[block.sample].bool()
        ids = torch.cat([inputs.input_ids[block.sample, valid], torch.tensor(answer)])[None]
        types = (ids == adapter.image_token_id).int() + 2 * (ids == adapter.video_token_id).int()
        token = adapter.image_token_id if block.modality == "image" else adapter.video_token_id
        features = inputs.mm_encoder_outputs[block.modality].pooler_output[block.item]
        t, h, w = block.grid
        grid = torch.tensor([[t, 2 * h, 2 * w]])
        want = brute_force(eager, ids, types, features, grid, block.modality, token, answer)
        first = block.first - int((~valid).sum())
        want = want[first : first + block.count]
        scale = float(want.abs().max())
        assert scale > 0
        torch.testing.assert_close(relevance, want, rtol=1e-4, atol=1e-6 * scale)


class Samples:
    def __init__(self, samples):
        self.items = samples

    def samples(self):
        yield from self.items


@pytest.mark.parametrize("name", ["tiny_qwen2vl", "tiny_llava_ov"])
def test_label_records_per_image_and_video(built, name, tmp_path):
    adapter = load(built, name)
    images = random_images(2, seed=3)
    data = Samples(
        [
            LabelSample("one", QUESTIONS[0], "red", [images[0]]),
            LabelSample("two", QUESTIONS[1], "two", images),
            LabelSample("clip", QUESTIONS[2], "yes", [], videos=[video(4)]),
        ]
    )
    settings = LabelSettings(output_dir=str(tmp_path), only_correct=False, max_new_tokens=2, progress=False)
    summary = label(adapter, data, settings)
    assert summary["labelled_samples"] == 3 and summary["records"] == 4
    records = {r.id: r for r in read_labels([tmp_path])}
    assert sorted(records) == ["clip", "one", "two/0", "two/1"]
    assert [records[k].modality for k in ("one", "two/0", "clip")] == ["image", "image", "video"]
    assert records["clip"].grid[0] > 1  # all frames: one record
    with torch.no_grad():
        inputs = adapter.prepare([QUESTIONS[2]], [[]], videos=[[video(4)]])
        signal = adapter.text_attention(inputs)[0]
        answer = adapter.greedy_answer_ids(inputs, 2)[0]
    eos = adapter.tokenizer.eos_token_id
    relevance = adapter.answer_relevance(inputs, [[t for t in answer if t != eos]])[0]
    record = records["clip"]
    assert record.grid == inputs.blocks[0].grid and record.text_attn.numel() == np.prod(record.grid)
    torch.testing.assert_close(record.text_attn, signal)  # the mapper's input is the inference signal
    torch.testing.assert_close(record.relevance, relevance)


@pytest.mark.slow
@pytest.mark.integration
def test_labels_train_evaluate_end_to_end(built, tmp_path):
    """`tokenprune.label`, `tokenprune.train train=mapper`, `tokenprune.eval` (lmms-eval, smoke
    benchmark) chained on tiny_qwen2vl with reducer=explain_mapper."""
    common = ["model=tiny_qwen2vl", f"model.path={built['tiny_qwen2vl']}", f"paths.outputs={tmp_path}"]
    done = run_module(
        "tokenprune.label",
        *common,
        "source=instruct_fixture",
        "label.only_correct=false",
        "label.max_new_tokens=2",
        "label.progress=false",
    )
    assert "4 samples labelled (4 records), 5 skipped" in done.stdout
    run_module(
        "tokenprune.train",
        *common,
        "benchmark=smoke",
        "reducer=explain_mapper",
        "train=mapper",
        "train.trainer.max_epochs=3",
        "train.trainer.accelerator=cpu",
        "train.trainer.enable_progress_bar=false",
        "train.data.val_fraction=0",
        "benchmark.limit=2",
    )
    trained = json.loads(
        next((tmp_path / "results").glob("*-explain_mapper-smoke-mapper-*.json")).read_text()
    )
    assert trained["metrics"]["train/records"] == 4 and trained["efficiency"]["failed_samples"] == 0
    mapper = next((tmp_path / "train").glob("tiny_qwen2vl-explain_mapper-mapper-*")) / "mapper"
    run_module(
        "tokenprune.eval",
        *common,
        "benchmark=smoke",
        "reducer=explain_mapper",
        f"reducer.checkpoint={mapper}",
        "benchmark.limit=2",
    )
    evaluated = json.loads(
        next((tmp_path / "results").glob("*-explain_mapper-smoke-none-*.json")).read_text()
    )
    assert (
        evaluated["efficiency"]["failed_samples"] == 0 and evaluated["efficiency"]["visual_tokens_mean"] > 0
    )
    assert evaluated["efficiency"]["visual_tokens_mean"] == trained["efficiency"]["visual_tokens_mean"]

    def answers(result):
        path = tmp_path / "results" / result["samples_file"]
        return {(r["task"], r["doc_id"]): r["answer"] for r in map(json.loads, path.read_text().splitlines())}

    assert answers(evaluated) == answers(trained)  # the saved mapper is the one the fit evaluated
