"""`keep_by_signal`: inside the LLM, after decoder layer K, keep the visual tokens a signal ranks highest.

With `signal=llm_layer_last_attn` and one layer this is the core of FastV (the attention the last
prompt token pays each visual token in layer K-1, heads averaged); with several `layers` and
`keep` fractions of the original count it is a PyramidDrop-style schedule (with
`signal=llm_layer_next_last_attn`, PDrop's next-layer score). It is the simple reference reducer
of the reduction point inside the LLM (`tokenprune.models.layered`); the published methods with
their references' count and position rules subclass it (`reducers/fastv.py`, `reducers/pdrop.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from tokenprune.reducers._ops import gather_tokens
from tokenprune.types import (
    LLM_LAYER_LAST_ATTN,
    LLM_LAYER_NEXT_LAST_ATTN,
    LLM_LAYER_TEXT_ATTN,
    LayerTokens,
    Positions,
    Reduced,
    Space,
)

SCORES = (LLM_LAYER_LAST_ATTN, LLM_LAYER_TEXT_ATTN, LLM_LAYER_NEXT_LAST_ATTN)


class KeepBySignal:
    """Top-k visual tokens by a [B, N] signal after each layer of a schedule, in sequence order.

    Args:
        layers: K, or a strictly increasing list of K's (a cut after each).
        keep: per cut, a fraction in (0, 1] of each sample's *original* visual count (int(N0 * r),
            at least 1, as PyramidDrop counts), or an int count (at most the current count); one
            value applies to every cut.
        signal: the ranking signal (`types.LLM_LAYER_*`, [B, N]).
        positions: "gather" (kept tokens keep their RoPE positions, FastV / DART) or "renumber"
            (PyramidDrop / SparseVLM v1.5; 1-D RoPE models only).

    Ties go to the earlier token. Batch-invariant: each sample is ranked alone.
    """

    space: ClassVar[Space] = "llm_layer"

    def __init__(
        self,
        layers: int | Sequence[int] = 2,
        keep: float | int | Sequence[float | int] = 0.5,
        signal: str = LLM_LAYER_LAST_ATTN,
        positions: Positions = "gather",
    ) -> None:
        self.layers = (int(layers),) if isinstance(layers, int) else tuple(int(k) for k in layers)
        schedule = list(keep) if isinstance(keep, Sequence) else [keep] * len(self.layers)
        if len(schedule) != len(self.layers):
            raise ValueError(f"keep has {len(schedule)} entries for {len(self.layers)} layers {self.layers}")
        for value in schedule:
            if isinstance(value, float) and not 0.0 < value <= 1.0:
                raise ValueError(f"a keep fraction must be in (0, 1], got {value}")
            if isinstance(value, int) and value < 1:
                raise ValueError(f"a keep count must be >= 1, got {value}")
        if signal not in SCORES:
            raise ValueError(f"signal must be one of {SCORES} (a [B, N] score), got {signal!r}")
        if positions not in ("gather", "renumber"):
            raise ValueError(f"positions must be gather or renumber, got {positions!r}")
        self.keep = schedule
        self.signal = signal
        self.requires = (signal,)
        self.positions = positions

    def budget(self, tokens: LayerTokens) -> torch.Tensor:
        """[B] long: how many tokens each sample keeps at this cut."""
        value = self.keep[tokens.stage]
        if isinstance(value, float):
            wanted = (tokens.original.double() * value).floor().long().clamp(min=1)
        else:
            wanted = torch.full_like(tokens.lengths, value)
        return torch.minimum(wanted, tokens.lengths)

    def __call__(self, tokens: LayerTokens) -> Reduced:
        scores = tokens.signals[self.signal].float()  # [B, N]
        b, n = scores.shape
        slot = torch.arange(n, device=scores.device)
        present = slot[None] < tokens.lengths[:, None]  # [B, N]
        order = torch.argsort(
            scores.masked_fill(~present, float("-inf")), dim=-1, descending=True, stable=True
        )
        rank = torch.empty_like(order)
        rank.scatter_(1, order, slot.expand(b, n))  # rank of each token in its sample
        kept = self.budget(tokens)  # [B]
        chosen = (rank < kept[:, None]) & present  # [B, N]
        width = int(kept.max()) if b else 0
        # each sample's chosen slots in ascending order, right-padded with 0 (masked by lengths)
        position = torch.where(chosen, slot[None], n).sort(dim=-1).values[:, :width]  # [B, M]
        index = torch.where(position < n, position, 0)
        features = gather_tokens(tokens.features, index) * (position < n)[..., None]
        return Reduced(features=features, index=torch.where(position < n, index, -1), lengths=kept)
