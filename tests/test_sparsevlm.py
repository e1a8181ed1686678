"""SparseVLM inside the LLM (`reducers/sparsevlm.py`) on all three tiny families, against an independent
brute-force port of the reference's semantics: each sample alone, layer by layer under eager attention
with explicit masks; raters, ratings, selection and DPC-kNN recycling written out here in plain loops.
Also: the reference's v1.5 counts on the LLaVA-1.5 shape, batch == each sample alone, the rater
signal under SDPA == eager, cached generation == no-cache recompute, v1's rank rule."""

from __future__ import annotations

import math

import pytest
import torch
from test_layered import FAMILIES, QUESTIONS, Recorder, built, extended, load, media, visual_columns  # noqa: F401

from tokenprune.models.layered import LayerRunner
from tokenprune.reducers.sparsevlm import SparseVLM
from tokenprune.types import LLM_LAYER_RATER_ATTN, LLM_LAYER_RATER_ATTN_ROWS, LayerTokens, Reduced

pytestmark = pytest.mark.usefixtures("one_thread")

CUTS = (1, 2, 3)  # the tiny LLMs have 4 decoder layers (test_layered.deepen)
KEEP = {"tiny_llava": (300, 200, 110), "tiny_qwen2vl": (40, 25, 12), "tiny_llava_ov": (150, 80, 40)}


class Spy(SparseVLM):
    """SparseVLM that remembers what it received and returned at each cut."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[LayerTokens] = []
        self.outputs: list[Reduced] = []

    def __call__(self, tokens: LayerTokens) -> Reduced:
        out = super().__call__(tokens)
        self.seen.append(tokens)
        self.outputs.append(out)
        return out


# ----------------------------------------------------------------------------- counts (no model)
@pytest.mark.parametrize(
    ("budget", "counts", "average"),
    [(192, [309, 204, 113], 192.03125), (128, [312, 117, 39], 128.625), (64, [82, 32, 18], 64.8125)],
)
def test_v15_counts_on_the_llava15_shape(budget, counts, average):
    """The notes' per-cut counts (kept + recycled) for 576 tokens and the reference's 32-layer average."""
    reducer = SparseVLM(budget=budget)
    assert reducer.layers == (3, 7, 16)
    generator = torch.Generator().manual_seed(0)
    n, seen = 576, []
    for stage, layer in enumerate(reducer.layers):
        features = torch.randn(1, n, 16, generator=generator)
        rating = torch.rand(1, n, generator=generator)
        tokens = LayerTokens(
            features, torch.tensor([n]), torch.tensor([576]), {LLM_LAYER_RATER_ATTN: rating}, layer, stage
        )
        out = reducer(tokens)
        n = int(out.lengths[0])
        seen.append(n)
        synthetic = int((out.index[0] == -1).sum())
        assert synthetic == reducer.recycled_count(len(features[0]) - (n - synthetic))[1] > 0
    assert seen == counts
    # the reference's "equal token num": layers 0-1 hold 576, layer 2 onwards the cut counts
    spans = [2, 4, 9, 17]
    assert sum(s * c for s, c in zip(spans, [576, *counts])) / 32 == average
    # the meter's layer average counts what each layer computes on: each scoring layer (2, 6, 15) still
    # holds the count before its cut, one layer per cut more than the reference counts
    from tokenprune.eval.meter import layer_average

    assert layer_average(576, counts, reducer.layers, 32) == average + (576 - counts[-1]) / 32


def test_v1_rank_rule_and_errors():
    """v1: k = min(int(rank * scale + bias), n - 1) from the rater rows (zero rows ignored); full rank: no cut."""
    reducer = SparseVLM(budget=128, version="v1")
    assert reducer.layers == (3, 7, 16, 20) and (reducer.scale, reducer.bias) == (9.0, 6.0)
    assert reducer.requires == (LLM_LAYER_RATER_ATTN, LLM_LAYER_RATER_ATTN_ROWS)
    generator = torch.Generator().manual_seed(1)
    rows = torch.zeros(6, 40)
    rows[:3] = torch.rand(3, 40, generator=generator)  # rank 3, three zero padding rows
    assert reducer.count(40, 0, rows) == 3 * 9 + 6
    assert reducer.count(30, 0, rows[:, :30]) == 29  # capped at n - 1
    square = torch.rand(4, 4, generator=generator)
    assert reducer.count(4, 0, square) == 4  # rank n: no cut
    with pytest.raises(ValueError, match="budget must be one of"):
        SparseVLM(budget=100)
    with pytest.raises(ValueError, match=r"v2\.0 is not implemented"):
        SparseVLM(version="v2.0")
    assert SparseVLM(budget=100, keep=[50, 20, 10]).keep == (50, 20, 10)


# ----------------------------------------------------------------------------- brute force
def ranked(values: list[float]) -> list[int]:
    """Indices by decreasing value, ties to the earlier one."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def dpc_knn(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, list[int]]:
    """The reference's DPC-kNN clustering and mean merge, token by token (ties: earlier candidate)."""
    m, dim = x.shape
    d = [[float((x[i] - x[j]).pow(2).sum().sqrt()) / math.sqrt(dim) for j in range(m)] for i in range(m)]
    density = [math.exp(-sum(v * v for v in sorted(d[i])[:clusters]) / clusters) for i in range(m)]
    largest = max(max(row) for row in d)
    order = ranked(density)
    place = {token: p for p, token in enumerate(order)}
    delta = [min([d[i][j] for j in range(m) if place[j] < place[i]], default=largest) for i in range(m)]
    centres = ranked([delta[i] * density[i] for i in range(m)])[:clusters]
    groups: list[list[int]] = [[] for _ in centres]
    for t in range(m):
        if t in centres:
            groups[centres.index(t)].append(t)
        else:
            distances = [d[c][t] for c in centres]
            groups[distances.index(min(distances))].append(t)
    merged = torch.stack([x[g].sum(0) / (len(g) + 1e-6) for g in groups])
    return merged, centres


