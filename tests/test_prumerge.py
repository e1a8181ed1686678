"""PruMerge / PruMerge+: configs, the reducer contracts (DESIGN §4) and every degenerate case.

Exactness against a per-image oracle and the golden tensors are in test_prumerge_reference.py.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tokenprune.reducers.prumerge import PruMerge, PruMergePlus
from tokenprune.types import VIT_CLS_ATTN, VIT_KEYS, Reduced, VisualTokens

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "reducer"
YAMLS = ["prumerge", "prumerge_plus", "prumerge_plus_fixed"]


def make_tokens(
    b: int, grid: tuple[int, int] = (24, 24), dim: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32
) -> VisualTokens:
    """CLIP-like attention (softmax over N+1 logits, a few strong patches), normal keys and features."""
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    logits = torch.randn(b, n + 1, generator=g) * 0.5
    for i in range(b):
        strong = int(torch.randint(max(2, n // 72), max(3, n // 14), (1,), generator=g))
        logits[i, torch.randperm(n, generator=g)[:strong] + 1] += 3.0 + 3.0 * torch.rand(strong, generator=g)
    signals = {
        VIT_CLS_ATTN: logits.softmax(dim=-1)[:, 1:].to(dtype),
        VIT_KEYS: torch.randn(b, n, dim, generator=g).to(dtype),
    }
    return VisualTokens(features=torch.randn(b, n, dim, generator=g).to(dtype), grid=grid, signals=signals)


def with_signals(
    tokens: VisualTokens, features: torch.Tensor | None = None, **signals: torch.Tensor
) -> VisualTokens:
    merged = {
        **tokens.signals,
        **{VIT_CLS_ATTN if k == "attention" else VIT_KEYS: v for k, v in signals.items()},
    }
    return VisualTokens(
        features=tokens.features if features is None else features, grid=tokens.grid, signals=merged
    )


def sample(tokens: VisualTokens, i: int) -> VisualTokens:
    return VisualTokens(
        features=tokens.features[i : i + 1],
        grid=tokens.grid,
        signals={k: v[i : i + 1] for k, v in tokens.signals.items()},
    )


def check_layout(out: Reduced, n: int) -> None:
    """Right padding with zeros / -1, lengths <= N, valid indices, extra token (if any) last."""
    b, m, _ = out.features.shape
    assert out.index.shape == (b, m) and out.lengths.shape == (b,)
    assert out.index.dtype == torch.long and out.lengths.dtype == torch.long
    assert m == int(out.lengths.max()) and (out.lengths <= n).all()
    for i, length in enumerate(out.lengths.tolist()):
        assert (out.features[i, length:] == 0).all() and (out.index[i, length:] == -1).all()
        sources = out.index[i, :length]
        real = sources[sources >= 0]
        assert (real < n).all() and real.unique().numel() == real.numel()
        assert (sources[:-1] >= 0).all(), "only the last valid token may be synthetic"


REDUCERS = {
    "prumerge": PruMerge(),
    "prumerge_batch": PruMerge(iqr_scope="batch"),
    "plus": PruMergePlus(),
    "plus_fixed": PruMergePlus(grid="fixed"),
    "plus_spatial_average": PruMergePlus(order="spatial", merge="average"),
}


# ------------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_instantiates_and_binds_to_signature(name: str) -> None:
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    reducer = instantiate(cfg)
    fields = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"}
    cls = type(reducer)
    inspect.signature(cls).bind(**fields)
    assert set(fields) == set(inspect.signature(cls).parameters), "every constructor field is spelled out"
    assert cls.space == "vision" and cls.requires == (VIT_CLS_ATTN, VIT_KEYS)
    out = reducer(make_tokens(2))
    check_layout(out, 576)


def test_yaml_defaults_equal_class_defaults() -> None:
    for name in YAMLS:
        cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
        cls = instantiate({"_target_": cfg.pop("_target_"), "_partial_": True}).func
        defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
        differing = {k for k, v in cfg.items() if defaults[k] != v}
        assert differing <= {"grid"}, f"{name}: {differing}"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(iqr_scope="global"),
        dict(iqr_factor=-1.0),
        dict(knn_k=-1),
        dict(merge="mean"),
        dict(order="raster"),
        dict(min_keep=-1),
        dict(extra_token=False),  # would leave an image without outliers with no token
    ],
)
def test_invalid_config_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PruMerge(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(grid="lattice"), dict(budget=0), dict(budget=10, top_k=11)])
def test_invalid_plus_config_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PruMergePlus(**kwargs)


def test_missing_signal_raises() -> None:
    tokens = make_tokens(1)
    with pytest.raises(KeyError, match="vit_keys"):
        PruMerge()(VisualTokens(tokens.features, tokens.grid, {VIT_CLS_ATTN: tokens.signals[VIT_CLS_ATTN]}))


# ------------------------------------------------------------------------------------------------
# contracts


@pytest.mark.parametrize("name", sorted(REDUCERS))
def test_layout_and_dtype(name: str) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        tokens = make_tokens(3, dtype=dtype)
        out = REDUCERS[name](tokens)
        assert out.features.dtype == dtype and out.features.device == tokens.features.device
        check_layout(out, 576)


@pytest.mark.parametrize("name", ["prumerge", "plus", "plus_fixed", "plus_spatial_average"])
def test_batch_invariance(name: str) -> None:
    reducer = REDUCERS[name]
    tokens = make_tokens(4, seed=3)
    batched = reducer(tokens)
    assert len(set(batched.lengths.tolist())) > 1 or name == "plus_fixed"
    for i in range(4):
        alone = reducer(sample(tokens, i))
        length = int(alone.lengths[0])
        assert int(batched.lengths[i]) == length
        assert torch.equal(batched.index[i, :length], alone.index[0])
        assert torch.equal(batched.features[i, :length], alone.features[0])


def test_batch_scope_is_batch_coupled_and_equals_image_scope_alone() -> None:
    tokens = make_tokens(4, seed=3)
    coupled = PruMerge(iqr_scope="batch")(tokens)
    assert len(set(coupled.lengths.tolist())) == 1, "the reference gives every image the same count"
    per_image = PruMerge()(tokens)
    assert coupled.lengths.tolist() != per_image.lengths.tolist()
    for i in range(4):
        alone_batch, alone_image = (
            PruMerge(iqr_scope="batch")(sample(tokens, i)),
            PruMerge()(sample(tokens, i)),
        )
        assert torch.equal(alone_batch.features, alone_image.features)


@pytest.mark.parametrize("name", sorted(REDUCERS))
def test_gradients_reach_the_features(name: str) -> None:
    tokens = make_tokens(2)
    features = tokens.features.clone().requires_grad_(True)
    out = REDUCERS[name](with_signals(tokens, features=features))
    (out.features**2).sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    # every kept patch and every patch in the extra token receive gradient
    assert (features.grad.abs().sum(-1) > 0).float().mean() > 0.9


@pytest.mark.parametrize("name", sorted(REDUCERS))
def test_deterministic(name: str) -> None:
    tokens = make_tokens(3, seed=4)
    a, b = REDUCERS[name](tokens), REDUCERS[name](tokens)
    assert torch.equal(a.features, b.features) and torch.equal(a.index, b.index)


@pytest.mark.parametrize("options", [{}, {"merge": "average", "order": "spatial"}])
@pytest.mark.parametrize("cls", [PruMerge, PruMergePlus])
def test_merge_chunking_does_not_change_the_output(cls: type, options: dict) -> None:
    """On CPU the merge runs image by image (measured faster); any chunking gives the same bits."""
    tokens = make_tokens(5, seed=13)
    outputs = []
    for chunk in (None, 1, 2, 5):
        reducer = cls(**options)
        reducer.merge_chunk = chunk
        outputs.append(reducer(tokens))
    for out in outputs[1:]:
        assert torch.equal(out.features, outputs[0].features) and torch.equal(out.index, outputs[0].index)


def test_fixed_budget_at_or_above_n_is_identity() -> None:
    tokens = make_tokens(2, grid=(6, 6))
    out = PruMergePlus(grid="fixed", budget=36)(tokens)
    assert torch.equal(out.features, tokens.features) and out.lengths.tolist() == [36, 36]
    assert torch.equal(out.index, torch.arange(36).expand(2, 36))
    plan = PruMergePlus(grid="fixed", budget=100)(tokens)  # the plan of a keep-all budget keeps all
    assert torch.equal(PruMergePlus(grid="fixed", budget=100).plan(tokens).kept, torch.tensor([36, 36]))
    assert plan.lengths.tolist() == [36, 36]


# ------------------------------------------------------------------------------------------------
# behaviour


def test_spatial_order_is_a_permutation_of_reference_order() -> None:
    tokens = make_tokens(3, seed=5)
    for cls in (PruMerge, PruMergePlus):
        ref, spatial = cls()(tokens), cls(order="spatial")(tokens)
        assert torch.equal(ref.lengths, spatial.lengths)
        for i, length in enumerate(ref.lengths.tolist()):
            kept = spatial.index[i, : length - 1]
            assert (kept.diff() > 0).all() and spatial.index[i, length - 1] == -1
            perm = ref.index[i, : length - 1].argsort()
            assert torch.equal(spatial.features[i, : length - 1], ref.features[i, perm])
            assert torch.equal(spatial.features[i, length - 1], ref.features[i, length - 1])


def test_reference_order_is_descending_attention_then_grid() -> None:
    tokens = make_tokens(2, seed=6)
    attention = tokens.signals[VIT_CLS_ATTN]
    plain, plus = PruMerge()(tokens), PruMergePlus()(tokens)
    for i in range(2):
        m = int(plain.lengths[i]) - 1
        top = plain.index[i, :m]
        assert (attention[i, top].diff() <= 0).all()
        assert torch.equal(plus.index[i, :m], top), "PruMerge+ starts with PruMerge's selection"
        grid = plus.index[i, m : int(plus.lengths[i]) - 1]
        assert (grid.diff() > 0).all()
        stride = (576 // m) // 3
        assert grid.numel() > 0 and (grid % stride == 0).all() and (grid < 575).all()


def test_merge_none_keeps_patches_unchanged_and_average_is_convex() -> None:
    tokens = make_tokens(2, seed=7)
    out = PruMerge(merge="none")(tokens)
    for i, length in enumerate(out.lengths.tolist()):
        assert torch.equal(out.features[i, : length - 1], tokens.features[i, out.index[i, : length - 1]])
    constant = with_signals(tokens, features=torch.full_like(tokens.features, 3.0))
    averaged = PruMergePlus(merge="average")(constant)
    for i, length in enumerate(averaged.lengths.tolist()):
        torch.testing.assert_close(
            averaged.features[i, :length], torch.full_like(averaged.features[i, :length], 3.0)
        )


def test_knn_zero_and_knn_above_n() -> None:
    tokens = make_tokens(2, grid=(3, 4), seed=8)
    plain = PruMerge(knn_k=0)(tokens)
    unmerged = PruMerge(merge="none")(tokens)
    assert torch.equal(plain.features, unmerged.features)
    capped, exact = PruMerge(knn_k=1000)(tokens), PruMerge(knn_k=11)(tokens)  # N - 1 = 11 candidates
    assert torch.equal(capped.features, exact.features)


def test_fixed_grid_keeps_exactly_the_budget_without_duplicates() -> None:
    tokens = make_tokens(3, seed=9)
    out = PruMergePlus(grid="fixed", budget=144)(tokens)
    assert out.lengths.tolist() == [145, 145, 145]
    attention = tokens.signals[VIT_CLS_ATTN]
    for i in range(3):
        kept = out.index[i, :144]
        assert kept.unique().numel() == 144
        assert torch.equal(kept[:72], attention[i].topk(72).indices)
        assert (kept[72:].diff() > 0).all()
    uneven = PruMergePlus(grid="fixed", budget=50, top_k=0)(tokens)
    assert uneven.lengths.tolist() == [51, 51, 51] and torch.equal(uneven.index[0], uneven.index[1])


def test_plan_exposes_the_merge_neighbourhoods() -> None:
    tokens = make_tokens(2, seed=10)
    plan = PruMerge().plan(tokens)
    out = PruMerge()(tokens)
    assert torch.equal(plan.kept + 1, out.lengths)
    assert plan.neighbours.shape == (2, int(plan.kept.max()), 32)
    for i, m in enumerate(plan.kept.tolist()):
        assert torch.equal(plan.order[i].sort().values, torch.arange(576))
        assert not (plan.neighbours[i, :m] == plan.order[i, :m, None]).any(), (
            "a patch is not its own neighbour"
        )


# ------------------------------------------------------------------------------------------------
# degenerate cases (docs/prumerge.md)


def test_no_outliers_gives_the_extra_token_only() -> None:
    tokens = make_tokens(2, grid=(6, 6))
    flat = with_signals(tokens, attention=torch.full((2, 36), 1 / 37))
    for reducer in (PruMerge(), PruMergePlus()):
        out = reducer(flat)  # PruMerge+: the reference divides by zero here
        assert out.lengths.tolist() == [1, 1] and (out.index == -1).all()
        torch.testing.assert_close(out.features[:, 0], tokens.features.sum(1) / 37)
    kept = PruMergePlus(min_keep=1)(flat)  # stride from m = 1: floor(36 / 1) // 3 = 12 -> {0, 12, 24}
    assert kept.index[0].tolist() == [0, 12, 24, -1]


def test_stride_zero_is_raised_to_one() -> None:
    tokens = make_tokens(1, grid=(6, 6))
    out = PruMergePlus(min_keep=20)(tokens)  # floor(36 / 20) // 3 = 0: the reference crashes
    kept = set(out.index[0, : int(out.lengths[0])].tolist()) - {-1}
    assert set(range(35)) <= kept and out.lengths[0] == 36  # 35 grid points + 35 or the extra token


def test_everything_kept_drops_the_extra_token() -> None:
    tokens = make_tokens(2, grid=(4, 4))
    out = PruMerge(min_keep=16)(tokens)
    assert out.lengths.tolist() == [16, 16] and (out.index >= 0).all()


def test_extra_token_when_another_image_keeps_everything() -> None:
    """One image keeps all 16 patches (no extra token), the other 15 + its extra token."""
    tokens = make_tokens(2, grid=(4, 4))
    attention = torch.full((2, 16), 0.01)
    attention[0, 15] = attention[1, 0] = 0.5  # patch 15 is never a grid point (stop at N - 1)
    out = PruMergePlus(min_keep=4)(with_signals(tokens, attention=attention))
    assert out.lengths.tolist() == [16, 16]
    assert (
        (out.index[0] >= 0).all()
        and out.index[1, 15] == -1
        and set(out.index[1, :15].tolist()) == set(range(15))
    )
    torch.testing.assert_close(out.features[1, 15], tokens.features[1, 15] * 0.01)


def test_extra_token_off_with_min_keep() -> None:
    tokens = make_tokens(2)
    with_extra, without = PruMerge(min_keep=1)(tokens), PruMerge(min_keep=1, extra_token=False)(tokens)
    assert torch.equal(without.lengths, with_extra.lengths - 1)
    for i, length in enumerate(without.lengths.tolist()):
        assert (without.index[i, :length] >= 0).all()
        assert torch.equal(without.features[i, :length], with_extra.features[i, :length])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_attention_falls_back_to_uniform(bad: float) -> None:
    tokens = make_tokens(3, seed=11)
    attention = tokens.signals[VIT_CLS_ATTN].clone()
    attention[1, 5] = bad
    out = PruMergePlus(min_keep=4)(with_signals(tokens, attention=attention))
    uniform = attention.clone()
    uniform[1] = 1 / 576
    expected = PruMergePlus(min_keep=4)(with_signals(tokens, attention=uniform))
    assert torch.isfinite(out.features).all()
    assert torch.equal(out.features, expected.features) and torch.equal(out.index, expected.index)


def test_fp16_overflow_of_qk_gives_finite_output() -> None:
    """A fp16 Q K^T that overflows (what the reference computes) gives NaN attention rows."""
    tokens = make_tokens(2, dtype=torch.float16)
    q = torch.full((2, 1, 64), 60.0, dtype=torch.float16)
    k = torch.cat([torch.full((2, 1, 64), 60.0), torch.randn(2, 576, 64)], 1).half()
    attention = ((q @ k.transpose(1, 2)) / 8).softmax(-1)[:, 0, 1:]  # 64 * 3600 > 65504 -> inf -> NaN
    assert not torch.isfinite(attention).all()
    out = PruMerge()(with_signals(tokens, attention=attention))
    assert torch.isfinite(out.features).all() and out.lengths.tolist() == [1, 1]


def test_non_finite_keys_match_nothing() -> None:
    tokens = make_tokens(2, seed=12)
    keys = tokens.signals[VIT_KEYS].clone()
    keys[0, :10] = float("nan")
    out = PruMerge()(with_signals(tokens, keys=keys))
    assert torch.isfinite(out.features).all()


def test_empty_batch() -> None:
    tokens = make_tokens(2, grid=(4, 4))
    empty = VisualTokens(tokens.features[:0], tokens.grid, {k: v[:0] for k, v in tokens.signals.items()})
    for reducer in (PruMerge(), PruMergePlus(), PruMergePlus(grid="fixed", budget=4)):
        out = reducer(empty)
        assert out.features.shape == (0, 0, 64) and out.index.shape == (0, 0) and out.lengths.shape == (0,)
