"""VisionZip, DivPrune, VisPruner and Downsample against independent per-image ports of their references.

Each oracle below is written from the reference's semantics (notes/peers_vision.md; VisPruner's
`llava_arch.py` `encode_images`), one image at a time with plain indexing and Python lists, not
from the batched reducers. Batched outputs must give the oracle's index lists in order and its
features within 1e-5 (fp32), at B = 1 and B > 1 with per-sample variation. Golden tensors pin the
outputs (regenerate with `python tests/test_peers_reference.py --regen`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenprune.reducers.baselines import AvgPool
from tokenprune.reducers.divprune import DivPrune
from tokenprune.reducers.downsample import Downsample
from tokenprune.reducers.visionzip import VisionZip
from tokenprune.reducers.vispruner import VisPruner
from tokenprune.types import VIT_CLS_ATTN_HEADS, VIT_CLS_FEATURE, VIT_FEAT_KEYS, Reduced, VisualTokens

GOLDEN = Path(__file__).parent / "golden" / "peers"


def make_tokens(b: int, grid=(24, 24), dim: int = 32, heads: int = 4, seed: int = 0) -> VisualTokens:
    """CLIP-like inputs with per-sample variation: a few attention spikes per head, clustered features."""
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    centres = torch.randn(b, 12, dim, generator=g)
    members = torch.randint(0, 12, (b, n), generator=g)
    features = torch.gather(centres, 1, members.unsqueeze(-1).expand(-1, -1, dim))
    features = features + 0.3 * torch.randn(b, n, dim, generator=g)  # [B, N, D]
    logits = torch.randn(b, heads, n + 1, generator=g)
    spikes = torch.randint(1, n + 1, (b, heads, n // 30), generator=g)
    logits.scatter_add_(2, spikes, 3 + 3 * torch.rand(spikes.shape, generator=g))
    signals = {
        VIT_CLS_ATTN_HEADS: logits.softmax(-1)[:, :, 1:],  # [B, H, N]
        VIT_FEAT_KEYS: features @ torch.randn(dim, dim, generator=g)
        + 0.5 * torch.randn(b, n, dim, generator=g),
        VIT_CLS_FEATURE: torch.randn(b, dim, generator=g),
    }
    return VisualTokens(features=features, grid=grid, signals=signals)


def one(tokens: VisualTokens, i: int) -> VisualTokens:
    return VisualTokens(
        tokens.features[i : i + 1], tokens.grid, {k: v[i : i + 1] for k, v in tokens.signals.items()}
    )


# ------------------------------------------------------------------------------------ oracles
def visionzip_oracle(
    tokens: VisualTokens, i: int, dominant: int, contextual: int
) -> tuple[list[int], torch.Tensor]:
    features = tokens.features[i]  # [N, D]
    heads = tokens.signals[VIT_CLS_ATTN_HEADS][i]  # [H, N]
    keys = tokens.signals[VIT_FEAT_KEYS][i]  # [N, C]
    cls = tokens.signals[VIT_CLS_FEATURE][i]  # [D]
    n, h = features.shape[0], heads.shape[0]
    attention = heads.sum(dim=0)
    top = set(torch.topk(attention, dominant - 1).indices.tolist())
    dominant_patches = [p for p in range(n) if p in top]  # sequence order
    filtered = [p for p in range(n) if p not in top]  # raster order
    metric = keys.view(n, h, -1).mean(dim=1)[filtered]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    m = len(filtered)
    targets = list(range(0, m, max(1, m // contextual)))[:contextual]
    others = [j for j in range(m) if j not in set(targets)]
    assign = (metric[others] @ metric[targets].T).argmax(dim=1).tolist()
    rows = [cls] + [features[p] for p in dominant_patches]
    for t, target in enumerate(targets):
        group = [features[filtered[others[j]]] for j, a in enumerate(assign) if a == t]
        mean = torch.stack(group).mean(dim=0) if group else torch.zeros_like(cls)
        rows.append(features[filtered[target]] + mean)
    index = [-1] + dominant_patches + [-1] * len(targets)
    return index, torch.stack(rows)


def divprune_oracle(tokens: VisualTokens, i: int, keep: int, sort: bool, mask_chosen: bool) -> list[int]:
    x = tokens.features[i]
    unit = x / x.norm(dim=-1, keepdim=True)
    distance = 1 - unit @ unit.T  # [N, N]
    chosen = [int(torch.topk(distance, 2, dim=0, largest=False).values[1].argmax())]
    for _ in range(keep - 1):
        score = distance[chosen].min(dim=0).values
        if mask_chosen:
            score[chosen] = float("-inf")
        chosen.append(int(score.argmax()))
    return sorted(chosen) if sort else chosen


def vispruner_oracle(
    tokens: VisualTokens, i: int, keep: int, important_ratio: float, step: int = 8
) -> list[int]:
    attention = tokens.signals[VIT_CLS_ATTN_HEADS][i].mean(dim=0)
    ranked = torch.argsort(attention, descending=True, stable=True).tolist()
    n_important = int(keep * important_ratio)
    diverse = keep - n_important
    important, residual = ranked[:n_important], ranked[n_important:]
    x = tokens.features[i]
    unit = x / x.norm(dim=-1, keepdim=True)
    while diverse > 0:
        r = min(step, len(residual) - diverse)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        best = (unit[a] @ unit[b].T).max(dim=1).values
        survivors = torch.argsort(best, descending=True, stable=True)[r:].tolist()
        residual = [a[j] for j in survivors] + b
    return sorted(important + (residual if diverse > 0 else []))


def check_selection(out: Reduced, tokens: VisualTokens, i: int, want: list[int]) -> None:
    n = int(out.lengths[i])
    assert out.index[i, :n].tolist() == want
    torch.testing.assert_close(out.features[i, :n], tokens.features[i, want], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ VisionZip
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize(("dominant", "contextual"), [(54, 10), (108, 20), (162, 30)])
def test_visionzip_matches_oracle(b: int, dominant: int, contextual: int) -> None:
    tokens = make_tokens(b, seed=b)
    out = VisionZip(dominant=dominant, contextual=contextual)(tokens)
    assert out.lengths.tolist() == [dominant + contextual] * b
    for i in range(b):
        index, features = visionzip_oracle(tokens, i, dominant, contextual)
        assert out.index[i].tolist() == index
        torch.testing.assert_close(out.features[i], features, rtol=1e-5, atol=1e-5)


def test_visionzip_target_stride_at_576() -> None:
    """64 tokens: M = 576 - 53 = 523 filtered patches, stride 52, targets 0, 52, ..., 468 (notes)."""
    m, c = 576 - 53, 10
    assert list(range(0, m, max(1, m // c)))[:c] == list(range(0, 469, 52))


def test_visionzip_without_cls_spends_every_slot_on_patches() -> None:
    tokens = make_tokens(2)
    tokens.signals[VIT_CLS_FEATURE] = tokens.features.new_zeros(2, 0)
    out = VisionZip(dominant=54, contextual=10)(tokens)
    assert out.lengths.tolist() == [64, 64]
    assert bool((out.index[:, :54] >= 0).all()) and bool((out.index[:, 54:] == -1).all())
    with_cls = VisionZip(dominant=55, contextual=10)(make_tokens(2))
    assert torch.equal(out.index[:, :54], with_cls.index[:, 1:55])  # the same patches, no CLS row


def test_visionzip_covering_budget_is_identity() -> None:
    tokens = make_tokens(1, grid=(6, 8))
    out = VisionZip(dominant=40, contextual=9)(tokens)  # 39 patches + 9 >= 48
    assert out.features is tokens.features


# ------------------------------------------------------------------------------------ DivPrune
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("mask_chosen", [True, False])
def test_divprune_matches_oracle(b: int, sort: bool, mask_chosen: bool) -> None:
    tokens = make_tokens(b, seed=10 + b)
    out = DivPrune(ratio=0.098, sort=sort, mask_chosen=mask_chosen)(tokens)
    assert out.lengths.tolist() == [56] * b  # int(round(0.098 * 576))
    for i in range(b):
        check_selection(out, tokens, i, divprune_oracle(tokens, i, 56, sort, mask_chosen))


@pytest.mark.parametrize("keep", [64, 128, 192])
def test_divprune_paper_budgets_match_oracle(keep: int) -> None:
    tokens = make_tokens(2, seed=keep)
    out = DivPrune(keep=keep)(tokens)
    for i in range(2):
        check_selection(out, tokens, i, divprune_oracle(tokens, i, keep, True, True))


def test_divprune_mask_only_matters_on_duplicates() -> None:
    """Four distinct tokens, each repeated: after 4 picks the reference's argmax repeats a token."""
    base = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    tokens = VisualTokens(base.repeat(2, 1).unsqueeze(0), (2, 4))
    masked = DivPrune(keep=6)(tokens).index[0].tolist()
    assert len(set(masked)) == 6
    assert masked == divprune_oracle(tokens, 0, 6, True, True)
    assert DivPrune(keep=6, mask_chosen=False)(tokens).index[0].tolist() == divprune_oracle(
        tokens, 0, 6, True, False
    )


