"""PruMerge's merge step on a plan order: key-space neighbours, the weighted sums, the padded output.

Shared by `PruMerge` and `PruMergePlus` (tokenprune/reducers/prumerge.py), which decide what is kept
(the plan order, see `MergePlan` there); everything here is the reference's steps 3.5-3.6
(notes/prumerge.md), batched, with the reference's summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenprune.reducers._ops import gather_tokens
from tokenprune.types import VIT_KEYS, Reduced, VisualTokens

_CASCADE_BLOCK = 16  # torch's CPU `sum` adds rows in blocks of 16, then adds the block sums (cascade)
_CASCADE_LEVELS = 4


def empty_reduced(tokens: VisualTokens) -> Reduced:
    """The output for an empty batch: [0, 0, D] features."""
    x = tokens.features
    index = torch.zeros(0, 0, dtype=torch.long, device=x.device)
    return Reduced(features=x[:, :0], index=index, lengths=torch.zeros(0, dtype=torch.long, device=x.device))


def neighbours(keys: torch.Tensor, order: torch.Tensor, kept: list[int], knn_k: int) -> torch.Tensor:
    """[B, Mmax, k] the k most key-similar other patches of each kept slot, most similar first.

    Slot i's candidates are the plan order without position i, i.e. the reference's list
    [kept before i, kept after i, unkept ascending]; `topk` runs over them in that order so ties
    resolve as in the reference. The cosines are one matrix product per image, of the image's own
    shape [M_b, C] x [C, N], so an image's ranking never depends on the other images of the batch
    (GEMM blocking follows the shape). fp32 keys: the kept keys are normalised and the products
    divided by the other patches' norms (the reference normalises all keys first: equal up to
    rounding, and no normalised copy of every key is made); fp16/bf16 keys are normalised and
    multiplied in their dtype, exactly as the reference, whose ties come from that rounding. A
    patch whose key is not finite is nobody's neighbour.

    Args:
        keys: [B, N, C] patch keys; order: [B, N] plan order; kept: M_b per image (host ints).
        knn_k: neighbours per kept patch (capped at N - 1).
    """
    b, n, _ = keys.shape
    mmax, k = max(kept, default=0), min(knn_k, n - 1)
    if mmax == 0 or k <= 0:
        return torch.zeros(b, mmax, 0, dtype=torch.long, device=keys.device)
    norm = torch.linalg.vector_norm(keys, dim=-1, keepdim=True).clamp_min(
        1e-12
    )  # [B, N, 1], F.normalize's eps
    exact_half = keys.dtype != torch.float32
    columns = keys / norm if exact_half else keys  # [B, N, C]
    centres = gather_tokens(columns, order[:, :mmax])  # [B, Mmax, C]
    if not exact_half:
        centres = centres / gather_tokens(norm, order[:, :mmax])  # unit rows
    similarity = keys.new_zeros(b, mmax, n)  # [B, Mmax, N], columns by patch id
    for i, m in enumerate(kept):  # over images: a per-image shape keeps rankings batch-invariant
        similarity[i, :m] = centres[i, :m] @ columns[i].T  # [M_b, N]
    if not exact_half:
        similarity /= norm.transpose(1, 2)  # cosines: divide by each column's norm
    # a key whose norm is not finite makes every cosine it enters NaN (inf / inf, 0 * inf or NaN): such a
    # patch is nobody's neighbour, and a kept one ranks its candidates in candidate order
    similarity.nan_to_num_(nan=-2.0, posinf=-2.0, neginf=-2.0)
    slot = torch.arange(mmax, device=keys.device)[:, None]  # [Mmax, 1]
    j = torch.arange(n - 1, device=keys.device)[None]  # [1, N-1]
    skip_self = (j + (j >= slot)).flatten().expand(b, -1)  # [B, Mmax*(N-1)]: plan positions but slot i
    candidates = order.gather(1, skip_self).view(b, mmax, n - 1)  # [B, Mmax, N-1] patch ids, reference order
    best = similarity.gather(2, candidates).topk(k, dim=2).indices  # [B, Mmax, k]
    return candidates.gather(2, best)


def cascade_sum(table: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
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
            partials.append(sequential_sum(items[:, groups * _CASCADE_BLOCK :]))
        if groups == 0:
            break
        grouped = items[:, : groups * _CASCADE_BLOCK].reshape(r * groups, _CASCADE_BLOCK, -1)
        items = sequential_sum(grouped).view(r, groups, -1)  # [R, groups, D]
    total = partials[0]
    for part in partials[1:]:
        total = total + part
    return total


def sequential_sum(items: torch.Tensor) -> torch.Tensor:
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
    kept_host: list[int],
    knn_k: int,
    merge: str,
    with_extra: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merged kept tokens [b, Mmax, D] in plan order (rows past kept[b] are filler) and the extra token [b, D].

    Args:
        x: [b, N, D] features; w: [b, N] attention in x's dtype; keys: [b, N, C].
        order: [b, N] plan order; kept: [b] kept counts; kept_host: the same as host ints.
    """
    b, n, d = x.shape
    mmax = max(kept_host)
    centres = gather_tokens(x, order[:, :mmax])  # [b, Mmax, D]
    # a_j x_j rounded in the feature dtype (as the reference multiplies), summed in the accumulation dtype
    acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    table = (x * w[..., None]).flatten(0, 1).to(acc_dtype)  # [b*N, D]
    row_base = torch.arange(b, device=x.device)[:, None] * n  # [b, 1]
    if merge == "none":
        y = centres
    else:
        nb = neighbours(keys, order, kept_host, knn_k)  # [b, Mmax, k]
        absorbed = cascade_sum(table, (nb + row_base[..., None]).flatten(0, 1))  # [b*Mmax, D]
        absorbed = absorbed.view(b, mmax, d).to(x.dtype)
        if merge == "reference":
            y = centres + absorbed  # the centre keeps weight 1
        else:  # average: (a_t x_t + sum_j a_j x_j) / (a_t + sum_j a_j)
            w_centre = w.gather(1, order[:, :mmax])  # [b, Mmax]
            mass = w.gather(1, nb.flatten(1)).view(nb.shape).float().sum(-1)  # [b, Mmax]
            mass = mass + w_centre.float()
            total = w_centre[..., None] * centres + absorbed  # [b, Mmax, D]
            y = torch.where((mass > 0)[..., None], (total / mass[..., None]).to(x.dtype), centres)
    if not with_extra:
        return y, None
    # extra token: the unkept patches, ascending (the tail of the plan order)
    j = torch.arange(n, device=x.device)[None]  # [1, N]
    unkept = order.gather(1, (j + kept[:, None]).clamp(max=n - 1))  # [b, N], valid below N - kept
    extra = cascade_sum(table, unkept + row_base, n - kept).to(x.dtype)  # [b, D]
    if merge == "average":
        mass = torch.where(j < (n - kept)[:, None], w.gather(1, unkept), 0).float().sum(1)  # [b]
        extra = torch.where((mass > 0)[:, None], (extra / mass[:, None].clamp(min=1e-30)).to(x.dtype), extra)
    return y, extra


