"""FastV, PDrop and DART inside the LLM on all three tiny families, each against an independent
brute-force port of its reference's rule: every sample alone (batch 1, no padding), the decoder layers
run one by one under eager attention with an explicit additive mask (pruned tokens hidden as keys),
the score read from the eager attention weights / the KV cache of that run and selected as the
reference does (docs/peers.md). The runner under test runs the batch of two (mixed visual counts,
left padding) under SDPA and under eager. Kept columns in order and the final logits must match; cached decoding ==
no-cache recompute; every in-LLM config keeps the documented counts at 576 tokens."""

from __future__ import annotations

import pytest
import torch
from test_layered import (
    FAMILIES,
    QUESTIONS,
    Recorder,
    built,  # noqa: F401 (module fixture)
    extended,
    kept_masks,
    load,
    media,
    visual_columns,
)
from transformers import DynamicCache

from tokenprune.models.layered import LayerRunner
from tokenprune.reducers.dart import DART
from tokenprune.reducers.fastv import FastV
from tokenprune.reducers.pdrop import PDrop
from tokenprune.types import (
    LLM_LAYER_KEYS,
    LLM_LAYER_LAST_ATTN,
    LLM_LAYER_NEXT_LAST_ATTN,
    LLM_LAYER_NORMED,
    LLM_LAYER_TEXT_KEYS,
    LLM_LAYER_TEXT_LENGTHS,
    LLM_LAYER_TEXT_NORMED,
    LayerTokens,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Spy:
    """Any layer reducer, remembering what it returned at each cut."""

    space = "llm_layer"

    def __init__(self, reducer):
        self.reducer, self.outputs = reducer, []
        self.requires, self.layers, self.positions = reducer.requires, reducer.layers, reducer.positions

    def __call__(self, tokens):
        out = self.reducer(tokens)
        self.outputs.append(out)
        return out


def method(kind: str, name: str):
    """The reducer under test on the 4-layer tiny LLMs (PDrop on Qwen2-VL: gathered M-RoPE positions)."""
    if kind == "fastv":
        return FastV(layer=2, drop_ratio=0.75)
    if kind == "fastv_rank":
        return FastV(layer=1, drop_ratio=None, rank=40)
    if kind == "pdrop":
        return PDrop(layers=[1, 2, 3], positions="gather" if name == "tiny_qwen2vl" else "renumber")
    if kind == "dart":
        return DART(layer=2, budget=None, reduction_ratio=0.75)
    if kind == "dart_exact":
        return DART(layer=1, budget=21, count="exact", image_pivots=3, text_pivots=2)
    raise KeyError(kind)


# ----------------------------------------------------------------------------- the brute-force reference
def top(score: torch.Tensor, candidates: list[int], k: int) -> list[int]:
    """The reference's torch.topk over the candidates' scores, kept columns in sequence order."""
    return sorted(candidates[j] for j in score.topk(min(k, len(candidates))).indices.tolist())


def select_fastv(reducer, run, n0):
    k = reducer.rank if reducer.rank is not None else round(n0 * (1 - reducer.drop_ratio))
    weights = run["weights"][run["layer"] - 1][0]  # [H, L, L] eager probabilities of layer K-1
    return top(weights[:, run["last"], run["current"]].mean(0), run["current"], k)


def select_pdrop(reducer, run, n0):
    layer = run["model"].model.language_model.layers[run["layer"]]  # the next layer's weights
    hidden = run["hidden"]
    embeddings = run["model"].model.language_model.rotary_emb(hidden, run["positions"])
    _, weights = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden),
        attention_mask=run["mask"],
        position_embeddings=embeddings,
    )
    score = weights[0][:, run["last"], run["current"]].mean(0)
    return top(score, run["current"], int(n0 * reducer.keep[run["stage"]]))