# ------------------------------------------------------------------------------------ VisPruner
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize(
    ("keep", "important_ratio"), [(64, 0.5), (128, 0.5), (192, 0.5), (64, 0.75), (63, 0.5), (32, 0.0)]
)
def test_vispruner_matches_oracle(b: int, keep: int, important_ratio: float) -> None:
    tokens = make_tokens(b, seed=20 + b)
    out = VisPruner(keep=keep, important_ratio=important_ratio)(tokens)
    assert out.lengths.tolist() == [keep] * b
    for i in range(b):
        check_selection(out, tokens, i, vispruner_oracle(tokens, i, keep, important_ratio))


def test_vispruner_all_important_is_top_attention() -> None:
    tokens = make_tokens(2)
    out = VisPruner(keep=40, important_ratio=1.0)(tokens)
    top = tokens.signals[VIT_CLS_ATTN_HEADS].mean(1).topk(40).indices.sort().values
    assert torch.equal(out.index, top)


# ------------------------------------------------------------------------------------ Downsample
def test_downsample_area_is_pool_and_bilinear_differs() -> None:
    tokens = make_tokens(2)
    area, pool = Downsample(keep=144, mode="area")(tokens), AvgPool(keep=144)(tokens)
    torch.testing.assert_close(area.features, pool.features, rtol=1e-6, atol=1e-6)
    assert torch.equal(area.index, pool.index)
    bilinear = Downsample(keep=144)(tokens)
    assert not torch.allclose(bilinear.features, pool.features, atol=1e-3)


