"""PyramidDrop (Xing et al., CVPR 2025; Cooperx521/PyramidDrop): progressive cuts at the input of several
decoder layers, each ranking the current visual tokens by what the *next* layer would attend to.

At a cut before layer K_s the score is layer K_s's input norm, q and k applied to layer K_s - 1's output,
the last prompt token's row, softmax over its causal keys, heads averaged (`llm_layer_next_last_attn`);
the top int(N0 r_s) tokens stay, r_s a fraction of the *original* count N0 (default r_s = lambda^(s+1):
576 -> 288 -> 144 -> 72 with layers [8, 16, 24], lambda = 0.5). Positions are renumbered (the reference).
In training (labels given) the row is the last instruction token, the one before the first labelled
token, as the reference's training score. The selection is `KeepBySignal`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenprune.reducers.keep_by_signal import KeepBySignal
from tokenprune.types import LLM_LAYER_NEXT_LAST_ATTN, Positions


class PDrop(KeepBySignal):
    """PyramidDrop's schedule (docs/peers.md, "PDrop").

    Args:
        layers: the reference's `layer_list` (cuts at the input of these layers; [8, 16, 24] of 32).
        ratio: lambda, each stage keeps lambda times the previous stage's share of N0.
        keep: an explicit schedule instead of `ratio`: per cut a fraction of N0 (int(N0 r)) or a count.
        positions: "renumber" (the reference) or "gather".
    """

    def __init__(
        self,
        layers: Sequence[int] = (8, 16, 24),
        ratio: float | None = 0.5,
        keep: Sequence[float | int] | None = None,
        positions: Positions = "renumber",
    ) -> None:
        layers = [int(k) for k in layers]
        if (ratio is None) == (keep is None):
            raise ValueError(
                f"PDrop: give exactly one of ratio (lambda) or keep (a schedule); got ratio={ratio}, keep={keep}"
            )
        if ratio is not None:
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"PDrop: ratio (lambda) must be in (0, 1], got {ratio}")
            keep = [float(ratio) ** (s + 1) for s in range(len(layers))]
        super().__init__(layers=layers, keep=list(keep), signal=LLM_LAYER_NEXT_LAST_ATTN, positions=positions)
        self.ratio = ratio