def reduce_plan(
    tokens: VisualTokens,
    attention: torch.Tensor,
    order: torch.Tensor,
    kept: torch.Tensor,
    knn_k: int,
    merge: str,
    output_order: str,
    extra_token: bool,
    merge_chunk: int | None = None,
) -> Reduced:
    """Merge and assemble the right-padded output from a plan order [B, N] and kept counts [B].

    `attention` [B, N] is the CLS attention the merge weighs patches with (float32, finite).

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
    w = attention.to(x.dtype)  # [B, N]
    keys = tokens.signals[VIT_KEYS]  # [B, N, C]
    chunk = merge_chunk or (1 if x.device.type == "cpu" else b)
    out = x.new_zeros(b, m_out, d)  # [B, M, D]
    extras = []
    for s in range(0, b, chunk):  # over images (one pass when batched), never over tokens
        part = slice(s, s + chunk)
        y_part, extra_part = _merge(
            x[part], w[part], keys[part], order[part], kept[part], kept_host[part], knn_k, merge, with_extra
        )
        out[part, : y_part.shape[1]] = y_part
        extras.append(extra_part)
    slot = torch.arange(mmax, device=x.device)
    valid = slot[None] < kept[:, None]  # [B, Mmax]
    if chunk > 1:
        out[:, :mmax].masked_fill_(~valid[..., None], 0)  # filler rows of the shorter images
    centre_ids = order[:, :mmax]  # [B, Mmax]
    index = torch.where(valid, centre_ids, -1)  # [B, Mmax]
    if output_order == "spatial":
        resort = torch.where(valid, centre_ids, n + slot[None]).argsort(dim=1)  # [B, Mmax]
        out = torch.cat([gather_tokens(out[:, :mmax], resort), out[:, mmax:]], dim=1)  # [B, M, D]
        index = index.gather(1, resort)
    if m_out > mmax:
        index = torch.cat([index, index.new_full((b, m_out - mmax), -1)], dim=1)  # [B, M]
    rows = [i for i, k in enumerate(kept_host) if with_extra and k < n]  # images with an extra token
    if rows:
        extra = torch.cat(extras) if len(extras) > 1 else extras[0]  # [B, D]
        picked = torch.tensor(rows, device=x.device)
        out[picked, kept[picked]] = extra[picked]
    return Reduced(features=out, index=index, lengths=lengths)
