"""PruMerge and PruMerge+ (Shang et al., arXiv 2403.15388): adaptive pruning and merging of visual tokens.

Both follow the authors' code (`notes/prumerge.md` §3-4; field-by-field mapping and every
degenerate case in `docs/prumerge.md`), batched and vectorised:

1. CLS attention `a` [B, N] and patch keys [B, N, C] come in as signals (`vit_cls_attn`, `vit_keys`).
2. IQR outliers: m = #{a > Q3 + 1.5 IQR}, per image (`iqr_scope="image"`, batch-invariant) or pooled
   over the batch as the reference does (`"batch"`: every image keeps floor(#outliers / B)).
3. Keep the m highest-attention patches (descending attention). PruMerge+ adds grid points:
   the reference's raster stride rule (`grid="adaptive"`) or a 2-D grid to a fixed budget.
4. Each kept patch absorbs its `knn_k` nearest patches by key cosine among *all* other patches,
   ranked in the reference's candidate order: x_t + sum_j a_j x_j (`merge="reference"`).
5. One extra token, sum over unkept patches of a_j x_j, is appended last.

Per image the kept patches and the rest form one permutation of the N patches ("plan order":
kept ones in output order, then the others ascending), which is exactly the reference's candidate
list with the centre removed. That makes every step a fixed-size batched tensor op.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from tokenprune.reducers._ops import gather_tokens, identity
from tokenprune.reducers.baselines import uniform_indices
from tokenprune.types import VIT_CLS_ATTN, VIT_KEYS, Reduced, Space, VisualTokens

Scope = Literal["image", "batch"]
Merge = Literal["reference", "average", "none"]
Order = Literal["reference", "spatial"]
Grid = Literal["adaptive", "fixed"]

_CASCADE_BLOCK = 16  # torch's CPU `sum` adds rows in blocks of 16, then adds the block sums (cascade)
_CASCADE_LEVELS = 4


@dataclass
class MergePlan:
    """What a PruMerge reducer keeps and merges, before any feature arithmetic.

    Attributes:
        order: [B, N] long; per image a permutation of the patches: the kept ones in output order
            (descending attention, then grid points ascending), then the others ascending.
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
    merge_chunk: int | None = None  # images merged per pass (None: auto, see `_reduce`); not a config field

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
        return _plan_order(_attention_rank(attn), counts)

    def plan(self, tokens: VisualTokens) -> MergePlan:
        """The kept patches and their merge neighbourhoods (for inspection and visualisation)."""
        return _make_plan(tokens, *self.select(tokens), self.knn_k)

    def __call__(self, tokens: VisualTokens) -> Reduced:
        if tokens.features.shape[0] == 0:
            return _empty(tokens)
        order, kept = self.select(tokens)
        return _reduce(
            tokens, order, kept, self.knn_k, self.merge, self.order, self.extra_token, self.merge_chunk
        )


