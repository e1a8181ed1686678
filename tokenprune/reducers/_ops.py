"""Pure tensor helpers shared by reducers (no model knowledge, no I/O)."""

from __future__ import annotations

import math

import torch

from tokenprune.types import Reduced, VisualTokens


def resolve_budget(n: int, keep: int | None, ratio: float | None) -> int:
    """The number of tokens to keep out of `n`, from exactly one of `keep` (a count) or `ratio`.

    A budget at or above `n` means keep everything.
    """
    if (keep is None) == (ratio is None):
        raise ValueError(
            f"give exactly one of keep= (a count) or ratio= (a fraction); got keep={keep}, ratio={ratio}"
        )
    if keep is not None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        return min(int(keep), n)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return min(n, max(1, round(ratio * n)))


def grid_shape(budget: int, grid: tuple[int, int], max_skew: float = 1.5) -> tuple[int, int]:
    """The (rows, cols) sub-grid with the most cells <= budget whose aspect ratio is within a factor
    `max_skew` of the grid's (ties: the closest aspect ratio)."""
    h, w = grid
    if budget >= h * w:
        return h, w
    candidates = []
    for rows in range(1, h + 1):
        cols = min(w, budget // rows)
        if cols >= 1:
            skew = abs(math.log((rows / cols) / (h / w)))
            candidates.append((skew <= math.log(max_skew), rows * cols, -skew, rows, cols))
    best = max(candidates)
    return best[3], best[4]


def cell_centres(cells: int, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Indices in [0, size) of the centres of `cells` equal cells covering `size` positions."""
    return ((torch.arange(cells, device=device, dtype=torch.float64) + 0.5) * size / cells).floor().long()


def identity(tokens: VisualTokens) -> Reduced:
    """Every token, unchanged, with its own index."""
    b, n, _ = tokens.features.shape
    device = tokens.features.device
    index = torch.arange(n, device=device).expand(b, n)  # [B, N]
    lengths = torch.full((b,), n, device=device, dtype=torch.long)
    return Reduced(features=tokens.features, index=index, lengths=lengths)


def gather_tokens(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """features [B, N, D] gathered at index [B, M] (all valid) -> [B, M, D]."""
    return torch.gather(features, 1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def keep_same_for_all(tokens: VisualTokens, keep: torch.Tensor) -> Reduced:
    """Keep the same patch indices `keep` [M] for every sample of the batch."""
    b = tokens.features.shape[0]
    index = keep.to(tokens.features.device).expand(b, -1)  # [B, M]
    lengths = torch.full((b,), index.shape[1], device=index.device, dtype=torch.long)
    return Reduced(features=gather_tokens(tokens.features, index), index=index, lengths=lengths)
