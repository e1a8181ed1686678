"""The reduction point inside the LLM (`space="llm_layer"`) on all three tiny families: signals vs an
eager forward, keep-all == the unreduced model, the pruned forward == a layer-by-layer reference with
an explicit mask, batch 1 == batch N with mixed kept counts, cached generation == no-cache recompute."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import random_images
from transformers import AutoModelForImageTextToText

from tokenprune.models.llava import LlavaAdapter
from tokenprune.models.llava_ov import LlavaOnevisionAdapter
from tokenprune.models.qwen2vl import Qwen2VLAdapter
from tokenprune.reducers.keep_by_signal import KeepBySignal
from tokenprune.types import (
    LLM_LAYER_LAST_ATTN,
    LLM_LAYER_LAST_ATTN_HEADS,
    LLM_LAYER_NEXT_LAST_ATTN,
    LLM_LAYER_SIGNALS,
    LLM_LAYER_TEXT_ATTN,
    LayerTokens,
    Reduced,
    Video,
)

FAMILIES = ["tiny_llava", "tiny_qwen2vl", "tiny_llava_ov"]
QUESTIONS = ["What color is the square?", "How many objects are there in the image?"]
DEPTH = 4  # decoder layers after `deepen` (the tiny checkpoints have 2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tokenprune.models.tiny import BUILDERS

    root = tmp_path_factory.mktemp("layered")
    return {name: str(BUILDERS[name](root / name)) for name in FAMILIES}


def deepen(model, depth: int = DEPTH, seed: int = 0):
    """Grow the LLM to `depth` decoder layers: copies of the existing ones with seeded noise."""
    language_model = model.model.language_model
    generator = torch.Generator().manual_seed(seed)
    while len(language_model.layers) < depth:
        layer = copy.deepcopy(language_model.layers[len(language_model.layers) % 2])
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        layer.self_attn.layer_idx = len(language_model.layers)
        language_model.layers.append(layer)
    config = model.config.text_config
    assert language_model.config is config
    config.num_hidden_layers = depth
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[0]] * depth
    return model


def load(path: str, name: str, reducer=None, attn: str = "sdpa"):
    kwargs = {"reducer": reducer, "dtype": "float32", "device": "cpu", "attn_implementation": attn}
    if name == "tiny_llava":
        adapter = LlavaAdapter.from_pretrained(path, **kwargs)
    elif name == "tiny_qwen2vl":
        adapter = Qwen2VLAdapter.from_pretrained(path, video_max_pixels=1600, **kwargs)
    else:
        adapter = LlavaOnevisionAdapter.from_pretrained(path, **kwargs)
    deepen(adapter.model)
    return adapter


def media(name: str) -> tuple[list, dict]:
    """Two samples of different visual counts: one image; two images (LLaVA) or an image and a video."""
    images = random_images(3, seed=4)
    if name == "tiny_llava":
        return [[images[0]], [images[1], images[2]]], {}
    frames = (np.random.default_rng(1).random((3, 40, 40, 3)) * 255).astype("uint8")
    return [[images[0]], [images[1]]], {"videos": [[], [Video(frames)]]}


class Recorder:
    """Keeps every token (or replays given indices) and records what it received at each cut."""

    space = "llm_layer"
    requires = LLM_LAYER_SIGNALS

    def __init__(self, layers, replay=None, positions="gather"):
        self.layers, self.replay, self.positions = tuple(layers), replay, positions
        self.seen: list[LayerTokens] = []

    def __call__(self, tokens: LayerTokens) -> Reduced:
        self.seen.append(tokens)
        if self.replay is not None:
            return self.replay[tokens.stage]
        b, n, _ = tokens.features.shape
        index = torch.arange(n).expand(b, n)
        index = torch.where(index < tokens.lengths[:, None], index, -1)
        return Reduced(tokens.features, index, tokens.lengths)


class Spy(KeepBySignal):
    """KeepBySignal that remembers what it returned at each cut."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.outputs: list[Reduced] = []

    def __call__(self, tokens: LayerTokens) -> Reduced:
        out = super().__call__(tokens)
        self.outputs.append(out)
        return out


