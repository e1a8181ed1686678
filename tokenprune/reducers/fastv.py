"""FastV (Chen et al., ECCV 2024; pkunlp-icler/FastV): one cut at the input of decoder layer K, keeping
the visual tokens the last prompt token attends to most in layer K-1 (heads averaged).

The selection is `KeepBySignal`'s top-k on `llm_layer_last_attn`; FastV adds the reference's count
semantics: a drop ratio R (keep round(N0 (1 - R)) of the N0 visual tokens, as the HF port FV-hf
counts) or an absolute rank (`fast_v_attention_rank`, what the scripts pass: 64 / 128 / 192 in later
papers' tables, 288 = 576 (1 - 0.5)). Kept tokens keep their original positions (`gather`). The runner
prunes at prefill and caches only the kept tokens in layers >= K: the reference's KV-cache ("static")
variant; the in-place no-cache variant re-selects from each new last token (docs/peers.md).
"""

from __future__ import annotations

import torch

from tokenprune.reducers.keep_by_signal import KeepBySignal
from tokenprune.types import LLM_LAYER_LAST_ATTN, LayerTokens, Positions


class FastV(KeepBySignal):
    """FastV's cut (docs/peers.md, "FastV").

    Args:
        layer: K, the decoder layers run on every token (the score is layer K-1's attention).
        drop_ratio: R in [0, 1): keep round(N0 (1 - R)) of each sample's N0 visual tokens.
        rank: an absolute count of visual tokens to keep per sample (the scripts' rank); give
            exactly one of `drop_ratio` and `rank`.
        positions: "gather" (the reference: original positions) or "renumber" (1-D RoPE only).
    """

    def __init__(
        self,
        layer: int = 2,
        drop_ratio: float | None = 0.5,
        rank: int | None = None,
        positions: Positions = "gather",
    ) -> None:
        if (drop_ratio is None) == (rank is None):
            raise ValueError(
                f"FastV: give exactly one of drop_ratio (R, a fraction dropped) or rank (a count kept); "
                f"got drop_ratio={drop_ratio}, rank={rank}"
            )
        if drop_ratio is not None and not 0.0 <= drop_ratio < 1.0:
            raise ValueError(f"FastV: drop_ratio must be in [0, 1), got {drop_ratio}")
        keep = int(rank) if rank is not None else 1.0 - float(drop_ratio)
        super().__init__(layers=int(layer), keep=keep, signal=LLM_LAYER_LAST_ATTN, positions=positions)
        self.drop_ratio = drop_ratio
        self.rank = rank

    def budget(self, tokens: LayerTokens) -> torch.Tensor:
        """[B] long: `rank`, or round(N0 (1 - R)) (at least 1), at most the current count."""
        if self.rank is not None:
            return super().budget(tokens)
        wanted = (tokens.original.double() * (1.0 - self.drop_ratio)).round().long().clamp(min=1)
        return torch.minimum(wanted, tokens.lengths)
