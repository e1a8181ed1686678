"""PruMerge / PruMerge+ against an independent, plainly written per-image implementation, and golden tensors.

`oracle` below follows notes/prumerge.md §3-4 step by step, one image and one kept token at a
time, in the reference's style (numpy percentiles, a Python sort for the top-k, the reference's
candidate list per kept token, `(x[nb] * a[nb]).sum(0)` per token). It shares no code with
`tokenprune.reducers.prumerge` except `uniform_indices` (the definition of the fixed 2-D lattice).

Regenerate the golden tensors (after an intended change of behaviour) with
    .venv/bin/python tests/test_prumerge_reference.py --regen
which checks the implementation against the oracle before writing tests/golden/prumerge/*.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenprune.reducers.baselines import uniform_indices
from tokenprune.reducers.prumerge import PruMerge, PruMergePlus, _raster_grid
from tokenprune.reducers.prumerge_merge import cascade_sum
from tokenprune.types import VIT_CLS_ATTN, VIT_KEYS, Reduced, VisualTokens

GOLDEN = Path(__file__).parent / "golden" / "prumerge"

# fp32: the project's parity tolerance. The reference ranks neighbours by fp32 cosines; two fp32
# implementations (one GEMV per kept token there, one GEMM per image here) may order two neighbours
# whose cosines differ by an ulp differently, which changes the summation order only (observed
# max abs diff ~1e-7; `test_fp32_neighbour_sets_match_the_oracle` checks the sets exactly).
FP32 = dict(atol=1e-5, rtol=1e-5)
# fp16/bf16: outputs within about 2 ulp of the oracle, kept indices identical (observed: bit-exact on CPU)
TOLERANCE = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


def make_tokens(
    b: int,
    grid: tuple[int, int] = (24, 24),
    dim: int = 1024,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    key_dim: int | None = None,
) -> VisualTokens:
    """CLIP-like inputs: attention = softmax over N+1 logits (CLS first) with a few strong outliers.

    Keys and features are standard normal. Each image gets 8-40 strong patches (+3..+6 logits) over a
    N(0, 0.5) background, which gives PruMerge 20-70 IQR outliers at N = 576, as CLIP does.
    """
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    logits = torch.randn(b, n + 1, generator=g) * 0.5
    logits[:, 0] += 2.0  # CLS attends to itself
    for i in range(b):
        strong = int(torch.randint(max(2, n // 72), max(3, n // 14), (1,), generator=g))
        where = torch.randperm(n, generator=g)[:strong] + 1
        logits[i, where] += 3.0 + 3.0 * torch.rand(strong, generator=g)
    attention = logits.softmax(dim=-1)[:, 1:]  # [B, N]
    keys = torch.randn(b, n, key_dim or dim, generator=g)
    features = torch.randn(b, n, dim, generator=g)
    return VisualTokens(
        features=features.to(dtype),
        grid=grid,
        signals={VIT_CLS_ATTN: attention.to(dtype), VIT_KEYS: keys.to(dtype)},
    )


# ------------------------------------------------------------------------------------------------
# the oracle


def _upper_fence(values: np.ndarray, factor: float) -> np.float32:
    q1 = np.percentile(values, 25)  # numpy's default linear interpolation, as the reference
    q3 = np.percentile(values, 75)
    return q3 + factor * (q3 - q1)


def _van_der_corput(length: int) -> list[int]:
    bits = max(1, (max(length, 1) - 1).bit_length())
    order = [int(format(v, f"0{bits}b")[::-1], 2) for v in range(1 << bits)]
    return [v for v in order if v < length]


def oracle(
    tokens: VisualTokens,
    *,
    plus: str | None = None,
    iqr_scope: str = "image",
    iqr_factor: float = 1.5,
    knn_k: int = 32,
    merge: str = "reference",
    order: str = "reference",
    extra_token: bool = True,
    min_keep: int = 0,
    budget: int = 144,
    top_k: int | None = None,
    neighbours: list[list[list[int]]] | None = None,
) -> list[tuple[torch.Tensor, list[int]]]:
    """Per image: (output tokens [L, D], source patch per token, -1 for the extra token).

    If `neighbours` is a list, it receives per image the neighbour ids of each kept patch (selection order).
    """
    x_all = tokens.features
    b, n, _ = x_all.shape
    attn = tokens.signals[VIT_CLS_ATTN].float()
    attn = torch.stack([a if torch.isfinite(a).all() else torch.full_like(a, 1.0 / n) for a in attn])

    # step 1: how many patches each image keeps (IQR outliers)
    if iqr_scope == "batch":
        flat = attn.numpy().reshape(-1)
        outliers = int((flat > _upper_fence(flat, iqr_factor)).sum())
        counts, pooled = [outliers // b] * b, [(outliers, b * n)] * b
    else:
        counts, pooled = [], []
        for i in range(b):
            row = attn[i].numpy()
            outliers = int((row > _upper_fence(row, iqr_factor)).sum())
            counts.append(outliers)
            pooled.append((outliers, n))
    counts = [min(max(c, min_keep), n) for c in counts]

    results = []
    signal = tokens.signals[VIT_CLS_ATTN]
    for i in range(b):
        a32 = attn[i].tolist()
        by_attention = sorted(range(n), key=lambda j: (-a32[j], j))  # descending, ties: lower index

        def top(m: int, i: int = i, by_attention: list[int] = by_attention) -> list[int]:
            """The reference's `topk(a, m)`; a half-precision signal keeps topk's order of its ties."""
            if signal.dtype in (torch.float16, torch.bfloat16) and torch.isfinite(signal[i]).all():
                return torch.topk(signal[i], m).indices.tolist() if m else []
            return by_attention[:m]

        # step 2: selection (and PruMerge+ grid points)
        if plus == "reference_fixed":  # the authors' if_adaptive=False branch, ratio 1/8
            k = int(n * (1 / 8))
            idx = top(k) + list(range(4, n - 1, 8))  # duplicates kept
            assert len(idx) == 2 * k
        elif plus == "fixed":
            k = budget // 2 if top_k is None else top_k
            idx = top(k)
            lattice = uniform_indices(budget - k, tokens.grid).tolist() if budget > k else []
            rest = [p for p in range(n) if p not in set(lattice)]
            preference = lattice + [rest[j] for j in _van_der_corput(len(rest))]
            chosen = [p for p in preference if p not in set(idx)][: budget - k]
            idx = idx + sorted(chosen)
        else:
            m = counts[i]
            idx = top(m)
            if plus == "adaptive" and m > 0:
                outliers, values = pooled[i]
                step = min(values // outliers if outliers else values + n, n // m)  # floor(1 / ratio)
                stride = max(step // 3, 1)
                grid_points = list(range(0, n - 1, stride))
                idx = idx + [p for p in grid_points if p not in set(idx)]
        # the reference's complement: zero the selected positions of 0..N-1, sort, drop len(idx) entries
        # (with repeated slots it drops genuine unkept patches too)
        complement = sorted(0 if p in set(idx) else p for p in range(n))[len(idx) :]

        # step 3: merge each kept patch with its knn_k most similar other patches (key cosine)
        x = x_all[i]
        w = attn[i].to(x.dtype)
        keys = tokens.signals[VIT_KEYS][i]
        corrupt = (~torch.isfinite(keys.norm(dim=-1))).tolist()  # such a patch is nobody's neighbour
        unit = F.normalize(keys, dim=-1)  # in the keys' dtype, as the reference
        rows = []
        if neighbours is not None:
            neighbours.append([])
        for slot, t in enumerate(idx):
            candidates = idx[:slot] + idx[slot + 1 :] + complement
            similarity = (unit[t][None] @ unit[candidates].T)[0]
            for j, c in enumerate(candidates):
                if corrupt[t] or corrupt[c]:
                    similarity[j] = -2.0
            top = torch.topk(similarity, min(knn_k, n - 1)).indices.tolist()
            nb = [candidates[j] for j in top]
            if neighbours is not None:
                neighbours[-1].append(nb)
            absorbed = (x[nb] * w[nb][:, None]).sum(0)
            if merge == "reference":
                rows.append(x[t] + absorbed)
            elif merge == "average":
                mass = w[nb].float().sum() + w[t].float()
                rows.append(((w[t] * x[t] + absorbed).float() / mass).to(x.dtype) if mass > 0 else x[t])
            else:
                rows.append(x[t])
        index = list(idx)
        if order == "spatial":
            ranked = sorted(range(len(idx)), key=lambda s: idx[s])
            rows, index = [rows[s] for s in ranked], [idx[s] for s in ranked]
        # step 4: the extra token
        if extra_token and complement:
            extra = (x[complement] * w[complement][:, None]).sum(0)
            if merge == "average":
                mass = w[complement].float().sum()
                extra = (extra.float() / mass).to(x.dtype) if mass > 0 else extra
            rows.append(extra)
            index.append(-1)
        out = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])
        results.append((out, index))
    return results


def assert_matches(out: Reduced, expected: list[tuple[torch.Tensor, list[int]]], **tolerance: float) -> None:
    """Kept patches (in order) and lengths exactly; features within `tolerance` (default `FP32`)."""
    tolerance = tolerance or FP32
    m = out.features.shape[1]
    assert out.lengths.tolist() == [len(idx) for _, idx in expected]
    assert m == max(len(idx) for _, idx in expected)
    for i, (rows, idx) in enumerate(expected):
        length = len(idx)
        assert out.index[i, :length].tolist() == idx, f"image {i}: kept patches differ"
        torch.testing.assert_close(out.features[i, :length], rows, **tolerance)
        assert (out.index[i, length:] == -1).all() and (out.features[i, length:] == 0).all()


# ------------------------------------------------------------------------------------------------
# parity in fp32 (kept patches exactly, features within FP32)


@pytest.mark.parametrize("b", [1, 3])
def test_prumerge_batch_scope_matches_oracle_exactly(b: int) -> None:
    tokens = make_tokens(b, seed=b)
    assert_matches(PruMerge(iqr_scope="batch")(tokens), oracle(tokens, iqr_scope="batch"))


def test_prumerge_image_scope_matches_oracle_exactly() -> None:
    tokens = make_tokens(4, seed=11, dim=256)
    expected = oracle(tokens)
    assert len({len(idx) for _, idx in expected}) > 1, "the test needs ragged counts"
    assert_matches(PruMerge()(tokens), expected)


def test_prumerge_plus_adaptive_single_image_matches_oracle_exactly() -> None:
    tokens = make_tokens(1, seed=5)
    assert_matches(PruMergePlus()(tokens), oracle(tokens, plus="adaptive"))


def test_prumerge_plus_adaptive_batched_per_image_matches_oracle_exactly() -> None:
    tokens = make_tokens(3, seed=6, dim=256)
    assert_matches(PruMergePlus()(tokens), oracle(tokens, plus="adaptive"))


def test_prumerge_plus_fixed_matches_oracle_exactly() -> None:
    tokens = make_tokens(2, seed=7, dim=256)
    expected = oracle(tokens, plus="fixed")
    assert all(len(idx) == 145 for _, idx in expected)
    assert_matches(PruMergePlus(grid="fixed")(tokens), expected)


def test_fp32_neighbour_sets_match_the_oracle() -> None:
    """Every kept patch absorbs exactly the oracle's neighbours; where the order differs, the cosines
    (float64) of the reordered neighbours agree within fp32 rounding."""
    tokens = make_tokens(3, seed=6, dim=256)
    expected: list[list[list[int]]] = []
    oracle(tokens, plus="adaptive", neighbours=expected)
    plan = PruMergePlus().plan(tokens)
    unit = F.normalize(tokens.signals[VIT_KEYS].double(), dim=-1)  # [B, N, C]
    for i, per_slot in enumerate(expected):
        for slot, nb in enumerate(per_slot):
            got = plan.neighbours[i, slot]
            assert sorted(got.tolist()) == sorted(nb), f"image {i} slot {slot}: neighbour sets differ"
            cosines = unit[i, got] @ unit[i, int(plan.order[i, slot])]  # [k], in our order
            assert (cosines.diff() <= 1e-6).all(), "neighbours are not in descending cosine order"


@pytest.mark.parametrize("b", [1, 3])
def test_prumerge_plus_reference_fixed_matches_oracle(b: int) -> None:
    """The authors' fixed branch: 72 top patches + columns 4/12/20 with duplicates, their complement."""
    tokens = make_tokens(b, seed=21 + b, dim=256)
    expected = oracle(tokens, plus="reference_fixed")
    out = PruMergePlus(grid="reference_fixed")(tokens)
    assert_matches(out, expected)
    assert out.lengths.tolist() == [145] * b
    grid = set(range(4, 575, 8))
    assert {c % 24 for c in grid} == {4, 12, 20} and len(grid) == 72
    repeats = [72 - len(set(idx[:72]) - grid) for _, idx in expected]
    assert max(repeats) > 0, "the test needs a top patch on the grid (a duplicate slot)"
    for i, (_, idx) in enumerate(expected):  # a duplicate slot names the same patch twice
        assert len(set(idx[:144])) == 144 - repeats[i]