def select_dart(reducer, run, n0):
    language_model = run["model"].model.language_model
    keys = run["cache"].layers[run["layer"] - 1].keys[0]  # [Hkv, L, d] post-RoPE, as the model cached
    attention = language_model.layers[0].self_attn
    keys = keys.repeat_interleave(attention.num_key_value_groups, 0).permute(1, 0, 2).flatten(1)  # [L, H d]
    norms = keys.abs().sum(-1)
    visual = run["current"]
    text = [c for c in range(visual[0], run["last"] + 1) if c not in set(visual)]
    image_pivots = top(norms[visual], visual, reducer.image_pivots)
    text_pivots = top(norms[text], text, reducer.text_pivots)
    normed = language_model.norm(run["hidden"])[0]  # [L, D] layer K-1's output, final norm
    pivots = image_pivots + text_pivots
    budget = reducer.budget if reducer.budget is not None else int(n0 * (1 - reducer.reduction_ratio))
    if reducer.count == "reference":
        picks = [budget // len(pivots)] * len(pivots)
    else:
        extra = budget - reducer.image_pivots
        picks = [extra // len(pivots) + (i < extra % len(pivots)) for i in range(len(pivots))]
    pool = [c for c in visual if c not in image_pivots]
    kept = set(image_pivots)
    for pivot, t in zip(pivots, picks):
        similarity = torch.nn.functional.cosine_similarity(normed[pivot][None], normed[pool], dim=-1)
        chosen = [pool[j] for j in (-similarity).topk(min(t, len(pool))).indices.tolist()]
        kept.update(chosen)
        pool = [c for c in pool if c not in chosen]
    return sorted(kept)


SELECT = {FastV: select_fastv, PDrop: select_pdrop, DART: select_dart}


@torch.no_grad()
def reference(eager, inputs, reducer, labels=None):
    """One sample (batch 1): (kept visual columns per cut, [L, V] logits, rows in the sequence at the end)."""
    model = eager.model
    language_model = model.model.language_model
    hidden = eager.llm_input.embeddings(inputs)
    length = hidden.shape[1]
    visual = visual_columns(eager, inputs, 0).tolist()
    last = length - 1 if labels is None else int((labels[0] != -100).int().argmax()) - 1
    positions = inputs.position_ids[1:] if inputs.position_ids.dim() == 3 else inputs.position_ids
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    eye = torch.eye(length, dtype=torch.bool)
    visible = torch.ones(length, dtype=torch.bool)
    weights: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: weights.__setitem__(i, out[1]))
        for i, layer in enumerate(language_model.layers)
    ]
    cache, current, history = DynamicCache(), visual, []
    cuts = list(reducer.layers)

    def mask():
        allowed = (causal & visible[None]) | eye
        return torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]

    try:
        for i, layer in enumerate(language_model.layers):
            if i in cuts:
                run = {
                    "model": model,
                    "hidden": hidden,
                    "positions": positions,
                    "mask": mask(),
                    "cache": cache,
                }
                run |= {
                    "weights": weights,
                    "layer": i,
                    "stage": cuts.index(i),
                    "last": last,
                    "current": current,
                }
                current = SELECT[type(reducer)](reducer, run, len(visual))
                history.append(current)
                visible = torch.ones(length, dtype=torch.bool)
                visible[sorted(set(visual) - set(current))] = False
                if reducer.positions == "renumber":
                    positions = (visible.cumsum(-1) - 1)[None]
            embeddings = language_model.rotary_emb(hidden, positions)
            hidden = layer(
                hidden, attention_mask=mask(), position_embeddings=embeddings, cache=cache, use_cache=True
            )
    finally:
        for hook in hooks:
            hook.remove()
    return history, model.lm_head(language_model.norm(hidden))[0], visible.nonzero().squeeze(1)


def alone(name, b):
    images, extra = media(name)
    return [QUESTIONS[b]], [images[b]], {key: [value[b]] for key, value in extra.items()}