@pytest.mark.parametrize(("grid", "keep"), [((24, 24), 144), ((24, 24), 64), ((6, 8), 12)])
def test_downsample_is_an_image_resize_per_image(grid, keep) -> None:
    tokens = make_tokens(3, grid=grid)
    out = Downsample(keep=keep)(tokens)
    rows, cols = {144: (12, 12), 64: (8, 8), 12: (3, 4)}[keep]
    for i in range(3):
        image = tokens.features[i].T.reshape(1, -1, *grid)  # [1, D, H, W]
        want = F.interpolate(image, size=(rows, cols), mode="bilinear", antialias=True)[0].flatten(1).T
        torch.testing.assert_close(out.features[i], want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ golden
GOLDEN_CASES = {
    "visionzip_64": lambda: VisionZip(dominant=54, contextual=10),
    "divprune_greedy": lambda: DivPrune(keep=20, sort=False),
    "vispruner_64": lambda: VisPruner(keep=64, important_ratio=0.5),
    "downsample_144": lambda: Downsample(keep=144),
}


def golden_inputs() -> VisualTokens:
    data = torch.load(GOLDEN / "inputs.pt")
    signals = {k: data[k].float() for k in (VIT_CLS_ATTN_HEADS, VIT_FEAT_KEYS, VIT_CLS_FEATURE)}
    return VisualTokens(features=data["features"].float(), grid=tuple(data["grid"].tolist()), signals=signals)


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden(case: str) -> None:
    out = GOLDEN_CASES[case]()(golden_inputs())
    expected = torch.load(GOLDEN / f"{case}.pt")
    assert torch.equal(out.lengths, expected["lengths"])
    assert torch.equal(out.index, expected["index"].long())
    torch.testing.assert_close(out.features, expected["features"], atol=1e-6, rtol=1e-6)


def regenerate_golden() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    tokens = make_tokens(2, seed=2025)
    stored = {k: v.half() for k, v in tokens.signals.items()}  # fp16 on disk, used in fp32: exact and small
    torch.save(
        {"features": tokens.features.half(), "grid": torch.tensor(tokens.grid), **stored},
        GOLDEN / "inputs.pt",
    )
    tokens = golden_inputs()
    for case, make in GOLDEN_CASES.items():
        out = make()(tokens)
        index = out.index.to(torch.int16)
        torch.save({"features": out.features, "index": index, "lengths": out.lengths}, GOLDEN / f"{case}.pt")
        print(f"wrote {case}: lengths {out.lengths.tolist()}")


if __name__ == "__main__":
    if "--regen" not in sys.argv:
        sys.exit("usage: python tests/test_peers_reference.py --regen")
    regenerate_golden()
