"""Content-blind baselines: no reduction, random, uniform grid sampling and average pooling.

Each keeps the same number of tokens for every image, chosen by `keep` (a count) or `ratio`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from tokenprune.reducers._ops import (
    cell_centres,
    grid_shape,
    identity,
    keep_same_for_all,
    resolve_budget,
)
from tokenprune.types import Reduced, Space, VisualTokens


class NoReduction:
    """The identity: every visual token goes to the LLM (the unreduced model)."""

    space: ClassVar[Space] = "vision"
    requires: ClassVar[tuple[str, ...]] = ()

    def __call__(self, tokens: VisualTokens) -> Reduced:
        return identity(tokens)

    def flops(self, n: int, kept: int, width: int) -> int:
        """Index selection: no arithmetic."""
        return 0


class RandomPrune:
    """Keeps a seeded random subset of patches, in raster order.

    The subset depends only on (seed, N, budget), so every image of a run keeps the same
    patches and a batch reduces exactly as its samples do alone.
    """

    space: ClassVar[Space] = "vision"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, keep: int | None = None, ratio: float | None = None, seed: int = 0) -> None:
        resolve_budget(1 << 30, keep, ratio)  # validate early
        self.keep, self.ratio, self.seed = keep, ratio, seed
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, tokens: VisualTokens) -> Reduced:
        n = tokens.features.shape[1]
        budget = resolve_budget(n, self.keep, self.ratio)
        if budget == n:
            return identity(tokens)
        if (n, budget) not in self._cache:
            generator = torch.Generator().manual_seed(self.seed)
            self._cache[(n, budget)] = torch.randperm(n, generator=generator)[:budget].sort().values
        return keep_same_for_all(tokens, self._cache[(n, budget)])

    def flops(self, n: int, kept: int, width: int) -> int:
        """Index selection: no arithmetic."""
        return 0


class UniformSample:
    """Keeps patches on a regular 2-D grid (cell centres), exactly `budget` of them.

    The grid is the largest rows x cols <= budget that follows the image's aspect ratio; the
    remaining budget - rows*cols tokens are spread evenly (raster order) over the patches the grid
    missed. Output is in raster order.
    """

    space: ClassVar[Space] = "vision"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, keep: int | None = None, ratio: float | None = None) -> None:
        resolve_budget(1 << 30, keep, ratio)
        self.keep, self.ratio = keep, ratio

    def __call__(self, tokens: VisualTokens) -> Reduced:
        n = tokens.features.shape[1]
        budget = resolve_budget(n, self.keep, self.ratio)
        if budget == n:
            return identity(tokens)
        return keep_same_for_all(tokens, uniform_indices(budget, tokens.grid))

    def flops(self, n: int, kept: int, width: int) -> int:
        """Index selection: no arithmetic."""
        return 0


def uniform_indices(budget: int, grid: tuple[int, int]) -> torch.Tensor:
    """`budget` raster indices on an even 2-D grid over `grid`, sorted ascending."""
    h, w = grid
    rows, cols = grid_shape(budget, grid)
    on_grid = (cell_centres(rows, h)[:, None] * w + cell_centres(cols, w)[None, :]).flatten()  # [rows*cols]
    extra = budget - on_grid.numel()
    if extra:
        missed = torch.ones(h * w, dtype=torch.bool)
        missed[on_grid] = False
        rest = missed.nonzero().squeeze(1)
        on_grid = torch.cat([on_grid, rest[cell_centres(extra, rest.numel())]])
    return on_grid.sort().values


class AvgPool:
    """2-D average pooling of the patch grid down to the largest rows x cols grid <= budget.

    Output tokens are synthetic averages; `index` names the patch at each pooling cell's centre,
    so position-aware adapters can place them. Keeps rows*cols tokens, which can be below the
    budget when it is not a product that fits the grid.
    """

    space: ClassVar[Space] = "vision"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, keep: int | None = None, ratio: float | None = None) -> None:
        resolve_budget(1 << 30, keep, ratio)
        self.keep, self.ratio = keep, ratio

    def __call__(self, tokens: VisualTokens) -> Reduced:
        b, n, d = tokens.features.shape
        budget = resolve_budget(n, self.keep, self.ratio)
        if budget == n:
            return identity(tokens)
        (h, w), (rows, cols) = tokens.grid, grid_shape(budget, tokens.grid)
        plane = tokens.features.transpose(1, 2).reshape(b, d, h, w)  # [B, D, H, W]
        pooled = F.adaptive_avg_pool2d(plane, (rows, cols)).flatten(2).transpose(1, 2)  # [B, rows*cols, D]
        device = tokens.features.device
        centre = (
            cell_centres(rows, h, device)[:, None] * w + cell_centres(cols, w, device)[None, :]
        ).flatten()
        index = centre.expand(b, -1)  # [B, rows*cols]
        lengths = torch.full((b,), rows * cols, device=device, dtype=torch.long)
        return Reduced(features=pooled, index=index, lengths=lengths)

    def flops(self, n: int, kept: int, width: int) -> int:
        """One add per patch and channel (the pooling windows cover the grid once)."""
        return n * width