CASES = [(kind, name) for kind in ("fastv", "pdrop", "dart") for name in FAMILIES]
CASES += [("fastv_rank", "tiny_llava"), ("dart_exact", "tiny_qwen2vl")]


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_matches_the_brute_force_reference(built, kind, name):  # noqa: F811
    spy = Spy(method(kind, name))
    adapter = load(built[name], name, spy)
    eager = load(built[name], name, attn="eager")
    images, extra = media(name)
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS, images, **extra)
        out = adapter.layers.forward(spy, inputs)
    kept = kept_masks(adapter, inputs, spy)
    with torch.no_grad():  # the runner under eager attention: the same cuts and logits
        eager_spy = Spy(spy.reducer)
        eager_out = LayerRunner(eager.model, eager.llm_input).forward(eager_spy, inputs)
    assert all(torch.equal(a, b) for a, b in zip(kept_masks(eager, inputs, eager_spy), kept))
    torch.testing.assert_close(eager_out.logits, out.logits, rtol=0, atol=2e-5)
    counts = [visual_columns(adapter, inputs, b).numel() for b in range(2)]
    assert counts[0] != counts[1]  # mixed visual counts in one batch
    if kind in ("fastv", "pdrop", "dart"):  # counts relative to N0: mixed kept counts too
        assert out.layer_tokens[0] != out.layer_tokens[1]
    for b in range(2):
        questions, sample_images, sample_extra = alone(name, b)
        single = eager.prepare(questions, sample_images, **sample_extra)
        history, logits, rows = reference(eager, single, spy.reducer)
        pad = int((~inputs.attention_mask[b].bool()).sum())
        visual = set(visual_columns(adapter, inputs, b).tolist())
        for stage, want in enumerate(history):
            ours = [c - pad for c in kept[stage][b].nonzero().squeeze(1).tolist() if c in visual]
            assert ours == want, f"cut {stage}: kept columns differ"
        assert out.layer_tokens[b] == [len(h) for h in history]
        ours_rows = out.source[b][out.source[b] >= 0] - pad
        assert torch.equal(ours_rows, rows)
        torch.testing.assert_close(out.logits[b, -rows.numel() :], logits[rows], rtol=0, atol=2e-5)
        if inputs.position_ids.dim() == 3:  # Qwen2-VL: the kept tokens keep their (t, h, w) M-RoPE ids
            rope = out.segments[-1][1]
            real = out.source[b] >= 0
            torch.testing.assert_close(rope[:, b, real], inputs.position_ids[1:, b, out.source[b][real]])


def test_pdrop_training_rows_are_the_last_instruction_token(built):  # noqa: F811
    """With answers (training), PDrop ranks from the token before the first labelled one: the loss ==
    the reference's cross-entropy with that row."""
    name = "tiny_llava"
    spy = Spy(PDrop(layers=[1, 3], ratio=0.5))
    adapter = load(built[name], name, spy)
    eager = load(built[name], name, attn="eager")
    images, _ = media(name)
    answers = ["red", "two"]
    with torch.no_grad():
        loss = adapter.loss(adapter.prepare(QUESTIONS, images, answers=answers))
        total, count = 0.0, 0
        for b in range(2):
            single = eager.prepare([QUESTIONS[b]], [images[b]], answers=[answers[b]])
            labels = single.labels
            history, logits, rows = reference(eager, single, spy.reducer, labels=labels)
            plain, _, _ = reference(eager, single, spy.reducer)
            assert history != plain  # the row matters: the last prompt token would keep others
            target = labels[0, rows][1:]
            terms = torch.nn.functional.cross_entropy(
                logits[rows][:-1], target, ignore_index=-100, reduction="sum"
            )
            total, count = total + terms, count + int((target != -100).sum())
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_token_signals_equal_the_eager_model(built, name):  # noqa: F811
    """DART's signals under SDPA == the eager model's own cached keys and hidden states (batch of 2)."""
    k = 2
    recorder = Recorder([k])
    adapter = load(built[name], name, recorder)
    eager = load(built[name], name, attn="eager")
    images, extra = media(name)
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS, images, **extra)
        adapter.logits(inputs)
        out = eager.model(**inputs.as_kwargs(), use_cache=True, output_hidden_states=True)
    tokens = recorder.seen[0]
    language_model = eager.model.model.language_model
    keys = out.past_key_values.layers[k - 1].keys  # [B, Hkv, L, d] post-RoPE
    groups = language_model.layers[0].self_attn.num_key_value_groups
    keys = keys.repeat_interleave(groups, 1).permute(0, 2, 1, 3).flatten(2)  # [B, L, H d]
    normed = language_model.norm(out.hidden_states[k])  # [B, L, D] layer K-1's output, final norm
    for b in range(2):
        visual = visual_columns(adapter, inputs, b)
        real = inputs.attention_mask[b].bool()
        text = real.clone()
        text[: int(visual[0]) + 1] = False
        text[visual] = False
        text = text.nonzero().squeeze(1)
        n, t = visual.numel(), text.numel()
        assert int(tokens.signals[LLM_LAYER_TEXT_LENGTHS][b]) == t
        for signal, want in ((LLM_LAYER_KEYS, keys[b, visual]), (LLM_LAYER_NORMED, normed[b, visual])):
            torch.testing.assert_close(tokens.signals[signal][b, :n], want, rtol=1e-5, atol=1e-5)
            assert bool((tokens.signals[signal][b, n:] == 0).all())
        for signal, want in ((LLM_LAYER_TEXT_KEYS, keys[b, text]), (LLM_LAYER_TEXT_NORMED, normed[b, text])):
            torch.testing.assert_close(tokens.signals[signal][b, :t], want, rtol=1e-5, atol=1e-5)
            assert bool((tokens.signals[signal][b, t:] == 0).all())


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("kind", ["fastv", "pdrop", "dart"])
@pytest.mark.parametrize("name", FAMILIES)
def test_cached_generation_equals_no_cache_recompute(built, kind, name):  # noqa: F811
    spy = Spy(method(kind, name))
    adapter = load(built[name], name, spy)
    images, extra = media(name)
    steps = 4
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS, images, **extra)
        ids, _ = adapter.layers.generate(spy, inputs, steps, adapter.tokenizer.pad_token_id, None)
        generated = ids[:, inputs.input_ids.shape[1] :]
        replay = Recorder(spy.layers, replay=list(spy.outputs), positions=spy.positions)
        for t in range(steps):
            out = adapter.layers.forward(replay, extended(inputs, generated[:, :t]))
            assert torch.equal(out.last_logits.argmax(-1), generated[:, t])
        for b in range(2):  # and batch == each sample alone
            questions, sample_images, sample_extra = alone(name, b)
            single = adapter.prepare(questions, sample_images, **sample_extra)
            one, _ = adapter.layers.generate(spy, single, steps, adapter.tokenizer.pad_token_id, None)
            assert torch.equal(one[0, single.input_ids.shape[1] :], generated[b])


