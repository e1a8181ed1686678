"""DART (Wen et al., EMNLP 2025; ZichenWen1/DART): one cut at the input of decoder layer K that keeps
a few pivot tokens and, per pivot, the visual tokens *least* similar to it (duplicates go).

From layer K-1 (signals `llm_layer_keys`, `llm_layer_text_keys`, `llm_layer_normed`, ...; no attention
is read): the `image_pivots` visual tokens and `text_pivots` text tokens with the largest L1 norm of
their key are pivots. The pool is the visual tokens that are not pivots. For each pivot in turn, the
`per_pivot` pool tokens with the lowest cosine similarity to it (on the final-normed outputs) are kept
and leave the pool. Kept: the visual pivots and every pick (text pivots only guide), in sequence order,
with their original positions. Count: t = floor(B / P) per pivot for the P pivots, B = `budget` (the
reference's `max_num_trunction`) or floor(N0 (1 - `reduction_ratio`)) -> image_pivots + P t visual tokens
(B + 4 with the defaults: the reference); `count="exact"` keeps B (the picks B - image_pivots spread
over the pivots, the first ones one more). docs/peers.md lists every deviation.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenprune.reducers._ops import gather_tokens
from tokenprune.types import (
    LLM_LAYER_KEYS,
    LLM_LAYER_NORMED,
    LLM_LAYER_TEXT_KEYS,
    LLM_LAYER_TEXT_LENGTHS,
    LLM_LAYER_TEXT_NORMED,
    LayerTokens,
    Positions,
    Reduced,
    Space,
)


def _top(scores: torch.Tensor, present: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[B, N] bool: per sample the `counts[b]` highest-scoring present entries (ties: the earlier)."""
    b, n = scores.shape
    order = torch.argsort(scores.masked_fill(~present, float("-inf")), dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=scores.device).expand(b, n))
    return (rank < counts[:, None]) & present