class PruMergePlus:
    """PruMerge+: PruMerge's outliers plus spatially spread patches, merged the same way.

    Args:
        grid: "adaptive" adds the reference's raster grid {0, s, 2s, ...} < N - 1 with
            s = floor(floor(1 / r) / 3), r the outlier ratio (about 3 m extra patches); "fixed" keeps
            exactly `budget` patches: the `top_k` highest-attention ones plus a 2-D uniform grid.
        budget: patches kept with grid="fixed" (extra token not counted; >= N keeps the input as is).
        top_k: top-attention patches within the fixed budget (None: budget // 2, the reference's 72 + 72).
        iqr_scope, iqr_factor, knn_k, merge, order, extra_token, min_keep: as in `PruMerge`
            (the IQR fields and min_keep only matter with grid="adaptive").
    """

    space: ClassVar[Space] = "vision"
    requires: ClassVar[tuple[str, ...]] = (VIT_CLS_ATTN, VIT_KEYS)
    merge_chunk: int | None = None  # images merged per pass (None: auto, see `_reduce`); not a config field

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
        if grid not in ("adaptive", "fixed"):
            raise ValueError(f"grid must be 'adaptive' or 'fixed', got {grid!r}")
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        if top_k is not None and not 0 <= top_k <= budget:
            raise ValueError(f"top_k must be in [0, budget={budget}], got {top_k}")
        _check_common(iqr_scope, iqr_factor, knn_k, merge, order, extra_token, min_keep, grid == "fixed")
        self.grid, self.budget, self.top_k = grid, budget, top_k
        self.iqr_scope, self.iqr_factor, self.knn_k = iqr_scope, iqr_factor, knn_k
        self.merge, self.order, self.extra_token, self.min_keep = merge, order, extra_token, min_keep

    def select(self, tokens: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan order [B, N] and kept counts [B] (see `MergePlan`)."""
        attn = _attention(tokens)  # [B, N] float32
        rank = _attention_rank(attn)  # [B, N]
        n = attn.shape[1]
        if self.grid == "fixed":
            budget = min(self.budget, n)
            top_k = min(budget // 2 if self.top_k is None else self.top_k, budget)
            counts = torch.full((attn.shape[0],), top_k, dtype=torch.long, device=attn.device)
            return _plan_order(rank, counts, _fixed_grid(rank, top_k, budget, tokens.grid))
        counts, outliers, pooled = _outlier_counts(attn, self.iqr_scope, self.iqr_factor, self.min_keep)
        return _plan_order(rank, counts, _raster_grid(counts, outliers, pooled, n))

    def plan(self, tokens: VisualTokens) -> MergePlan:
        """The kept patches and their merge neighbourhoods (for inspection and visualisation)."""
        return _make_plan(tokens, *self.select(tokens), self.knn_k)

    def __call__(self, tokens: VisualTokens) -> Reduced:
        if tokens.features.shape[0] == 0:
            return _empty(tokens)
        if self.grid == "fixed" and self.budget >= tokens.features.shape[1]:
            return identity(tokens)
        order, kept = self.select(tokens)
        return _reduce(
            tokens, order, kept, self.knn_k, self.merge, self.order, self.extra_token, self.merge_chunk
        )


def _empty(tokens: VisualTokens) -> Reduced:
    """The output for an empty batch: [0, 0, D] features."""
    x = tokens.features
    index = torch.zeros(0, 0, dtype=torch.long, device=x.device)
    return Reduced(features=x[:, :0], index=index, lengths=torch.zeros(0, dtype=torch.long, device=x.device))


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


def _attention_rank(attn: torch.Tensor) -> torch.Tensor:
    """[B, N] position of each patch when sorted by descending attention (ties: lower index first)."""
    b, n = attn.shape
    by_attention = torch.sort(attn, dim=1, descending=True, stable=True).indices  # [B, N]
    positions = torch.arange(n, device=attn.device).expand(b, n)
    return torch.empty_like(by_attention).scatter_(1, by_attention, positions)


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


# --------------------------------------------------------------------------------------------------
# merging


def _make_plan(tokens: VisualTokens, order: torch.Tensor, kept: torch.Tensor, knn_k: int) -> MergePlan:
    weights = _attention(tokens).to(tokens.features.dtype)  # [B, N]
    mmax = int(kept.max()) if kept.numel() else 0
    neighbours = _neighbours(tokens.signals[VIT_KEYS], order, mmax, knn_k)
    return MergePlan(order=order, kept=kept, neighbours=neighbours, weights=weights)


def _neighbours(keys: torch.Tensor, order: torch.Tensor, mmax: int, knn_k: int) -> torch.Tensor:
    """[B, Mmax, k] the k most key-similar other patches of each kept slot, most similar first.

    Slot i's candidates are the plan order without position i, i.e. the reference's list
    [kept before i, kept after i, unkept ascending]; `topk` runs over them in that order so ties
    resolve as in the reference. Similarities of fp32 keys are computed in float64, so rankings do
    not depend on the batch size through GEMM blocking; fp16/bf16 keys stay in their dtype (the
    reference's ties come from that rounding). A patch whose key is not finite is nobody's neighbour.
    """
    b, n, _ = keys.shape
    k = min(knn_k, n - 1)
    if mmax == 0 or k <= 0:
        return torch.zeros(b, mmax, 0, dtype=torch.long, device=keys.device)
    norm = torch.linalg.vector_norm(keys, dim=-1, keepdim=True)  # [B, N, 1]
    unit = keys / norm.clamp_min(1e-12)  # [B, N, C], F.normalize as the reference
    if unit.dtype == torch.float32:
        unit = unit.double()
    centres = gather_tokens(unit, order[:, :mmax])  # [B, Mmax, C]
    similarity = torch.bmm(centres, unit.transpose(1, 2))  # [B, Mmax, N], columns by patch id
    corrupt = ~torch.isfinite(norm[..., 0])  # [B, N]: a non-finite key is nobody's neighbour
    similarity.masked_fill_(corrupt[:, None, :] | corrupt.gather(1, order[:, :mmax])[:, :, None], -2.0)
    slot = torch.arange(mmax, device=keys.device)[:, None]  # [Mmax, 1]
    j = torch.arange(n - 1, device=keys.device)[None]  # [1, N-1]
    skip_self = (j + (j >= slot)).flatten().expand(b, -1)  # [B, Mmax*(N-1)]: plan positions but slot i
    candidates = order.gather(1, skip_self).view(b, mmax, n - 1)  # [B, Mmax, N-1] patch ids, reference order
    best = similarity.gather(2, candidates).topk(k, dim=2).indices  # [B, Mmax, k]
    return candidates.gather(2, best)


def _cascade_sum(table: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j table[ids[r, j]] over j < lengths[r] -> [R, D], in the order torch's CPU `sum` adds rows.

    That order is a cascade: rows are added one by one in blocks of 16; full blocks' sums are
    added one by one into a second level, whose sums of 16 blocks go to a third, and so on; the
    partial sums of all levels are added at the end, lowest level first. Summing
    `x[ids[r]].sum(0)` per row (what the reference does per token) therefore gives the same bits
    as this, which needs no [R, L, D] intermediate: `embedding_bag` adds each group sequentially.
    Trailing invalid rows act as zeros, which change nothing. Holds on CPU for feature widths that
    are a multiple of 32 (torch sums other widths in another order).

    Args:
        table: [T, D] rows to add (float32/float64; fp16/bf16 rows upcast, as torch accumulates them).
        ids: [R, L] long row ids into table.
        lengths: [R] number of valid ids per row (default: all L).
    """
    r, length = ids.shape
    if length == 0:
        return table.new_zeros(r, table.shape[1])
    blocks = -(-length // _CASCADE_BLOCK)
    starts = torch.arange(blocks + 1, device=ids.device) * _CASCADE_BLOCK  # [blocks + 1]
    valid = torch.full((r, 1), length, device=ids.device) if lengths is None else lengths[:, None]
    # bag q of row r: its ids [16q, 16q + 16) cut at lengths[r]; one more bag takes the invalid tail
    offsets = torch.arange(r, device=ids.device)[:, None] * length + torch.minimum(starts[None], valid)
    offsets = torch.cat([offsets.flatten(), offsets.new_full((1,), r * length)])  # + the end of the last bag
    bags = F.embedding_bag(ids.flatten(), table, offsets, mode="sum", include_last_offset=True)
    items = bags.view(r, blocks + 1, -1)[:, :blocks]  # [R, blocks, D]; empty bags are zero
    partials = []  # the partial sum left at each level, lowest first
    full = length // _CASCADE_BLOCK
    if full < blocks:
        partials.append(items[:, full])
    items = items[:, :full]  # [R, full blocks, D]
    for level in range(1, _CASCADE_LEVELS):  # over cascade levels (at most 4), never over tokens
        count = items.shape[1]
        groups = 0 if level == _CASCADE_LEVELS - 1 else count // _CASCADE_BLOCK
        if count > groups * _CASCADE_BLOCK:
            partials.append(_sequential_sum(items[:, groups * _CASCADE_BLOCK :]))
        if groups == 0:
            break
        grouped = items[:, : groups * _CASCADE_BLOCK].reshape(r * groups, _CASCADE_BLOCK, -1)
        items = _sequential_sum(grouped).view(r, groups, -1)  # [R, groups, D]
    total = partials[0]
    for part in partials[1:]:
        total = total + part
    return total


def _sequential_sum(items: torch.Tensor) -> torch.Tensor:
    """[R, L, D] -> [R, D], adding the L rows one after the other (embedding_bag's order)."""
    r, length, d = items.shape
    ids = torch.arange(r * length, device=items.device).view(r, length)
    return F.embedding_bag(ids, items.reshape(r * length, d), mode="sum")


def _merge(
    x: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    order: torch.Tensor,
    kept: torch.Tensor,
    mmax: int,
    knn_k: int,
    merge: str,
    with_extra: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merged kept tokens [b, Mmax, D] in plan order (rows past kept[b] are filler) and the extra token [b, D].

    Args:
        x: [b, N, D] features; w: [b, N] attention in x's dtype; keys: [b, N, C].
        order: [b, N] plan order; kept: [b] kept counts; mmax: max(kept) as a host int.
    """
    b, n, d = x.shape
    centres = gather_tokens(x, order[:, :mmax])  # [b, Mmax, D]
    # a_j x_j rounded in the feature dtype (as the reference multiplies), summed in the accumulation dtype
    acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    table = (x * w[..., None]).flatten(0, 1).to(acc_dtype)  # [b*N, D]
    row_base = torch.arange(b, device=x.device)[:, None] * n  # [b, 1]
    if merge == "none":
        y = centres
    else:
        neighbours = _neighbours(keys, order, mmax, knn_k)  # [b, Mmax, k]
        absorbed = _cascade_sum(table, (neighbours + row_base[..., None]).flatten(0, 1))  # [b*Mmax, D]
        absorbed = absorbed.view(b, mmax, d).to(x.dtype)
        if merge == "reference":
            y = centres + absorbed  # the centre keeps weight 1
        else:  # average: (a_t x_t + sum_j a_j x_j) / (a_t + sum_j a_j)
            w_centre = w.gather(1, order[:, :mmax])  # [b, Mmax]
            mass = w.gather(1, neighbours.flatten(1)).view(neighbours.shape).float().sum(-1)  # [b, Mmax]
            mass = mass + w_centre.float()
            total = w_centre[..., None] * centres + absorbed  # [b, Mmax, D]
            y = torch.where((mass > 0)[..., None], (total / mass[..., None]).to(x.dtype), centres)
    if not with_extra:
        return y, None
    # extra token: the unkept patches, ascending (the tail of the plan order)
    j = torch.arange(n, device=x.device)[None]  # [1, N]
    unkept = order.gather(1, (j + kept[:, None]).clamp(max=n - 1))  # [b, N], valid below N - kept
    extra = _cascade_sum(table, unkept + row_base, n - kept).to(x.dtype)  # [b, D]
    if merge == "average":
        mass = torch.where(j < (n - kept)[:, None], w.gather(1, unkept), 0).float().sum(1)  # [b]
        extra = torch.where((mass > 0)[:, None], (extra / mass[:, None].clamp(min=1e-30)).to(x.dtype), extra)
    return y, extra


def _reduce(
    tokens: VisualTokens,
    order: torch.Tensor,
    kept: torch.Tensor,
    knn_k: int,
    merge: str,
    output_order: str,
    extra_token: bool,
    merge_chunk: int | None = None,
) -> Reduced:
    """Merge and assemble the right-padded output from a plan order [B, N] and kept counts [B].

    The merge runs on `merge_chunk` images at a time (None: the whole batch, except on CPU where
    one image at a time was measured 2-3x faster at B = 32: the batched temporaries leave the
    cache). Each image's result does not depend on the chunking.
    """
    x = tokens.features  # [B, N, D]
    b, n, d = x.shape
    has_extra = (kept < n) & extra_token  # [B]
    lengths = kept + has_extra.long()  # [B]
    kept_host = kept.tolist()  # the one host sync: output shapes
    mmax, m_out = max(kept_host), int(max(k + (k < n and extra_token) for k in kept_host))
    with_extra = extra_token and min(kept_host) < n
    w = _attention(tokens).to(x.dtype)  # [B, N]
    keys = tokens.signals[VIT_KEYS]  # [B, N, C]
    chunk = merge_chunk or (1 if x.device.type == "cpu" else b)
    merged, extras = [], []
    for s in range(0, b, chunk):  # over images (one pass when batched), never over tokens
        part = slice(s, s + chunk)
        y_part, extra_part = _merge(
            x[part],
            w[part],
            keys[part],
            order[part],
            kept[part],
            max(kept_host[part]),
            knn_k,
            merge,
            with_extra,
        )
        merged.append(F.pad(y_part, (0, 0, 0, mmax - y_part.shape[1])))  # [chunk, Mmax, D]
        extras.append(extra_part)
    y = torch.cat(merged) if len(merged) > 1 else merged[0]  # [B, Mmax, D]
    slot = torch.arange(mmax, device=x.device)
    valid = slot[None] < kept[:, None]  # [B, Mmax]
    centre_ids = order[:, :mmax]  # [B, Mmax]
    index = torch.where(valid, centre_ids, -1)  # [B, Mmax]
    if output_order == "spatial":
        resort = torch.where(valid, centre_ids, n + slot[None]).argsort(dim=1)  # [B, Mmax]
        y, index = gather_tokens(y, resort), index.gather(1, resort)
    y = torch.where(valid[..., None], y, 0)  # [B, Mmax, D]
    if m_out > mmax:
        y = torch.cat([y, y.new_zeros(b, m_out - mmax, d)], dim=1)  # [B, M, D]
        index = torch.cat([index, index.new_full((b, m_out - mmax), -1)], dim=1)  # [B, M]
    if with_extra:
        extra = torch.cat(extras) if len(extras) > 1 else extras[0]  # [B, D]
        at_extra = torch.arange(m_out, device=x.device)[None] == kept[:, None]  # [B, M]
        y = torch.where((at_extra & has_extra[:, None])[..., None], extra[:, None, :], y)
    return Reduced(features=y, index=index, lengths=lengths)