# ----------------------------------------------------------------------------- configs and counts
def synthetic(n0: int, layer: int, stage: int, lengths: list[int], seed: int = 0) -> LayerTokens:
    generator = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths)
    n, b, d, t = max(lengths), len(lengths), 16, 12

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    signals = {
        LLM_LAYER_LAST_ATTN: rand(b, n).softmax(-1),
        LLM_LAYER_NEXT_LAST_ATTN: rand(b, n).softmax(-1),
        LLM_LAYER_KEYS: rand(b, n, d),
        LLM_LAYER_NORMED: rand(b, n, d),
        LLM_LAYER_TEXT_KEYS: rand(b, t, d),
        LLM_LAYER_TEXT_NORMED: rand(b, t, d),
        LLM_LAYER_TEXT_LENGTHS: torch.full((b,), t),
    }
    return LayerTokens(rand(b, n, d), lengths_t, torch.full((b,), n0), signals, layer=layer, stage=stage)


@pytest.mark.parametrize(
    ("config", "counts"),
    [
        ("fastv", [288]),
        ("fastv_k3", [288]),
        ("fastv_r75", [144]),
        ("fastv_64", [64]),
        ("fastv_128", [128]),
        ("fastv_192", [192]),
        ("pdrop", [288, 144, 72]),
        ("pdrop_64", [64, 32, 16]),
        ("pdrop_128", [210, 105, 53]),
        ("pdrop_192", [356, 178, 90]),
        ("dart", [132]),
        ("dart_64", [68]),
        ("dart_192", [196]),
    ],
)
def test_configs_keep_the_documented_counts(config, counts):
    """Every in-LLM config at N0 = 576 (LLaVA-1.5): the counts docs/peers.md states, per cut."""
    from hydra.utils import instantiate

    from tokenprune.config import compose

    reducer = instantiate(compose([f"reducer={config}"]).reducer)
    current = 576
    got = []
    for stage, layer in enumerate(reducer.layers):
        out = reducer(synthetic(576, layer, stage, [current]))
        assert out.index[0].tolist() == sorted(set(out.index[0].tolist()))  # ascending, distinct
        current = int(out.lengths[0])
        got.append(current)
    assert got == counts
    if config.startswith("pdrop_"):  # the budget = visual tokens averaged over the 32 layers
        bounds = [0, *reducer.layers, 32]
        average = sum((hi - lo) * c for lo, hi, c in zip(bounds, bounds[1:], [576, *counts])) / 32
        assert abs(average - int(config.split("_")[1])) <= 0.5