def test_reference_fixed_needs_the_reference_grid_size() -> None:
    with pytest.raises(ValueError, match="reference_fixed needs N // 8"):
        PruMergePlus(grid="reference_fixed")(make_tokens(1, grid=(5, 6), dim=32))  # 3 vs 4 points


@pytest.mark.parametrize(
    "options",
    [
        dict(merge="none", order="spatial"),
        dict(knn_k=5, extra_token=False, min_keep=3),
        dict(iqr_factor=0.5, min_keep=40),
    ],
)
def test_prumerge_options_match_oracle_exactly(options: dict) -> None:
    tokens = make_tokens(2, seed=8, dim=128)
    assert_matches(PruMerge(**options)(tokens), oracle(tokens, **options))


def test_average_merge_matches_oracle() -> None:
    tokens = make_tokens(2, seed=9, dim=128)
    for reducer, plus in ((PruMerge(merge="average"), None), (PruMergePlus(merge="average"), "adaptive")):
        # the normalising mass is a float32 sum whose association may differ: 1e-6 relative
        assert_matches(reducer(tokens), oracle(tokens, plus=plus, merge="average"), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("grid", [(6, 10), (4, 5)])
def test_small_grid_matches_oracle_exactly(grid: tuple[int, int]) -> None:
    """A smaller patch grid (knn_k = 32 is capped at N - 1 on the 4x5 one)."""
    tokens = make_tokens(3, grid=grid, seed=10, dim=64)
    assert_matches(PruMerge()(tokens), oracle(tokens))
    assert_matches(PruMergePlus(order="spatial")(tokens), oracle(tokens, plus="adaptive", order="spatial"))
    fixed = dict(budget=12, top_k=5)
    assert_matches(PruMergePlus(grid="fixed", **fixed)(tokens), oracle(tokens, plus="fixed", **fixed))


def test_non_finite_keys_match_oracle_exactly() -> None:
    tokens = make_tokens(2, seed=14, dim=64)
    keys = tokens.signals[VIT_KEYS].clone()
    keys[0, 3, 5] = float("nan")
    keys[1, :40:7, 0] = float("inf")
    tokens.signals[VIT_KEYS] = keys
    for reducer, plus in ((PruMerge(), None), (PruMergePlus(), "adaptive")):
        out = reducer(tokens)
        assert torch.isfinite(out.features).all()
        assert_matches(out, oracle(tokens, plus=plus))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cascade_sum_adds_in_torch_cpu_sum_order(dtype: torch.dtype) -> None:
    """The merge's bit-exactness rests on this: `cascade_sum` == per-row `table[ids].sum(0)` (CPU,
    width a multiple of 32), for the neighbour count (32) and the extra token's lengths (<= 575)."""
    g = torch.Generator().manual_seed(0)
    table = (torch.randn(3000, 64, generator=g) * torch.rand(3000, 1, generator=g) * 10).to(dtype)
    accumulate = table.float() if dtype != torch.float32 else table
    for length in (1, 16, 17, 32, 255, 257, 575, 4097):
        ids = torch.randint(0, 3000, (4, length), generator=g)
        valid = torch.randint(0, length + 1, (4,), generator=g)
        expected = torch.stack([table[ids[r, : valid[r]]].sum(0) for r in range(4)])
        assert torch.equal(cascade_sum(accumulate, ids, valid).to(dtype), expected), length


def test_integer_counts_equal_the_reference_float_formulas_at_576() -> None:
    """The reference computes k = int(576 * ratio) and step = int(1 / ratio) in float64; the
    implementation uses integer division. They agree for every count at N = 576."""
    for b in range(1, 33):
        assert all(int(576 * (n / (b * 576))) == n // b for n in range(b * 576 + 1))
    assert all(int(1 / (n / 576)) == 576 // n for n in range(1, 577))


@pytest.mark.parametrize(
    ("m", "stride", "points"),
    [
        (8, 24, 24),
        (16, 12, 48),
        (20, 9, 64),
        (24, 8, 72),
        (32, 6, 96),
        (33, 5, 115),
        (48, 4, 144),
        (96, 2, 288),
        (97, 1, 575),
    ],
)
def test_adaptive_grid_table(m: int, stride: int, points: int) -> None:
    """notes/prumerge.md §4.1: m outliers at B = 1 -> stride s and |G| raster points < 575."""
    counts = torch.tensor([m])
    grid = _raster_grid(counts, counts, 576, 576)[0]
    assert grid.sum() == points and grid.nonzero().squeeze(1).diff().unique().tolist() == [stride]


# ------------------------------------------------------------------------------------------------
# half precision (stated tolerance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_oracle(dtype: torch.dtype) -> None:
    tokens = make_tokens(2, seed=12, dim=256, dtype=dtype)
    assert_matches(PruMerge()(tokens), oracle(tokens), **TOLERANCE[dtype])
    assert_matches(PruMerge(iqr_scope="batch")(tokens), oracle(tokens, iqr_scope="batch"), **TOLERANCE[dtype])
    single = make_tokens(1, seed=13, dim=256, dtype=dtype)
    assert_matches(PruMergePlus()(single), oracle(single, plus="adaptive"), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_neighbours_follow_reference_candidate_order(dtype: torch.dtype) -> None:
    """Half-precision cosines tie at the k-th neighbour; ties must resolve as in the reference's
    candidate list [kept before, kept after, unkept ascending] (a patch-id order picks other sets)."""
    tokens = make_tokens(2, seed=12, dim=256, dtype=dtype)
    expected: list[list[list[int]]] = []
    oracle(tokens, neighbours=expected)
    plan = PruMerge().plan(tokens)
    unit = F.normalize(tokens.signals[VIT_KEYS], dim=-1)
    boundary_ties = 0
    for i, per_slot in enumerate(expected):
        assert plan.kept[i] == len(per_slot)
        for slot, nb in enumerate(per_slot):
            assert plan.neighbours[i, slot].tolist() == nb
            centre = int(plan.order[i, slot])
            similarity = (unit[i, centre][None] @ unit[i].T)[0]
            similarity[centre] = -2
            ranked = similarity.sort(descending=True).values
            boundary_ties += int(ranked[31] == ranked[32])
    assert boundary_ties > 0, "the inputs should produce ties at the 32nd neighbour"


# ------------------------------------------------------------------------------------------------
# golden tensors (pin the outputs; regenerate with --regen, see the module docstring)

GOLDEN_CASES = {
    "prumerge_image": (PruMerge, {}, None),
    "prumerge_batch": (PruMerge, {"iqr_scope": "batch"}, None),
    "prumerge_average_spatial": (PruMerge, {"merge": "average", "order": "spatial"}, None),
    "plus_adaptive": (PruMergePlus, {}, "adaptive"),
    "plus_fixed": (PruMergePlus, {"grid": "fixed", "budget": 24}, "fixed"),
}


def golden_inputs() -> VisualTokens:
    data = torch.load(GOLDEN / "inputs.pt")
    return VisualTokens(
        features=data["features"].float(),
        grid=tuple(data["grid"].tolist()),
        signals={VIT_CLS_ATTN: data["attention"], VIT_KEYS: data["keys"].float()},
    )


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden(case: str) -> None:
    cls, options, _ = GOLDEN_CASES[case]
    out = cls(**options)(golden_inputs())
    expected = torch.load(GOLDEN / f"{case}.pt")
    assert torch.equal(out.lengths, expected["lengths"])
    assert torch.equal(out.index, expected["index"].long())
    torch.testing.assert_close(out.features, expected["features"], atol=1e-6, rtol=1e-6)


def regenerate_golden() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    # feature width a multiple of 32: torch's CPU sum then adds rows in the order `cascade_sum` follows
    small = make_tokens(2, grid=(8, 8), dim=32, key_dim=8, seed=2024)
    torch.save(
        {
            "features": small.features.half(),  # stored in fp16, used in fp32: exact and small
            "keys": small.signals[VIT_KEYS].half(),
            "attention": small.signals[VIT_CLS_ATTN],
            "grid": torch.tensor(small.grid),
        },
        GOLDEN / "inputs.pt",
    )
    tokens = golden_inputs()
    for case, (cls, options, plus) in GOLDEN_CASES.items():
        out = cls(**options)(tokens)
        oracle_options = {k: v for k, v in options.items() if k != "grid"}
        assert_matches(out, oracle(tokens, plus=plus, **oracle_options))
        index = out.index.to(torch.int16)
        torch.save({"features": out.features, "index": index, "lengths": out.lengths}, GOLDEN / f"{case}.pt")
        print(f"wrote {case}: lengths {out.lengths.tolist()}")


if __name__ == "__main__":
    if "--regen" not in sys.argv:
        sys.exit("usage: python tests/test_prumerge_reference.py --regen")
    regenerate_golden()
