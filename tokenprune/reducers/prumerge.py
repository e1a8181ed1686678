"""PruMerge and PruMerge+ (Shang et al., arXiv 2403.15388): adaptive pruning and merging of visual tokens.

Both follow the authors' code (`notes/prumerge.md` §3-4; field-by-field mapping and every
degenerate case in `docs/prumerge.md`), batched and vectorised:

1. CLS attention `a` [B, N] and patch keys [B, N, C] come in as signals (`vit_cls_attn`, `vit_keys`).
2. IQR outliers: m = #{a > Q3 + 1.5 IQR}, per image (`iqr_scope="image"`, batch-invariant) or pooled
   over the batch as the reference does (`"batch"`: every image keeps floor(#outliers / B)).
3. Keep the m highest-attention patches (descending attention). PruMerge+ adds grid points:
   the reference's raster stride rule (`grid="adaptive"`), the reference's fixed 72 + 72 branch with
   its duplicates (`"reference_fixed"`) or a deduplicated 2-D grid to a fixed budget (`"fixed"`).
4. Each kept patch absorbs its `knn_k` nearest patches by key cosine among *all* other patches,
   ranked in the reference's candidate order: x_t + sum_j a_j x_j (`merge="reference"`).
5. One extra token, sum over unkept patches of a_j x_j, is appended last.

Per image the kept patches and the rest form one permutation of the N patches ("plan order":
kept ones in output order, then the others ascending), which is exactly the reference's candidate
list with the centre removed. That makes every step a fixed-size batched tensor op. This module
decides the plan; `prumerge_merge` merges and assembles the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Literal

import torch

from tokenprune.reducers._ops import identity
from tokenprune.reducers.baselines import uniform_indices
from tokenprune.reducers.prumerge_merge import empty_reduced, neighbours, reduce_plan
from tokenprune.types import VIT_CLS_ATTN, VIT_KEYS, Reduced, Space, VisualTokens

Scope = Literal["image", "batch"]
Merge = Literal["reference", "average", "none"]
Order = Literal["reference", "spatial"]
Grid = Literal["adaptive", "fixed", "reference_fixed"]


@dataclass
class MergePlan:
    """What a PruMerge reducer keeps and merges, before any feature arithmetic.

    Attributes:
        order: [B, N] long; per image a permutation of the patches: the kept ones in output order
            (descending attention, then grid points ascending), then the others ascending
            (grid="reference_fixed": kept slots may repeat a patch, and as many unkept ones are missing).
        kept: [B] long; M_b, the number of kept patches (the extra token not counted).
        neighbours: [B, Mmax, k] long; for kept slot i, the k other patches with the most similar
            keys, most similar first. Rows at or past `kept[b]` are filler.
        weights: [B, N] CLS attention after the non-finite fallback, in the feature dtype.
    """

    order: torch.Tensor  # [B, N]
    kept: torch.Tensor  # [B]
    neighbours: torch.Tensor  # [B, Mmax, k]
    weights: torch.Tensor  # [B, N]


class PruMerge:
    """PruMerge: keep the IQR outliers of the CLS attention, merge their key-space neighbours into them.

    Args:
        iqr_scope: "image" computes the IQR fence per image (batch-invariant, default); "batch" pools
            the attention of the whole batch and gives every image floor(#outliers / B) tokens,
            exactly as the reference.
        iqr_factor: the upper fence is Q3 + iqr_factor * (Q3 - Q1) (reference 1.5; strict >).
        knn_k: neighbours merged into each kept token (reference 32; capped at N - 1).
        merge: "reference" x_t + sum_j a_j x_j (unnormalised); "average" the attention-weighted
            average over the kept patch and its neighbours (a_t x_t + sum_j a_j x_j) / (a_t + sum_j a_j);
            "none" keeps the patch unchanged (the paper's prune-only ablation).
        order: "reference" (descending attention, extra token last) or "spatial" (kept patches in
            raster order, extra token last); the tokens are the same, only permuted.
        extra_token: append the attention-weighted sum of all unkept patches (reference: yes). It is
            left out for an image that keeps every patch.
        min_keep: keep at least this many top-attention patches per image (reference 0: an image
            with no outlier yields the extra token alone).
    """

    space: ClassVar[Space] = "vision"
    requires: ClassVar[tuple[str, ...]] = (VIT_CLS_ATTN, VIT_KEYS)
    # images merged per pass (None: auto, see `prumerge_merge.reduce_plan`); not a config field
    merge_chunk: int | None = None

    def __init__(
        self,
        iqr_scope: Scope = "image",
        iqr_factor: float = 1.5,
        knn_k: int = 32,
        merge: Merge = "reference",
        order: Order = "reference",
        extra_token: bool = True,
        min_keep: int = 0,
    ) -> None:
        _check_common(iqr_scope, iqr_factor, knn_k, merge, order, extra_token, min_keep)
        self.iqr_scope, self.iqr_factor, self.knn_k = iqr_scope, iqr_factor, knn_k
        self.merge, self.order, self.extra_token, self.min_keep = merge, order, extra_token, min_keep

    def select(self, tokens: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan order [B, N] and kept counts [B] (see `MergePlan`)."""
        attn = _attention(tokens)  # [B, N] float32
        counts, _, _ = _outlier_counts(attn, self.iqr_scope, self.iqr_factor, self.min_keep)
        return _plan_order(_attention_rank(attn, counts, _signal_dtype(tokens)), counts)

    def plan(self, tokens: VisualTokens) -> MergePlan:
        """The kept patches and their merge neighbourhoods (for inspection and visualisation)."""
        return _make_plan(tokens, *self.select(tokens), self.knn_k)

    def flops(self, n: int, kept: int, width: int) -> int:
        """Per image, N patches to `kept` tokens: see `_merge_flops`."""
        return _merge_flops(n, kept, width, self.knn_k, self.merge, self.extra_token)

    def __call__(self, tokens: VisualTokens) -> Reduced:
        if tokens.features.shape[0] == 0:
            return empty_reduced(tokens)
        return _select_and_merge(self, tokens)


class PruMergePlus:
    """PruMerge+: PruMerge's outliers plus spatially spread patches, merged the same way.

    Args:
        grid: "adaptive" adds the reference's raster grid {0, s, 2s, ...} < N - 1 with
            s = floor(floor(1 / r) / 3), r the outlier ratio (about 3 m extra patches); "fixed" keeps
            exactly `budget` patches: the `top_k` highest-attention ones plus a 2-D uniform grid;
            "reference_fixed" is the authors' fixed branch (`if_adaptive=False`, the only one of theirs
            that runs at B > 1): the N // 8 highest-attention patches, then the raster points
            {4, 12, 20, ...} < N - 1 (columns 4, 12, 20 at 24 x 24) *without* de-duplication, and the
            reference's complement, which drops the d smallest unkept patches when d points repeat a
            top patch: 2 N // 8 kept slots (144 at N = 576) + the extra token. `budget`, `top_k` and
            the IQR fields are unused; it needs N // 8 raster points (true at N = 576, as the reference).
        budget: patches kept with grid="fixed" (extra token not counted; >= N keeps the input as is).
        top_k: top-attention patches within the fixed budget (None: budget // 2, the reference's 72 + 72).
        iqr_scope, iqr_factor, knn_k, merge, order, extra_token, min_keep: as in `PruMerge`
            (the IQR fields and min_keep only matter with grid="adaptive").
    """

    space: ClassVar[Space] = "vision"
    requires: ClassVar[tuple[str, ...]] = (VIT_CLS_ATTN, VIT_KEYS)
    # images merged per pass (None: auto, see `prumerge_merge.reduce_plan`); not a config field
    merge_chunk: int | None = None

    def __init__(
        self,
        grid: Grid = "adaptive",
        budget: int = 144,
        top_k: int | None = None,
        iqr_scope: Scope = "image",
        iqr_factor: float = 1.5,
        knn_k: int = 32,
        merge: Merge = "reference",
        order: Order = "reference",
        extra_token: bool = True,
        min_keep: int = 0,
    ) -> None:
        if grid not in ("adaptive", "fixed", "reference_fixed"):
            raise ValueError(f"grid must be 'adaptive', 'fixed' or 'reference_fixed', got {grid!r}")
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        if top_k is not None and not 0 <= top_k <= budget:
            raise ValueError(f"top_k must be in [0, budget={budget}], got {top_k}")
        _check_common(iqr_scope, iqr_factor, knn_k, merge, order, extra_token, min_keep, grid != "adaptive")
        self.grid, self.budget, self.top_k = grid, budget, top_k
        self.iqr_scope, self.iqr_factor, self.knn_k = iqr_scope, iqr_factor, knn_k
        self.merge, self.order, self.extra_token, self.min_keep = merge, order, extra_token, min_keep

    def select(self, tokens: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan order [B, N] and kept counts [B] (see `MergePlan`)."""
        attn = _attention(tokens)  # [B, N] float32
        b, n = attn.shape
        dtype = _signal_dtype(tokens)
        if self.grid == "adaptive":
            counts, outliers, pooled = _outlier_counts(attn, self.iqr_scope, self.iqr_factor, self.min_keep)
            rank = _attention_rank(attn, counts, dtype)  # [B, N]
            return _plan_order(rank, counts, _raster_grid(counts, outliers, pooled, n))
        if self.grid == "reference_fixed":
            top_k = n // 8
        else:
            budget = min(self.budget, n)
            top_k = min(budget // 2 if self.top_k is None else self.top_k, budget)
        counts = torch.full((b,), top_k, dtype=torch.long, device=attn.device)
        rank = _attention_rank(attn, counts, dtype)  # [B, N]
        if self.grid == "reference_fixed":
            return _reference_fixed_order(rank)
        return _plan_order(rank, counts, _fixed_grid(rank, top_k, budget, tokens.grid))

    def plan(self, tokens: VisualTokens) -> MergePlan:
        """The kept patches and their merge neighbourhoods (for inspection and visualisation)."""
        return _make_plan(tokens, *self.select(tokens), self.knn_k)

    def flops(self, n: int, kept: int, width: int) -> int:
        """Per image, N patches to `kept` tokens: see `_merge_flops`."""
        return _merge_flops(n, kept, width, self.knn_k, self.merge, self.extra_token)

    def __call__(self, tokens: VisualTokens) -> Reduced:
        if tokens.features.shape[0] == 0:
            return empty_reduced(tokens)
        if self.grid == "fixed" and self.budget >= tokens.features.shape[1]:
            return identity(tokens)
        return _select_and_merge(self, tokens)


def _merge_flops(n: int, kept: int, width: int, knn_k: int, merge: str, extra_token: bool) -> int:
    """FLOPs of merging N patches of width C (keys and features alike) into `kept` output tokens.

    M = kept (less the extra token) centres: key cosines against every patch 2 M N C, the weighted
    neighbour sums 2 M k C (k = knn_k, capped at N - 1; none with merge="none") and the extra token's
    weighted sum over the unkept patches, counted as 2 N C. Selection (IQR, sorts) is not counted.
    """
    centres = max(kept - int(extra_token and kept > 0), 0)
    k = min(knn_k, n - 1)
    merging = 0 if merge == "none" else 2 * centres * n * width + 2 * centres * k * width
    return merging + (2 * n * width if extra_token else 0)


def _check_common(
    iqr_scope: str,
    iqr_factor: float,
    knn_k: int,
    merge: str,
    order: str,
    extra_token: bool,
    min_keep: int,
    fixed_budget: bool = False,
) -> None:
    if iqr_scope not in ("image", "batch"):
        raise ValueError(f"iqr_scope must be 'image' or 'batch', got {iqr_scope!r}")
    if not iqr_factor >= 0:
        raise ValueError(f"iqr_factor must be >= 0, got {iqr_factor}")
    if knn_k < 0:
        raise ValueError(f"knn_k must be >= 0, got {knn_k}")
    if merge not in ("reference", "average", "none"):
        raise ValueError(f"merge must be 'reference', 'average' or 'none', got {merge!r}")
    if order not in ("reference", "spatial"):
        raise ValueError(f"order must be 'reference' or 'spatial', got {order!r}")
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0, got {min_keep}")
    if not extra_token and min_keep < 1 and not fixed_budget:
        raise ValueError("extra_token=False needs min_keep >= 1, or an image without outliers keeps no token")


# --------------------------------------------------------------------------------------------------
# selection


def _attention(tokens: VisualTokens) -> torch.Tensor:
    """The CLS attention [B, N] in float32; an image whose row is not all finite gets uniform 1/N."""
    for name in (VIT_CLS_ATTN, VIT_KEYS):
        if name not in tokens.signals:
            raise KeyError(f"PruMerge needs the signal {name!r}; got {sorted(tokens.signals)}")
    b, n, _ = tokens.features.shape
    attn = tokens.signals[VIT_CLS_ATTN].float()  # [B, N]
    keys = tokens.signals[VIT_KEYS]
    if attn.shape != (b, n) or keys.shape[:2] != (b, n) or keys.dim() != 3:
        raise ValueError(
            f"expected {VIT_CLS_ATTN} [B, N]=[{b}, {n}] and {VIT_KEYS} [B, N, C]; got "
            f"{tuple(attn.shape)} and {tuple(keys.shape)}"
        )
    finite = torch.isfinite(attn).all(dim=1, keepdim=True)  # [B, 1]
    return torch.where(finite, attn, torch.full_like(attn, 1.0 / n))


def _outlier_counts(
    attn: torch.Tensor, scope: str, factor: float, min_keep: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Kept count m [B], outlier count [B] and the number of values they were counted among.

    Mirrors the reference: Q1/Q3 by linear interpolation (numpy's default), outliers strictly
    above Q3 + factor * IQR; with scope "batch" the count is pooled over the batch and every image
    keeps floor(#outliers / B). Integer arithmetic: at N = 576 it equals the reference's float
    `int(576 * ratio)` for every count (checked for B <= 32 in the tests).
    """
    b, n = attn.shape
    probs = torch.tensor([0.25, 0.75], dtype=attn.dtype, device=attn.device)
    if scope == "image":
        q1, q3 = torch.quantile(attn, probs, dim=1, keepdim=True)  # [B, 1] each
        outliers, pooled = (attn > q3 + factor * (q3 - q1)).sum(dim=1), n  # [B]
    else:
        q1, q3 = torch.quantile(attn.flatten(), probs)  # scalars
        outliers, pooled = (attn > q3 + factor * (q3 - q1)).sum().expand(b), b * n  # [B]
    counts = (outliers // (pooled // n)).clamp(min=min(min_keep, n))  # [B]
    return counts, outliers, pooled


def _signal_dtype(tokens: VisualTokens) -> torch.dtype:
    return tokens.signals[VIT_CLS_ATTN].dtype


def _attention_rank(attn: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] position of each patch in descending attention; the first counts[b] decide what is kept.

    A float32 signal is sorted stably (ties: lower index first). A half-precision signal (the
    tower's dtype, `signal_dtype=model`) has many exact ties, which the reference orders by
    `topk(a, m)` in that dtype: each image's top counts[b] are then taken from `topk` with exactly
    its count (one call per image; the others follow in stable order), so the kept patches and their
    order (their positions in the LLM) are the reference's.
    """
    b, n = attn.shape
    by_attention = torch.sort(attn, dim=1, descending=True, stable=True).indices  # [B, N]
    positions = torch.arange(n, device=attn.device).expand(b, n)
    rank = torch.empty_like(by_attention).scatter_(1, by_attention, positions)  # [B, N]
    if dtype not in (torch.float16, torch.bfloat16):
        return rank
    signal = attn.to(dtype)  # [B, N], the signal's own values (finite rows unchanged)
    for i, m in enumerate(counts.tolist()):  # over images: topk takes each image's own count
        if m > 0:
            top = torch.topk(signal[i], m).indices  # [m] in the reference's order
            rank[i] = rank[i] + m  # the others after the top m, in stable order
            rank[i, top] = torch.arange(m, device=attn.device)
    return rank


def _raster_grid(counts: torch.Tensor, outliers: torch.Tensor, pooled: int, n: int) -> torch.Tensor:
    """[B, N] bool: the reference's PruMerge+ grid {0, s, 2s, ...} < N - 1, s = floor(floor(1/r) / 3).

    r = outliers / pooled is the outlier ratio, so floor(1/r) = pooled // outliers (equal to the
    reference's float `int(1 / ratio)` for every count at N = 576, B = 1); when min_keep raised the
    count above the outliers, r = m / N. Degenerate cases: no kept patch gives no grid point (the
    reference divides by zero); s = 0 (more than N / 3 outliers) is raised to 1 (the reference crashes).
    """
    big = torch.full_like(counts, pooled + n)
    step = torch.minimum(
        torch.where(outliers > 0, pooled // outliers.clamp(min=1), big),
        torch.where(counts > 0, n // counts.clamp(min=1), big),
    )  # [B]
    stride = (step // 3).clamp(min=1)  # [B]
    pos = torch.arange(n, device=counts.device)
    on_grid = (pos[None] < n - 1) & (pos[None] % stride[:, None] == 0)  # [B, N]
    return on_grid & (counts > 0)[:, None]


def _fixed_grid(rank: torch.Tensor, top_k: int, budget: int, grid: tuple[int, int]) -> torch.Tensor:
    """[B, N] bool: `budget - top_k` grid patches per image, none of them among its top_k.

    The grid is `uniform_indices(budget - top_k)` (a 2-D lattice); a lattice patch that is already a
    top-k patch is replaced by the next patch of a fixed, spatially spread order of the others.
    """
    b, n = rank.shape
    count = budget - top_k
    priority = _grid_priority(grid, count, str(rank.device)).to(rank.device)  # [N]
    # top-k patches go behind every other patch, so the `count` first are all new
    key = torch.where(rank < top_k, priority + n, priority)  # [B, N]
    chosen = key.argsort(dim=1)[:, :count]  # [B, count]
    return torch.zeros(b, n, dtype=torch.bool, device=rank.device).scatter_(1, chosen, True)


@lru_cache(maxsize=64)
def _grid_priority(grid: tuple[int, int], count: int, device: str) -> torch.Tensor:
    """[N] long: rank of each patch in the fixed grid's preference order.

    First the `count` lattice patches of `uniform_indices` (raster order), then every other patch in
    van der Corput (bit-reversed) order of its raster rank, so any prefix is spread over the image.
    """
    h, w = grid
    n = h * w
    lattice = uniform_indices(count, grid) if count > 0 else torch.zeros(0, dtype=torch.long)
    others = torch.ones(n, dtype=torch.bool)
    others[lattice] = False
    rest = others.nonzero().squeeze(1)  # [n - count] ascending
    bits = max(1, (max(rest.numel(), 1) - 1).bit_length())
    v = torch.arange(1 << bits)
    reversed_v = torch.zeros_like(v)
    for bit in range(bits):
        reversed_v |= ((v >> bit) & 1) << (bits - 1 - bit)
    spread = reversed_v[reversed_v < rest.numel()]  # a permutation of range(len(rest))
    sequence = torch.cat([lattice, rest[spread]])  # [N]
    return torch.empty(n, dtype=torch.long).scatter_(0, sequence, torch.arange(n)).to(device)


def _reference_fixed_order(rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan order [B, N] and kept counts [B] of the authors' fixed PruMerge+ branch (ratio 1/8).

    Kept slots: the k = N // 8 top-attention patches (descending), then the raster points
    4, 12, 20, ... < N - 1, duplicates kept (2k slots). The rest of the order is the reference's
    complement: the unkept patches ascending without the d smallest, d = the number of repeated
    slots (its scatter-to-zero + sort + drop-2k construction), so it has N - 2k entries and a
    dropped patch is neither a merge candidate nor in the extra token.
    """
    b, n = rank.shape
    k = n // 8
    grid = torch.arange(4, n - 1, 8, device=rank.device)  # [k] when N // 8 points fit
    if grid.numel() != k:
        raise ValueError(
            f"grid=reference_fixed needs N // 8 = {k} raster points 4, 12, ... < N - 1, got {grid.numel()} "
            f"for N = {n} (the reference's fixed branch only runs where they agree, e.g. N = 576)"
        )
    top = rank.argsort(dim=1)[:, :k]  # [B, k] patch ids by descending attention
    chosen = torch.cat([top, grid.expand(b, -1)], dim=1)  # [B, 2k], duplicates kept
    selected = torch.zeros(b, n, dtype=torch.bool, device=rank.device).scatter_(1, chosen, True)  # [B, N]
    repeated = 2 * k - selected.sum(dim=1)  # [B] d
    pos = torch.arange(n, device=rank.device).expand(b, n)
    unkept = torch.where(selected, pos + n, pos).argsort(dim=1)  # [B, N]: unkept ascending first
    tail = unkept.gather(
        1, torch.arange(n - 2 * k, device=rank.device)[None] + repeated[:, None]
    )  # [B, N-2k]
    kept = torch.full((b,), 2 * k, dtype=torch.long, device=rank.device)
    return torch.cat([chosen, tail], dim=1), kept


def _plan_order(
    rank: torch.Tensor, counts: torch.Tensor, extra: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan order [B, N] (top-`counts` by attention, then `extra` patches ascending, then the rest
    ascending) and the kept count [B]."""
    b, n = rank.shape
    pos = torch.arange(n, device=rank.device).expand(b, n)
    top = rank < counts[:, None]  # [B, N]
    rest_key = pos + 2 * n if extra is None else torch.where(extra, pos + n, pos + 2 * n)
    order = torch.where(top, rank, rest_key).argsort(dim=1)  # keys are distinct: deterministic
    kept = counts if extra is None else counts + (extra & ~top).sum(dim=1)
    return order, kept


def _make_plan(tokens: VisualTokens, order: torch.Tensor, kept: torch.Tensor, knn_k: int) -> MergePlan:
    weights = _attention(tokens).to(tokens.features.dtype)  # [B, N]
    nb = neighbours(tokens.signals[VIT_KEYS], order, kept.tolist(), knn_k)  # [B, Mmax, k]
    return MergePlan(order=order, kept=kept, neighbours=nb, weights=weights)


def _select_and_merge(reducer: PruMerge | PruMergePlus, tokens: VisualTokens) -> Reduced:
    """What PruMerge and PruMerge+ share after their own selection: the merge plan of the kept tokens."""
    order, kept = reducer.select(tokens)
    return reduce_plan(
        tokens,
        _attention(tokens),
        order,
        kept,
        reducer.knn_k,
        reducer.merge,
        reducer.order,
        reducer.extra_token,
        reducer.merge_chunk,
    )