def test_dart_batch_equals_each_sample_alone_and_exact_count():
    """Mixed counts in one batch == each sample alone; count=exact keeps B, reference B + pivots."""
    tokens = synthetic(40, 2, 0, [40, 23, 31], seed=3)
    reducer = DART(budget=16, image_pivots=4, text_pivots=4)
    out = reducer(tokens)
    assert out.lengths.tolist() == [20, 20, 20]
    for b, n in enumerate([40, 23, 31]):
        one = LayerTokens(
            tokens.features[b : b + 1, :n],
            tokens.lengths[b : b + 1],
            tokens.original[b : b + 1],
            {
                k: v[b : b + 1, :n]
                if v.dim() == 3 and k in (LLM_LAYER_KEYS, LLM_LAYER_NORMED)
                else v[b : b + 1]
                for k, v in tokens.signals.items()
            },
        )
        single = reducer(one)
        assert torch.equal(single.index[0], out.index[b, : int(out.lengths[b])])
        torch.testing.assert_close(single.features[0], out.features[b, : int(out.lengths[b])])
    assert DART(budget=16, count="exact")(tokens).lengths.tolist() == [16, 16, 16]


def test_clear_errors():
    with pytest.raises(ValueError, match="exactly one of drop_ratio"):
        FastV(drop_ratio=None)
    with pytest.raises(ValueError, match="exactly one of ratio"):
        PDrop(ratio=0.5, keep=[0.5, 0.25, 0.1])
    with pytest.raises(ValueError, match="exactly one of budget"):
        DART(budget=None)
    with pytest.raises(ValueError, match="pivot_order"):
        DART(pivot_order="set")


# ----------------------------------------------------------------------------- efficiency per stage
def test_meter_reports_flops_before_and_after_each_cut(built):  # noqa: F811
    """eff/flops_{prefill,layer}_stages_mean from a real PDrop generate: per stage by hand."""
    from tokenprune.eval import flops, meter

    name = "tiny_llava_ov"
    adapter = load(built[name], name, PDrop(layers=[1, 2, 3]))
    images, extra = media(name)
    timing: dict = {}
    _, counts = adapter.generate(QUESTIONS, images, **extra, max_new_tokens=2, timing=timing)
    records = [
        {
            "task": "t",
            "doc_id": b,
            "visual_tokens": counts[b],
            "images": 1,
            "videos": len(extra["videos"][b]),
            "text_tokens": timing["text_tokens"][b],
            "new_tokens": timing["new_tokens"][b],
            "layer_tokens": timing["layer_tokens"][b],
        }
        for b in range(2)
    ]
    eff = meter.summarize(records, adapter)
    llm = flops.llm_shape(adapter.model.config.text_config)
    layer = lambda s: s * llm.linear_flops_per_token + 4 * s**2 * llm.width  # noqa: E731
    rows = [
        [counts[b] + r["text_tokens"]] + [k + r["text_tokens"] for k in r["layer_tokens"]]
        for b, r in enumerate(records)
    ]
    want = [(layer(rows[0][i]) + layer(rows[1][i])) / 2 for i in range(4)]
    assert eff["eff/flops_layer_stages_mean"] == want  # one layer each: stages of 1 layer
    assert eff["eff/flops_prefill_stages_mean"] == want
    assert want == sorted(want, reverse=True) and want[3] < want[0] / 4  # 1/8 of the visual tokens left
    head = 2 * llm.width * llm.vocab
    assert eff["eff/flops_prefill_mean"] == sum(want) + head


def test_cut_layers_beyond_the_model_are_refused_before_it_loads(tmp_path, tiny_llava_path):
    """PDrop's 32-layer cuts on the 2-layer tiny LLM: a one-line UserError naming the fix, nothing written."""
    from tokenprune.config import UserError, compose
    from tokenprune.eval.preflight import check_cut_layers
    from tokenprune.train.pipeline import run

    def cfg(*overrides):
        common = ["model=tiny_llava", f"model.path={tiny_llava_path}", "benchmark=smoke"]
        return compose([*common, f"paths.outputs={tmp_path / 'outputs'}", *overrides])

    with pytest.raises(
        UserError, match=r"reducer\.layers=\[8, 16, 24\]: .* 2 decoder layers.* 1\.\.1; .*at most 1 cut"
    ):
        run(cfg("reducer=pdrop"))
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(UserError, match=r"reducer\.layer=\[2\]: .*reducer\.layer=\[1\]"):
        check_cut_layers(cfg("reducer=fastv"))
    check_cut_layers(cfg("reducer=fastv", "reducer.layer=1"))  # fits: no error
    check_cut_layers(cfg("reducer=uniform"))  # not inside the LLM
