"""The reducer contract (DESIGN §4), checked once for every configs/reducer/*.yaml."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import reducer_options
from hydra.utils import get_class, instantiate

from tokenprune.config import compose
from tokenprune.synthetic import clip_like_tokens
from tokenprune.types import Reduced, VisualTokens

REDUCERS = reducer_options()
# Reducers whose output tokens are copies of input patches (index names the copied patch).
PURE_SELECTION = {"none", "random", "uniform", "explain_mapper", "explain_oracle", "divprune", "vispruner"}
# The authors' fixed PruMerge+ branch keeps a top patch twice when it is also a grid point (a
# documented reference quirk, `grid=reference_fixed`): the one config allowed to repeat a source patch.
REPEATS_PATCHES = {"prumerge_plus_reference"}
# Paper-compatible batch-coupled modes (DESIGN §4.3), opt-in configs: the IQR pooled over the batch.
BATCH_COUPLED = {"prumerge_reference"}
GRIDS = [(24, 24), (6, 8)]


def build(name: str, **fields):
    cfg = compose([f"reducer={name}", *(f"reducer.{k}={v}" for k, v in fields.items())])
    return instantiate(cfg.reducer)


def tokens(b: int, grid: tuple[int, int], d: int = 16, seed: int = 0, dtype=torch.float32) -> VisualTokens:
    return clip_like_tokens(b, grid, d, seed=seed, dtype=dtype)


def sample(t: VisualTokens, i: int) -> VisualTokens:
    return VisualTokens(t.features[i : i + 1], t.grid, {k: v[i : i + 1] for k, v in t.signals.items()})


def valid(out: Reduced, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(out.lengths[i])
    return out.features[i, :n], out.index[i, :n]


def test_every_reducer_config_is_covered():
    assert {"none", "random", "uniform", "pool"} <= set(REDUCERS)


@pytest.mark.parametrize("name", REDUCERS)
def test_declares_space_and_requires(name):
    reducer = build(name)
    assert reducer.space in ("vision", "llm")
    assert isinstance(reducer.requires, tuple) and all(isinstance(s, str) for s in reducer.requires)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", REDUCERS)
def test_shapes_index_and_padding(name, grid):
    t = tokens(3, grid)
    n, d = t.features.shape[1:]
    out = build(name)(t)
    b, m, d_out = out.features.shape
    assert (b, d_out) == (3, d) and out.index.shape == (3, m) and out.lengths.shape == (3,)
    assert out.index.dtype == torch.long and out.lengths.dtype == torch.long
    assert out.features.dtype == t.features.dtype and out.features.device == t.features.device
    assert int(out.lengths.max()) == m and bool((out.lengths >= 1).all()) and bool((out.lengths <= n).all())
    for i in range(3):
        length = int(out.lengths[i])
        assert bool((out.index[i, length:] == -1).all()), "padding index must be -1"
        assert bool((out.features[i, length:] == 0).all()), "padding rows must be zero"
        feats, index = valid(out, i)
        real = index[index >= 0]
        assert bool((index >= -1).all()) and bool((real < n).all())
        if name not in REPEATS_PATCHES:
            assert real.unique().numel() == real.numel(), "a source patch is named twice"
        if name in PURE_SELECTION:
            torch.testing.assert_close(feats, t.features[i, index], rtol=0, atol=0)


@pytest.mark.parametrize("name", REDUCERS)
def test_batch_invariance(name):
    t = tokens(4, (24, 24), seed=3)
    reducer = build(name)
    batched = reducer(t)
    if name in BATCH_COUPLED:  # documented coupling: one count for the batch; batch 1 is the default config
        assert len(set(batched.lengths.tolist())) == 1
        alone, default = reducer(sample(t, 0)), build(name, iqr_scope="image")(sample(t, 0))
        assert torch.equal(alone.features, default.features) and torch.equal(alone.index, default.index)
        return
    for i in range(4):
        alone = reducer(sample(t, i))
        assert int(alone.lengths[0]) == int(batched.lengths[i])
        for got, want in zip(valid(batched, i), valid(alone, 0)):
            assert torch.equal(got, want), f"{name}: sample {i} differs when reduced in a batch"


@pytest.mark.parametrize("name", REDUCERS)
def test_keep_all_is_identity(name):
    """A budget (`keep`, or `budget` for fixed-budget methods) of N returns the input unchanged."""
    t = tokens(2, (6, 8))
    n = t.features.shape[1]
    node = compose([f"reducer={name}"]).reducer
    params = inspect.signature(get_class(node._target_)).parameters
    field = next((f for f in ("keep", "budget") if f in params), None)
    if node.get("grid") in ("adaptive", "reference_fixed"):  # PruMerge+'s budget: its fixed grid only
        field = None
    if name != "none" and field is None:
        pytest.skip(f"{name} has no budget to set to N (adaptive, or the reference's fixed 1/8 ratio)")
    out = build(name, **({} if field is None else {field: n}))(t)
    assert torch.equal(out.features, t.features)
    assert torch.equal(out.index, torch.arange(n).expand(2, n))
    assert out.lengths.tolist() == [n, n]


@pytest.mark.parametrize("name", REDUCERS)
def test_gradients_reach_features(name):
    t = tokens(2, (24, 24))
    t.features.requires_grad_(True)
    reducer = build(name)
    out = reducer(t)
    out.features.pow(2).sum().backward()
    assert t.features.grad is not None and t.features.grad.abs().sum() > 0
    for parameter in getattr(reducer, "parameters", lambda: [])():
        if parameter.requires_grad:
            assert parameter.grad is not None, f"{name}: no gradient reaches its own parameters"


@pytest.mark.parametrize("name", REDUCERS)
def test_deterministic(name):
    t = tokens(3, (24, 24), seed=5)
    first, second = build(name)(t), build(name)(t)
    assert torch.equal(first.features, second.features) and torch.equal(first.index, second.index)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", REDUCERS)
def test_low_precision(name, dtype):
    t = tokens(2, (24, 24), dtype=dtype)
    out = build(name)(t)
    assert out.features.dtype == dtype and torch.isfinite(out.features.float()).all()
