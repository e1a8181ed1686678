"""DivPrune (Alvar et al., CVPR 2025): a max-min diverse subset of the projected visual tokens.

Written from the algorithm (the reference code, vbdi/divprune, is CC BY-NC; nothing is copied).
Semantics, as `notes/peers_vision.md` reads them from the reference:

* the tokens are the **projected** features (the LLM-input rows), so the reducer runs in
  `space="llm"`; the distance is d(i, j) = 1 - cos(x_i, x_j), from the row-normalised features
  (no eps);
* the first pick is the token whose nearest neighbour is farthest: the argmax over j of the
  second-smallest entry of column j (the smallest is j's own distance, ~0);
* each next pick is the argmax over j of min_{c chosen} d(c, j) (rows of the chosen tokens);
  argmax ties go to the lowest index;
* the budget is `keep`, or `int(round(ratio * N))` (Python's half-to-even rounding; the paper's
  0.098 gives 56 of 576);
* the output is sorted by patch index (the released code) or, with `sort=False`, in the greedy
  order (the order the paper's Table 1 used).

Deliberate deviations, each a field: `mask_chosen` (the reference leaves chosen tokens in the
argmax with their self-distance ~0, so it can pick a token twice when every remaining token
duplicates a chosen one; masking them never repeats a token and changes nothing otherwise). The
distances are computed in float32 whatever the input dtype (the reference: the model's fp16).

The greedy picks are inherently sequential: one loop step per kept token, each vectorised over
the batch and the N candidates (no loop over the batch).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tokenprune.reducers._ops import gather_tokens, identity, resolve_budget
from tokenprune.types import Reduced, Space, VisualTokens


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of every pair of rows, in float32 (rows normalised without eps).

    Args:
        features: [B, N, D].

    Returns:
        [B, N, N] float32.
    """
    x = features.detach().float()  # [B, N, D]
    unit = x / x.norm(dim=-1, keepdim=True)  # [B, N, D]
    return 1.0 - torch.matmul(unit, unit.transpose(1, 2))  # [B, N, N]


def max_min_diverse(distance: torch.Tensor, budget: int, mask_chosen: bool = True) -> torch.Tensor:
    """Greedy max-min diversity: `budget` token indices per sample, in pick order.

    Args:
        distance: [B, N, N] pairwise distances (row c, column j: d(c, j)).
        budget: picks per sample, 1 <= budget <= N.
        mask_chosen: exclude chosen tokens from later picks (False: the reference's unmasked argmax).

    Returns:
        [B, budget] long, the picks in greedy order.
    """
    b, n, _ = distance.shape
    nearest = distance.topk(2, dim=1, largest=False).values[:, 1]  # [B, N] column j's 2nd smallest
    first = nearest.argmax(dim=-1)  # [B]
    picks = [first]
    closest = distance.gather(1, first.view(b, 1, 1).expand(b, 1, n)).squeeze(1)  # [B, N] min over chosen
    taken = torch.zeros(b, n, dtype=torch.bool, device=distance.device)  # [B, N]
    for _ in range(1, budget):
        taken.scatter_(1, picks[-1].unsqueeze(1), True)
        score = closest.masked_fill(taken, float("-inf")) if mask_chosen else closest  # [B, N]
        pick = score.argmax(dim=-1)  # [B]
        picks.append(pick)
        row = distance.gather(1, pick.view(b, 1, 1).expand(b, 1, n)).squeeze(1)  # [B, N]
        closest = torch.minimum(closest, row)
    return torch.stack(picks, dim=1)  # [B, budget]


class DivPrune:
    """Keeps a max-min diverse subset of the projected visual tokens (same count for every image).

    Args:
        keep: tokens kept per image (a count), or
        ratio: a fraction of N, kept as int(round(ratio * N)) (the paper: 0.098 -> 56 of 576).
        sort: output in patch order (the released code) | False: the greedy pick order (the paper's Table 1).
        mask_chosen: never pick a token twice (see the module docstring; False: the reference's argmax).
    """

    space: ClassVar[Space] = "llm"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        keep: int | None = None,
        ratio: float | None = 0.098,
        sort: bool = True,
        mask_chosen: bool = True,
    ) -> None:
        if keep is not None and ratio is not None:
            ratio = None  # an explicit count wins over the default ratio
        resolve_budget(1 << 30, keep, ratio)  # validate early
        self.keep, self.ratio, self.sort, self.mask_chosen = keep, ratio, sort, mask_chosen

    def __call__(self, tokens: VisualTokens) -> Reduced:
        b, n, _ = tokens.features.shape
        budget = resolve_budget(n, self.keep, self.ratio)
        if budget == n:
            return identity(tokens)
        index = max_min_diverse(cosine_distance(tokens.features), budget, self.mask_chosen)  # [B, M]
        if self.sort:
            index = index.sort(dim=1).values
        lengths = torch.full((b,), budget, device=index.device, dtype=torch.long)
        return Reduced(features=gather_tokens(tokens.features, index), index=index, lengths=lengths)

    def flops(self, n: int, kept: int, width: int) -> int:
        """The pairwise cosine matrix (2 N^2 D) plus the greedy min updates (N per pick)."""
        return 2 * n * n * width + kept * n