class DART:
    """DART's duplication-aware cut (docs/peers.md, "DART").

    Args:
        layer: K (signals from layer K-1; the reference: 2).
        budget: B, the reference's `max_num_trunction` (128; 64 / 192 for the other budgets), or None
            to use `reduction_ratio`.
        reduction_ratio: with `budget` None, B = floor(N0 (1 - ratio)) of each sample's N0 tokens.
        image_pivots, text_pivots: pivot counts (4 + 4).
        count: "reference" (t = floor(B / P) picks per pivot: image_pivots + P t = B + 4) or "exact" (B).
        pivot_order: the order the pivots pick in: "sequence" (visual pivots, then text pivots, each in
            sequence order) or "norm" (each group by descending key L1 norm).
        positions: "gather" (the reference) or "renumber".
    """

    space: ClassVar[Space] = "llm_layer"
    requires: ClassVar[tuple[str, ...]] = (
        LLM_LAYER_KEYS,
        LLM_LAYER_NORMED,
        LLM_LAYER_TEXT_KEYS,
        LLM_LAYER_TEXT_NORMED,
        LLM_LAYER_TEXT_LENGTHS,
    )

    def __init__(
        self,
        layer: int = 2,
        budget: int | None = 128,
        reduction_ratio: float | None = None,
        image_pivots: int = 4,
        text_pivots: int = 4,
        count: Literal["reference", "exact"] = "reference",
        pivot_order: Literal["sequence", "norm"] = "sequence",
        positions: Positions = "gather",
    ) -> None:
        if (budget is None) == (reduction_ratio is None):
            raise ValueError(
                f"DART: give exactly one of budget (B, max_num_trunction) or reduction_ratio; "
                f"got budget={budget}, reduction_ratio={reduction_ratio}"
            )
        if budget is not None and budget < 1:
            raise ValueError(f"DART: budget must be >= 1, got {budget}")
        if reduction_ratio is not None and not 0.0 <= reduction_ratio < 1.0:
            raise ValueError(f"DART: reduction_ratio must be in [0, 1), got {reduction_ratio}")
        if image_pivots < 1 or text_pivots < 0:
            raise ValueError(
                f"DART: need image_pivots >= 1 and text_pivots >= 0, got {image_pivots}, {text_pivots}"
            )
        if count not in ("reference", "exact"):
            raise ValueError(f"DART: count must be reference or exact, got {count!r}")
        if pivot_order not in ("sequence", "norm"):
            raise ValueError(f"DART: pivot_order must be sequence or norm, got {pivot_order!r}")
        if positions not in ("gather", "renumber"):
            raise ValueError(f"positions must be gather or renumber, got {positions!r}")
        self.layers = (int(layer),)
        self.budget = budget
        self.reduction_ratio = reduction_ratio
        self.image_pivots = int(image_pivots)
        self.text_pivots = int(text_pivots)
        self.count = count
        self.pivot_order = pivot_order
        self.positions = positions

    def picks(self, tokens: LayerTokens) -> torch.Tensor:
        """[B, P] long: how many pool tokens each pivot picks (P = image_pivots + text_pivots)."""
        pivots = self.image_pivots + self.text_pivots
        if self.budget is not None:
            budget = torch.full_like(tokens.original, int(self.budget))
        else:
            budget = (tokens.original.double() * (1.0 - self.reduction_ratio)).floor().long()
        if self.count == "reference":
            return (budget // pivots)[:, None].expand(-1, pivots)
        extra = (budget - self.image_pivots).clamp(min=0)  # [B]
        slot = torch.arange(pivots, device=budget.device)
        return extra[:, None] // pivots + (slot[None] < (extra % pivots)[:, None]).long()

    def _pivots(
        self, norms: torch.Tensor, present: torch.Tensor, count: int, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen [B, N] bool, pivot vectors [B, count, D], pivot present [B, count]) in pivot order."""
        b, n = norms.shape
        if n == 0:  # no token of this kind in the whole batch
            return present, features.new_zeros(b, count, features.shape[-1]), present.new_zeros(b, count)
        chosen = _top(norms, present, torch.full((b,), count, dtype=torch.long, device=norms.device))
        if self.pivot_order == "sequence":
            ranked = torch.where(chosen, torch.arange(n, device=norms.device)[None].double(), float("inf"))
            order = ranked.argsort(dim=-1, stable=True)
        else:
            order = norms.masked_fill(~chosen, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        order = torch.cat([order, order.new_zeros(b, max(0, count - n))], dim=-1)[:, :count]  # [B, count]
        valid = chosen.gather(1, order) & (torch.arange(count, device=norms.device)[None] < n)
        return chosen, gather_tokens(features, order), valid

    def __call__(self, tokens: LayerTokens) -> Reduced:
        signals = tokens.signals
        normed = signals[LLM_LAYER_NORMED].float()  # [B, N, D]
        b, n, _ = normed.shape
        slot = torch.arange(n, device=normed.device)
        present = slot[None] < tokens.lengths[:, None]  # [B, N]
        text_lengths = signals[LLM_LAYER_TEXT_LENGTHS]
        text_present = (
            torch.arange(signals[LLM_LAYER_TEXT_KEYS].shape[1], device=normed.device)[None]
            < text_lengths[:, None]
        )
        image_norms = signals[LLM_LAYER_KEYS].float().abs().sum(-1)  # [B, N] key L1 norms
        text_norms = signals[LLM_LAYER_TEXT_KEYS].float().abs().sum(-1)  # [B, T]
        kept, image_vectors, image_valid = self._pivots(image_norms, present, self.image_pivots, normed)
        _, text_vectors, text_valid = self._pivots(
            text_norms, text_present, self.text_pivots, signals[LLM_LAYER_TEXT_NORMED].float()
        )
        vectors = torch.cat([image_vectors, text_vectors], dim=1)  # [B, P, D]
        valid = torch.cat([image_valid, text_valid], dim=1)  # [B, P]
        picks = self.picks(tokens) * valid  # [B, P]; a missing pivot picks nothing
        pool = present & ~kept
        for p in range(vectors.shape[1]):
            similarity = torch.nn.functional.cosine_similarity(vectors[:, p, None], normed, dim=-1)  # [B, N]
            chosen = _top(-similarity, pool, picks[:, p])
            kept |= chosen
            pool &= ~chosen
        lengths = kept.sum(-1)  # [B]
        width = int(lengths.max()) if b else 0
        position = torch.where(kept, slot[None], n).sort(dim=-1).values[:, :width]  # [B, M] ascending
        real = position < n
        index = torch.where(real, position, 0)
        features = gather_tokens(tokens.features, index) * real[..., None]
        return Reduced(features=features, index=torch.where(real, index, -1), lengths=lengths)