def brute_force(adapter, inputs, keep, positions):
    """One sample (batch 1) through SparseVLM v1.5 as the reference runs it: returns per cut (rating,
    kept positions among the visual tokens, recycled features), the final rows' sources (-2:
    recycled), their rotary positions and logits (every row)."""
    language_model = adapter.model.model.language_model
    hidden = adapter.llm_input.embeddings(inputs)[0]  # [L, D]
    ids = inputs.input_ids[0]
    source = list(range(ids.numel()))
    visual = [c in set(visual_columns(adapter, inputs, 0).tolist()) for c in source]
    first = visual.index(True)
    answer = len(source) if inputs.labels is None else int((inputs.labels[0] != -100).int().argmax())
    text = [first < c < answer and not visual[c] for c in source]  # the answer never rates
    rope = inputs.position_ids[1:, 0] if inputs.position_ids.dim() == 3 else inputs.position_ids[0]
    # raters: softmax over the text of V·Tᵀ on the input embeddings, mean over V, above the mean
    v = hidden[[i for i in source if visual[i]]]
    t_rows = [i for i in source if text[i]]
    score = torch.softmax(v @ hidden[t_rows].T, dim=1).mean(0)
    rater = [False] * len(source)
    for j, row in enumerate(t_rows):
        rater[row] = bool(score[j] > score.mean())
    captured = {}
    stages = []
    for i, layer in enumerate(language_model.layers):
        length = hidden.shape[0]
        allowed = torch.ones(length, length, dtype=torch.bool).tril()
        mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
        position = torch.arange(length)[None] if positions == "renumber" else rope[..., None, :]
        handle = layer.self_attn.register_forward_hook(lambda m, a, out: captured.update(probs=out[1]))
        embeddings = language_model.rotary_emb(hidden[None], position)
        hidden = layer(hidden[None], attention_mask=mask, position_embeddings=embeddings)[0]
        handle.remove()
        if i + 1 not in CUTS:
            continue
        stage = CUTS.index(i + 1)
        attention = captured["probs"][0].mean(0)  # [L, L] heads averaged
        vis = [r for r in range(length) if visual[r]]
        raters = [r for r in range(length) if rater[r]]
        rating = attention[raters][:, vis].mean(0)  # [n]
        n = len(vis)
        k = min(keep[stage], n - 1)
        chosen = sorted(ranked(rating.tolist())[:k])
        deleted = [p for p in range(n) if p not in chosen]
        best = sorted(deleted, key=lambda p: (-float(rating[p]), p))[: int(len(deleted) * 0.3) + 1]
        merged, centres = dpc_knn(hidden[[vis[p] for p in best]], int(len(best) / 10) + 1)
        stages.append((rating, chosen, merged))
        # the new sequence: the kept rows in order, the recycled ones after the last visual row
        kept_rows = [r for r in range(length) if not visual[r] or vis.index(r) in chosen]
        after = sum(1 for r in kept_rows if r <= vis[-1])
        rows = kept_rows[:after] + [None] * len(centres) + kept_rows[after:]
        new_hidden, new_rope = [], []
        for j, r in enumerate(rows):
            if r is None:
                c = j - after
                new_hidden.append(merged[c])
                new_rope.append(rope[..., vis[best[centres[c]]]])
            else:
                new_hidden.append(hidden[r])
                new_rope.append(rope[..., r])
        hidden = torch.stack(new_hidden)
        rope = torch.stack(new_rope, dim=-1)
        source = [-2 if r is None else source[r] for r in rows]
        visual = [True if r is None else visual[r] for r in rows]
        rater = [False if r is None else rater[r] for r in rows]
    logits = adapter.model.lm_head(language_model.norm(hidden))
    return stages, source, rope, logits


