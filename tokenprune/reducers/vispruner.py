"""VisPruner (Zhang et al., ICCV 2025): important tokens by CLS attention, then diverse tokens.

Semantics of the reference (Theia-4869/VisPruner, `llava/model/llava_arch.py` `encode_images` and
`clip_encoder.py` `feature_select`), implemented here in our own words and batched:

* the signal is the **feature layer's** CLS attention (LLaVA-1.5: layer -2, the layer whose output
  feeds the projector), per head, patch columns, averaged over heads (`vit_cls_attn_heads`);
* T = `keep` tokens per image: T_imp = int(T * important_ratio) important ones, T_div = T - T_imp
  diverse ones;
* **important**: the T_imp patches of highest attention; the others, in descending attention,
  form the residual list;
* **diverse**: duplicates are removed from the residual list in rounds until T_div remain. In a
  round, with R residual tokens and r = min(`step`, R - T_div): the list is split alternately into
  a (even positions) and b (odd positions); each a-token scores its highest cosine similarity to
  any b-token (the vision features, rows normalised without eps); the r highest-scoring a-tokens
  are dropped; the new list is the remaining a-tokens in descending score order, then every
  b-token in its order;
* the output is the important and diverse patches **in patch order** (the reference scatters them
  into a mask), each the unchanged feature of its patch.

Deliberate deviations: ties in the attention and similarity sorts go to the lower position
(`stable` sorts; the reference's CUDA argsort leaves them unspecified); the similarities run in
float32 (the reference: fp16); an odd R (a T_imp of the other parity than N) is handled (a has one
token more than b) where the reference fails on a shape mismatch. The rounds are a loop of
~(N - T) / step steps, each vectorised over the batch (all samples have the same R).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tokenprune.reducers._ops import gather_tokens, identity, resolve_budget
from tokenprune.types import VIT_CLS_ATTN_HEADS, Reduced, Space, VisualTokens


def remove_duplicates(unit: torch.Tensor, residual: torch.Tensor, target: int, step: int) -> torch.Tensor:
    """VisPruner's iterative duplicate removal: residual [B, R] -> [B, target] indices (list order kept).

    Args:
        unit: [B, N, D] row-normalised features (float32).
        residual: [B, R] candidate patch indices, in the order the rounds use.
        target: tokens left at the end (0 < target <= R).
        step: tokens dropped per round at most.
    """
    d = unit.shape[-1]
    while True:
        r = min(step, residual.shape[1] - target)
        if r <= 0:
            return residual
        a = torch.gather(unit, 1, residual[:, ::2].unsqueeze(-1).expand(-1, -1, d))  # [B, ceil(R/2), D]
        b = torch.gather(unit, 1, residual[:, 1::2].unsqueeze(-1).expand(-1, -1, d))  # [B, floor(R/2), D]
        scores = torch.matmul(a, b.transpose(1, 2)).amax(dim=-1)  # [B, ceil(R/2)]
        order = scores.argsort(dim=-1, descending=True, stable=True)[:, r:]  # [B, ceil(R/2) - r]
        residual = torch.cat([torch.gather(residual[:, ::2], 1, order), residual[:, 1::2]], dim=1)


class VisPruner:
    """Important (CLS attention) plus diverse (duplicate-removed) patches, `keep` per image.

    Args:
        keep: tokens per image (paper: 64 / 128 / 192), or
        ratio: a fraction of N.
        important_ratio: share of the budget chosen by attention, T_imp = int(keep * important_ratio)
            (reference default 0.5; its scripts take it per benchmark, e.g. 0.75 for MME at 64).
        step: duplicates removed per round at most (reference: 8).
    """

    space: ClassVar[Space] = "vision"
    requires: ClassVar[tuple[str, ...]] = (VIT_CLS_ATTN_HEADS,)

    def __init__(
        self,
        keep: int | None = 64,
        ratio: float | None = None,
        important_ratio: float = 0.5,
        step: int = 8,
    ) -> None:
        resolve_budget(1 << 30, keep, ratio)
        if not 0.0 <= important_ratio <= 1.0:
            raise ValueError(f"important_ratio must be in [0, 1], got {important_ratio}")
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        self.keep, self.ratio, self.important_ratio, self.step = keep, ratio, important_ratio, step

    def __call__(self, tokens: VisualTokens) -> Reduced:
        features = tokens.features  # [B, N, D]
        b, n, _ = features.shape
        budget = resolve_budget(n, self.keep, self.ratio)
        if budget == n:
            return identity(tokens)
        important = int(budget * self.important_ratio)
        score = tokens.signals[VIT_CLS_ATTN_HEADS].float().mean(dim=1)  # [B, N] head mean
        ranked = score.argsort(dim=-1, descending=True, stable=True)  # [B, N]
        chosen = ranked[:, :important]  # [B, T_imp]
        if budget > important:
            x = features.detach().float()
            unit = x / x.norm(dim=-1, keepdim=True)  # [B, N, D]
            diverse = remove_duplicates(unit, ranked[:, important:], budget - important, self.step)
            chosen = torch.cat([chosen, diverse], dim=1)  # [B, T]
        index = chosen.sort(dim=1).values  # [B, T] patch order
        lengths = torch.full((b,), budget, device=features.device, dtype=torch.long)
        return Reduced(features=gather_tokens(features, index), index=index, lengths=lengths)

    def flops(self, n: int, kept: int, width: int) -> int:
        """Each round compares ceil(R/2) x floor(R/2) normalised features: ~ sum_R R^2 D / 2 over the rounds."""
        total, r = 0, n - int(kept * self.important_ratio)
        target = kept - int(kept * self.important_ratio)
        while r > target:
            total += 2 * ((r + 1) // 2) * (r // 2) * width
            r -= min(self.step, r - target)
        return total + n * width