def visual_columns(adapter, inputs, b: int) -> torch.Tensor:
    ids = inputs.input_ids[b]
    visual = torch.zeros_like(ids, dtype=torch.bool)
    for token_id in adapter.llm_input.token_ids.values():
        visual |= ids == token_id
    return visual.nonzero().squeeze(1)


# ----------------------------------------------------------------------------- signals
@pytest.mark.parametrize("name", FAMILIES)
def test_signals_equal_eager_attention(built, name):
    """Every llm_layer signal under SDPA == the eager model's output_attentions, rows sliced by hand."""
    k = 2
    recorder = Recorder([k])
    adapter = load(built[name], name, recorder)
    assert adapter.model.config.text_config._attn_implementation == "sdpa"
    images, extra = media(name)
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS, images, **extra)
        adapter.logits(inputs)
    eager = deepen(
        AutoModelForImageTextToText.from_pretrained(
            built[name], dtype=torch.float32, attn_implementation="eager"
        )
    ).eval()
    with torch.no_grad():
        attentions = eager(**inputs.as_kwargs(), output_attentions=True, use_cache=False).attentions
    tokens = recorder.seen[0]
    mask = inputs.attention_mask.bool()
    for b in range(2):
        cols = visual_columns(adapter, inputs, b)
        n = cols.numel()
        assert int(tokens.lengths[b]) == n
        last = attentions[k - 1][b][:, -1, cols]  # [H, n]
        torch.testing.assert_close(
            tokens.signals[LLM_LAYER_LAST_ATTN_HEADS][b, :, :n], last, rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            tokens.signals[LLM_LAYER_LAST_ATTN][b, :n], last.mean(0), rtol=0, atol=1e-6
        )
        text = mask[b].clone()
        text[: int(cols[0]) + 1] = False
        text[cols] = False
        want = attentions[k - 1][b][:, text][:, :, cols].mean(dim=(0, 1))
        torch.testing.assert_close(tokens.signals[LLM_LAYER_TEXT_ATTN][b, :n], want, rtol=0, atol=1e-6)
        want = attentions[k][b][:, -1, cols].mean(0)
        torch.testing.assert_close(tokens.signals[LLM_LAYER_NEXT_LAST_ATTN][b, :n], want, rtol=0, atol=1e-6)
        assert bool((tokens.signals[LLM_LAYER_LAST_ATTN][b, n:] == 0).all())


# ----------------------------------------------------------------------------- keep-all
@pytest.mark.parametrize("layers", [[1], [1, 3]])
@pytest.mark.parametrize("name", FAMILIES)
def test_keep_all_equals_the_unreduced_model(built, name, layers):
    adapter = load(built[name], name, KeepBySignal(layers=layers, keep=1.0))
    plain = load(built[name], name)
    images, extra = media(name)
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS, images, **extra)
        ours = adapter.logits(inputs)
        want = plain.logits(plain.prepare(QUESTIONS, images, **extra))
    valid = inputs.attention_mask.bool()
    assert ours.shape == want.shape
    assert torch.equal(ours[valid], want[valid])  # bit-exact (measured max |diff| 0.0 on all three)
    texts, counts = adapter.generate(QUESTIONS, images, **extra, max_new_tokens=6)
    assert (texts, counts) == plain.generate(QUESTIONS, images, **extra, max_new_tokens=6)


@pytest.mark.parametrize("name", FAMILIES)
def test_keep_all_loss_equals_the_unreduced_model(built, name):
    adapter = load(built[name], name, KeepBySignal(layers=[2], keep=1.0))
    plain = load(built[name], name)
    images, extra = media(name)
    with torch.no_grad():
        ours = adapter.loss(adapter.prepare(QUESTIONS, images, **extra, answers=["red", "two"]))
        want = plain.loss(plain.prepare(QUESTIONS, images, **extra, answers=["red", "two"]))
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- brute force
def masked_reference(adapter, inputs, layers, kept, renumber=False):
    """Every token through every layer; from each cut on, the pruned visual tokens are hidden as keys
    (an explicit [B, 1, L, L] mask) and, with `renumber`, the others take contiguous positions."""
    model = adapter.model
    language_model = model.model.language_model
    hidden = adapter.llm_input.embeddings(inputs)
    mask = inputs.attention_mask.bool()
    positions = inputs.position_ids[1:] if inputs.position_ids.dim() == 3 else inputs.position_ids
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    eye = torch.eye(length, dtype=torch.bool)
    visible = mask.clone()
    stage = 0
    for i, layer in enumerate(language_model.layers):
        if stage < len(layers) and i == layers[stage]:
            visible = kept[stage]
            if renumber:
                positions = (visible.cumsum(-1) - 1).clamp(min=0)
            stage += 1
        attention = (causal[None] & visible[:, None, :]) | eye[None]  # [B, L, L]
        embeddings = language_model.rotary_emb(hidden, positions)
        hidden = layer(hidden, attention_mask=attention[:, None], position_embeddings=embeddings)
    return model.lm_head(language_model.norm(hidden)), visible