@pytest.mark.parametrize(
    ("name", "positions"),
    [
        ("tiny_llava", "renumber"),
        ("tiny_llava", "gather"),
        ("tiny_qwen2vl", "gather"),
        ("tiny_llava_ov", "renumber"),
    ],
)
def test_equals_brute_force_reference(built, name, positions):  # noqa: F811
    """Batched under SDPA == each sample alone through the eager brute force: ratings, kept indices in
    order, recycled features, the final rows, their positions (Qwen: M-RoPE ids) and logits."""
    spy = Spy(layers=CUTS, keep=KEEP[name], positions=positions)
    adapter = load(built[name], name, spy)
    eager = load(built[name], name, attn="eager")
    images, extra = media(name)
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS, images, **extra)
        out = adapter.layers.forward(spy, inputs)
    assert out.layer_tokens[0] != out.layer_tokens[1]  # mixed counts in the batch
    for b in range(2):
        alone = {key: [value[b]] for key, value in extra.items()}
        with torch.no_grad():
            single = eager.prepare([QUESTIONS[b]], [images[b]], **alone)
            stages, source, rope, logits = brute_force(eager, single, KEEP[name], positions)
        pad = inputs.input_ids.shape[1] - single.input_ids.shape[1]
        assert torch.equal(inputs.input_ids[b, pad:], single.input_ids[0])
        for s, (rating, chosen, merged) in enumerate(stages):
            n, k, c = rating.numel(), len(chosen), merged.shape[0]
            tokens, reduced = spy.seen[s], spy.outputs[s]
            torch.testing.assert_close(tokens.signals[LLM_LAYER_RATER_ATTN][b, :n], rating, rtol=0, atol=1e-6)
            assert int(tokens.lengths[b]) == n and int(reduced.lengths[b]) == k + c
            assert reduced.index[b, :k].tolist() == chosen
            assert bool((reduced.index[b, k : k + c] == -1).all())
            torch.testing.assert_close(reduced.features[b, k : k + c], merged, rtol=0, atol=1e-5)
            assert out.layer_tokens[b][s] == k + c
        mask, ours = out.segments[-1]
        assert int(mask[b].sum()) == len(source) and bool(mask[b, -len(source) :].all())
        rows = out.source[b, -len(source) :].tolist()
        assert rows == [x + pad if x >= 0 else x for x in source]  # kept rows in order, recycled (-2) placed
        if positions == "gather":  # kept tokens keep their (M-RoPE) ids, recycled ones their centre's
            assert torch.equal(ours[..., b, -len(source) :], rope)
        torch.testing.assert_close(out.logits[b, -len(source) :], logits, rtol=0, atol=2e-5)