def kept_masks(adapter, inputs, spy) -> list[torch.Tensor]:
    """Per cut, [B, L] bool: the rows of the LLM input still in the sequence after it."""
    out, current = [], []
    for b in range(inputs.input_ids.shape[0]):
        current.append(visual_columns(adapter, inputs, b))
    keep = inputs.attention_mask.bool().clone()
    for reduced in spy.outputs:
        keep = keep.clone()
        for b, cols in enumerate(current):
            keep[b, cols] = False
            chosen = cols[reduced.index[b, : int(reduced.lengths[b])]]
            keep[b, chosen] = True
            current[b] = chosen
        out.append(keep)
    return out


@pytest.mark.parametrize(
    ("name", "positions"),
    [
        ("tiny_llava", "gather"),
        ("tiny_llava", "renumber"),
        ("tiny_qwen2vl", "gather"),
        ("tiny_llava_ov", "gather"),
    ],
)
def test_pruned_forward_equals_masked_reference(built, name, positions):
    spy = Spy(layers=[1, 3], keep=[0.5, 0.25], positions=positions)
    adapter = load(built[name], name, spy)
    images, extra = media(name)
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS, images, **extra)
        out = adapter.layers.forward(spy, inputs)
        kept = kept_masks(adapter, inputs, spy)
        want, visible = masked_reference(adapter, inputs, [1, 3], kept, renumber=positions == "renumber")
    counts = [visual_columns(adapter, inputs, b).numel() for b in range(2)]
    assert out.layer_tokens == [[n // 2, n // 4] for n in counts] and counts[0] != counts[1]
    for b in range(2):
        rows = out.source[b][out.source[b] >= 0]
        assert torch.equal(rows, visible[b].nonzero().squeeze(1))
        torch.testing.assert_close(out.logits[b, -rows.numel() :], want[b, rows], rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("name", FAMILIES)
def test_batch_equals_each_sample_alone(built, name):
    adapter = load(built[name], name, KeepBySignal(layers=[1, 2], keep=[0.5, 0.3]))
    images, extra = media(name)
    timing: dict = {}
    texts, counts = adapter.generate(QUESTIONS, images, **extra, max_new_tokens=5, timing=timing)
    assert timing["layer_tokens"][0] != timing["layer_tokens"][1]  # mixed kept counts in one batch
    for b in range(2):
        alone = {key: [value[b]] for key, value in extra.items()}
        one: dict = {}
        assert adapter.generate([QUESTIONS[b]], [images[b]], **alone, max_new_tokens=5, timing=one) == (
            [texts[b]],
            [counts[b]],
        )
        assert one["layer_tokens"] == [timing["layer_tokens"][b]]
    with torch.no_grad():
        batched = adapter.logits(adapter.prepare(QUESTIONS, images, **extra))[:, -1]
        for b in range(2):
            alone = {key: [value[b]] for key, value in extra.items()}
            single = adapter.logits(adapter.prepare([QUESTIONS[b]], [images[b]], **alone))[0, -1]
            torch.testing.assert_close(batched[b], single, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- generation
def extended(inputs, tokens: torch.Tensor):
    """The inputs with generated tokens [B, T] appended, positions continuing each row by +1."""
    steps = torch.arange(1, tokens.shape[1] + 1)
    positions = inputs.position_ids
    grown = torch.cat([positions, positions[..., -1:] + steps], dim=-1)
    mask = torch.cat([inputs.attention_mask, torch.ones_like(tokens)], dim=-1)
    return type(inputs)(
        torch.cat([inputs.input_ids, tokens], dim=-1),
        mask,
        grown,
        inputs.mm_encoder_outputs,
        inputs.visual_tokens,
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_generation_equals_no_cache_recompute(built, name):
    """Greedy decoding with the KV cache == a full recompute per step with the prefill's selection."""
    spy = Spy(layers=[1, 3], keep=[0.6, 0.3])
    adapter = load(built[name], name, spy)
    images, extra = media(name)
    steps = 5
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS, images, **extra)
        ids, _ = adapter.layers.generate(spy, inputs, steps, adapter.tokenizer.pad_token_id, None)
        generated = ids[:, inputs.input_ids.shape[1] :]
        replay = Recorder([1, 3], replay=list(spy.outputs))
        for t in range(steps):
            out = adapter.layers.forward(replay, extended(inputs, generated[:, :t]))
            assert torch.equal(out.last_logits.argmax(-1), generated[:, t])
    assert generated.shape == (2, steps)


# ----------------------------------------------------------------------------- errors, reducer
def test_clear_errors(built):
    images, _ = media("tiny_llava")
    adapter = load(built["tiny_llava"], "tiny_llava", KeepBySignal(layers=[4], keep=0.5))
    with pytest.raises(ValueError, match=r"layers=\[4\].*1\.\.3"):
        adapter.generate(QUESTIONS[:1], images[:1], max_new_tokens=2)
    adapter.reducer = KeepBySignal(layers=[1], keep=0.5)
    with pytest.raises(ValueError, match="decodes greedily"):
        adapter.generate(QUESTIONS[:1], images[:1], max_new_tokens=2, num_beams=2)
    qwen = load(built["tiny_qwen2vl"], "tiny_qwen2vl", KeepBySignal(layers=[1], positions="renumber"))
    with pytest.raises(ValueError, match="M-RoPE"):
        qwen.generate(QUESTIONS[:1], images[:1], max_new_tokens=2)
    with pytest.raises(ValueError, match="signal must be one of"):
        KeepBySignal(signal=LLM_LAYER_LAST_ATTN_HEADS)


def layer_tokens(lengths, seed=0, d=8):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    n = int(lengths.max())
    valid = torch.arange(n)[None] < lengths[:, None]
    features = torch.randn(len(lengths), n, d, generator=generator) * valid[..., None]
    score = torch.rand(len(lengths), n, generator=generator) * valid
    return LayerTokens(features, lengths, lengths.clone(), {LLM_LAYER_LAST_ATTN: score}, layer=1, stage=0)


def test_keep_by_signal_contract():
    """Top-k by the signal per sample (oracle: sorted by hand), ascending, padded, batch-invariant."""
    tokens = layer_tokens([10, 7, 3])
    reducer = KeepBySignal(layers=1, keep=0.5)
    out = reducer(tokens)
    assert out.lengths.tolist() == [5, 3, 1]
    for b, n in enumerate([10, 7, 3]):
        k = int(out.lengths[b])
        want = torch.argsort(tokens.signals[LLM_LAYER_LAST_ATTN][b, :n], descending=True)[:k].sort().values
        assert torch.equal(out.index[b, :k], want) and bool((out.index[b, k:] == -1).all())
        assert torch.equal(out.features[b, :k], tokens.features[b, want])
        assert bool((out.features[b, k:] == 0).all())
        one = LayerTokens(
            tokens.features[b : b + 1, :n],
            tokens.lengths[b : b + 1],
            tokens.original[b : b + 1],
            {LLM_LAYER_LAST_ATTN: tokens.signals[LLM_LAYER_LAST_ATTN][b : b + 1, :n]},
        )
        alone = reducer(one)
        assert torch.equal(alone.index[0], out.index[b, :k]) and torch.equal(
            alone.features[0], out.features[b, :k]
        )
    everything = KeepBySignal(layers=1, keep=1.0)(tokens)
    assert everything.lengths.tolist() == [10, 7, 3]
    assert KeepBySignal(layers=1, keep=4)(tokens).lengths.tolist() == [4, 4, 3]


# ----------------------------------------------------------------------------- efficiency accounting
def test_staged_flops_by_hand():
    """Layers before a cut run on every token, later ones on the kept ones (per stage), cache per stage."""
    from tokenprune.eval import flops

    llm = flops.LlmShape(layers=4, width=8, mlp_width=16, heads=2, kv_heads=1, vocab=10)
    per_layer = lambda s: s * llm.linear_flops_per_token + 4 * s**2 * llm.width  # noqa: E731
    head = 2 * 8 * 10
    # 1 layer on 6 + 4 text tokens, 2 layers on 3 + 4, 1 layer on 1 + 4
    stages = flops.llm_stages(llm, [1, 3], [10, 7, 5])
    assert stages == [(1, 10), (2, 7), (1, 5)]
    assert flops.prefill_flops(llm, stages) == per_layer(10) + 2 * per_layer(7) + per_layer(5) + head
    assert flops.prefill_flops(llm, [(4, 10)]) == flops.prefill_flops(llm, 10)
    step = lambda c: llm.linear_flops_per_token + 4 * c * llm.width  # noqa: E731
    assert flops.decode_step_flops(llm, [(1, 11), (2, 8), (1, 6)]) == step(11) + 2 * step(8) + step(6) + head
    shape = flops.ModelShape(vision=None, llm=llm)
    out = flops.sample_flops(
        shape, KeepBySignal(layers=[1, 3]), (), "llm_layer", 1, 6, 4, 3, cuts=[1, 3], layer_tokens=[3, 1]
    )
    assert out["prefill"] == flops.prefill_flops(llm, stages)
    assert out["decode"] == flops.decode_step_flops(llm, [(1, 11), (2, 8), (1, 6)]) + flops.decode_step_flops(
        llm, [(1, 12), (2, 9), (1, 7)]
    )
    assert out["prefill_full"] == flops.prefill_flops(llm, 10) and out["total"] is None  # no vision formula


@pytest.mark.parametrize("name", FAMILIES)
def test_meter_counts_the_cut_llm_on_every_family(built, name):
    """eff/flops_prefill from a real generate's layer_tokens, on every family (vision FLOPs: LLaVA only)."""
    from tokenprune.eval import flops, meter

    reducer = KeepBySignal(layers=[1, 2], keep=[0.5, 0.25])
    adapter = load(built[name], name, reducer)
    images, extra = media(name)
    timing: dict = {}
    _, counts = adapter.generate(QUESTIONS, images, **extra, max_new_tokens=3, timing=timing)
    records = [
        {
            "task": "t",
            "doc_id": b,
            "visual_tokens": counts[b],
            "images": len(images[b]),
            "videos": len(extra.get("videos", [[], []])[b]),
            "text_tokens": timing["text_tokens"][b],
            "new_tokens": timing["new_tokens"][b],
            "layer_tokens": timing["layer_tokens"][b],
        }
        for b in range(2)
    ]
    eff = meter.summarize(records, adapter)
    llm = flops.llm_shape(adapter.model.config.text_config)
    assert llm.layers == DEPTH
    want = [
        flops.prefill_flops(
            llm,
            flops.llm_stages(
                llm,
                [1, 2],
                [counts[b] + r["text_tokens"]] + [k + r["text_tokens"] for k in r["layer_tokens"]],
            ),
        )
        for b, r in enumerate(records)
    ]
    assert eff["eff/flops_prefill_mean"] == sum(want) / 2
    assert eff["eff/flops_prefill_mean"] < eff["eff/flops_prefill_full_mean"]
    assert eff["eff/layer_tokens_mean"] == [sum(r["layer_tokens"][i] for r in records) / 2 for i in range(2)]
    # layers 0 hold every visual token, 1 the first cut's, 2 .. DEPTH - 1 the second's
    by_hand = [
        (r["visual_tokens"] + r["layer_tokens"][0] + (DEPTH - 2) * r["layer_tokens"][1]) / DEPTH
        for r in records
    ]
    assert eff["eff/visual_tokens_layer_avg"] == pytest.approx(sum(by_hand) / 2)
    assert (eff["eff/flops_vit_mean"] is not None) == (name == "tiny_llava")