def test_loss_equals_brute_force(built):  # noqa: F811
    """The teacher-forced loss with recycled tokens in the sequence == the brute force's cross-entropy
    over each sample's answer tokens (next row of the cut sequence; the answer and its predecessor
    are never cut), pooled over the batch."""
    name = "tiny_llava"
    answers = ["a red square", "two"]
    adapter = load(built[name], name, SparseVLM(layers=CUTS, keep=KEEP[name]))
    eager = load(built[name], name, attn="eager")
    images, _ = media(name)
    with torch.no_grad():
        ours = adapter.loss(adapter.prepare(QUESTIONS, images, answers=answers))
        losses = []
        for b in range(2):
            single = eager.prepare([QUESTIONS[b]], [images[b]], answers=[answers[b]])
            _, source, _, logits = brute_force(eager, single, KEEP[name], "renumber")
            labels = single.labels[0]
            for j in range(len(source) - 1):
                if source[j + 1] >= 0 and int(labels[source[j + 1]]) != -100:
                    losses.append(torch.nn.functional.cross_entropy(logits[j], labels[source[j + 1]]))
    assert -2 in source and len(losses) > 2
    torch.testing.assert_close(ours, torch.stack(losses).mean(), rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- batches, backends, decoding
def positions_for(name: str) -> str:
    return "gather" if name == "tiny_qwen2vl" else "renumber"  # M-RoPE is always gathered


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_equals_each_sample_alone(built, name):  # noqa: F811
    """Greedy answers, counts and per-cut token counts (recycled included) of a mixed batch == alone."""
    adapter = load(built[name], name, SparseVLM(layers=CUTS, keep=KEEP[name], positions=positions_for(name)))
    images, extra = media(name)
    timing: dict = {}
    texts, counts = adapter.generate(QUESTIONS, images, **extra, max_new_tokens=4, timing=timing)
    assert timing["layer_tokens"][0] != timing["layer_tokens"][1]
    for b in range(2):
        alone = {key: [value[b]] for key, value in extra.items()}
        one: dict = {}
        got = adapter.generate([QUESTIONS[b]], [images[b]], **alone, max_new_tokens=4, timing=one)
        assert got == ([texts[b]], [counts[b]]) and one["layer_tokens"] == [timing["layer_tokens"][b]]


@pytest.mark.parametrize("name", FAMILIES)
def test_eager_runner_equals_sdpa_runner(built, name):  # noqa: F811
    """The runner under eager attention (additive masks) == under SDPA: same picks, same logits."""
    images, extra = media(name)
    outs = []
    for attn in ("sdpa", "eager"):
        spy = Spy(layers=CUTS, keep=KEEP[name], positions=positions_for(name))
        adapter = load(built[name], name, spy, attn=attn)
        with torch.no_grad():
            out = adapter.layers.forward(spy, adapter.prepare(QUESTIONS, images, **extra))
        outs.append((out, spy.outputs))
    (sdpa, picks), (eager, eager_picks) = outs
    assert sdpa.layer_tokens == eager.layer_tokens and torch.equal(sdpa.source, eager.source)
    for ours, theirs in zip(picks, eager_picks):
        assert torch.equal(ours.index, theirs.index)
        torch.testing.assert_close(ours.features, theirs.features, rtol=0, atol=1e-5)
    valid = sdpa.source != -1
    torch.testing.assert_close(sdpa.logits[valid], eager.logits[valid], rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_generation_equals_no_cache_recompute(built, name):  # noqa: F811
    """Decoding with the KV cache (recycled tokens cached from their cut on) == a full recompute per
    step replaying the prefill's picks and recycled tokens."""
    spy = Spy(layers=CUTS, keep=KEEP[name], positions=positions_for(name))
    adapter = load(built[name], name, spy)
    images, extra = media(name)
    steps = 4
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS, images, **extra)
        ids, _ = adapter.layers.generate(spy, inputs, steps, adapter.tokenizer.pad_token_id, None)
        generated = ids[:, inputs.input_ids.shape[1] :]
        replay = Recorder(CUTS, replay=list(spy.outputs), positions=positions_for(name))
        for t in range(steps):
            out = adapter.layers.forward(replay, extended(inputs, generated[:, :t]))
            assert bool((out.source == -2).any())  # the recycled tokens are in the sequence
            assert torch.equal(out.last_logits.argmax(-1), generated[:, t])


def test_half_precision_signals_and_seeded_noise(built):  # noqa: F811
    """signal_precision=float16 rounds the ratings to fp16 values near the float32 ones; the density
    noise is reproducible for a seed."""
    name = "tiny_llava"
    images, extra = media(name)
    ratings = {}
    for precision in ("float32", "float16"):
        spy = Spy(layers=CUTS, keep=KEEP[name], signal_precision=precision)
        adapter = load(built[name], name, spy)
        with torch.no_grad():
            adapter.layers.forward(spy, adapter.prepare(QUESTIONS, images, **extra))
        ratings[precision] = spy.seen[0].signals[LLM_LAYER_RATER_ATTN]
    half = ratings["float16"]
    assert torch.equal(half, half.half().float()) and not torch.equal(half, ratings["float32"])
    torch.testing.assert_close(half, ratings["float32"], rtol=2e-2, atol=1e-4)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(40, 8, generator=generator)
    noisy = SparseVLM(density_noise=1e-6, seed=5)
    first, again = noisy.cluster_and_merge(x, 5, 0), noisy.cluster_and_merge(x, 5, 0)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    merged, centres = SparseVLM().cluster_and_merge(x, 5, 0)
    want, want_centres = dpc_knn(x, 5)
    assert centres.tolist() == want_centres
    torch.testing.assert_close(merged, want, rtol=0, atol=1e-6)


def test_runner_refuses_malformed_synthetic_tokens(built):  # noqa: F811
    """Synthetic tokens must follow the kept ones, and under gather name their anchor: clear errors."""
    name = "tiny_llava"
    images, _ = media(name)

    class Fixed:
        space, requires = "llm_layer", ()

        def __init__(self, index, anchor, positions):
            self.layers, self.positions = (1,), positions
            self.index, self.anchor = torch.tensor([index]), anchor

        def __call__(self, tokens):
            features = tokens.features[:, : self.index.shape[1]]
            lengths = torch.tensor([self.index.shape[1]])
            anchor = None if self.anchor is None else torch.full_like(self.index, self.anchor)
            return Reduced(features, self.index, lengths, anchor)

    adapter = load(built[name], name)
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS[:1], images[:1])
        runner = LayerRunner(adapter.model, adapter.llm_input)
        with pytest.raises(ValueError, match=r"synthetic tokens \(-1\) after the kept ones"):
            runner.forward(Fixed([-1, 3], 0, "renumber"), inputs)
        with pytest.raises(ValueError, match=r"without Reduced\.anchor"):
            runner.forward(Fixed([3, -1], None, "gather"), inputs)
        with pytest.raises(ValueError, match=r"Reduced\.anchor outside"):
            runner.forward(Fixed([3, -1], 10**6, "gather"), inputs)
        gathered = runner.forward(Fixed([3, 5, -1], 7, "gather"), inputs)
        anchor_column = int(visual_columns(adapter, inputs, 0)[7])
        rope = gathered.segments[1][1][0, gathered.source[0] == -2]
        assert rope.tolist() == [int(inputs.position_ids[0, anchor_column])]  # the anchor's position
        out = runner.forward(Fixed([3, 5, -1], None, "renumber"), inputs)
        assert out.layer_tokens == [[3]] and int((out.source == -2).sum()) == 1


def test_v1_runs_end_to_end_with_its_rank_rule(built):  # noqa: F811
    """v1 on a tiny family: the per-rater rows average to the rating, and each cut keeps
    min(int(rank * scale + bias), n - 1) (+ recycled), the rank being the rater count (rows of a
    softmax are independent here)."""
    name = "tiny_llava"
    spy = Spy(version="v1", layers=CUTS, scale=30.0, bias=2.0)
    adapter = load(built[name], name, spy)
    images, _ = media(name)
    with torch.no_grad():
        out = adapter.layers.forward(spy, adapter.prepare(QUESTIONS, images))
    for tokens, reduced in zip(spy.seen, spy.outputs):
        rows, rating = tokens.signals[LLM_LAYER_RATER_ATTN_ROWS], tokens.signals[LLM_LAYER_RATER_ATTN]
        for b in range(2):
            n = int(tokens.lengths[b])
            raters = int((rows[b].sum(-1) > 0).sum())
            torch.testing.assert_close(rows[b, :raters, :n].mean(0), rating[b, :n], rtol=0, atol=1e-7)
            assert int(torch.linalg.matrix_rank(rows[b, :, :n])) == raters > 1
            k = min(int(raters * 30.0 + 2.0), n - 1)
            recycled = spy.recycled_count(n - k)[1]
            assert (
                int(reduced.lengths[b]) == k + recycled
                and int((reduced.index[b, : k + recycled] == -1).sum()) == recycled
            )
    assert [len(t) for t in out.layer_tokens] == [3, 3]
