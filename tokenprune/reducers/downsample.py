"""Downsampling: the patch grid resampled to a coarser grid, as if the image had a lower resolution.

The feature map [D, H, W] is resized to the largest rows x cols grid within the budget that keeps
the image's aspect ratio (the grid `pool` uses), with an image-resize filter: antialiased
bilinear (`mode="bilinear"`, the default, PIL's and torchvision's resize of an image) or bicubic.
It differs from `pool` (2-D average pooling, a box filter over disjoint cells) in its filter:
the triangle filter spans neighbouring cells and weights them by distance, so a token mixes its
cell's patches with a margin of the next cells'. `mode="area"` is exactly `pool`
(`adaptive_avg_pool2d`), kept so that the two can be compared in one sweep.

This is the *feature-space* form. The native form, re-encoding the image at a lower resolution,
is a model setting, not a reducer: Qwen2-VL / Qwen2.5-VL's `max_pixels` (docs/peers.md).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from tokenprune.reducers._ops import cell_centres, grid_shape, identity, resolve_budget
from tokenprune.types import Reduced, Space, VisualTokens

MODES = ("bilinear", "bicubic", "area")


class Downsample:
    """Resizes the patch grid to the largest aspect-preserving rows x cols grid <= the budget.

    Output tokens are synthetic (resampled); `index` names the patch at each output cell's centre,
    so position-aware adapters can place them.

    Args:
        keep: tokens per image (a count; rows * cols can be below it when it is not a product
            that fits the grid), or
        ratio: a fraction of N.
        mode: bilinear | bicubic (antialiased image-resize filters) | area (= `pool`).
    """

    space: ClassVar[Space] = "vision"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, keep: int | None = None, ratio: float | None = None, mode: str = "bilinear") -> None:
        resolve_budget(1 << 30, keep, ratio)
        if mode not in MODES:
            raise ValueError(f"downsample mode must be one of {MODES}, got {mode!r}")
        self.keep, self.ratio, self.mode = keep, ratio, mode

    def __call__(self, tokens: VisualTokens) -> Reduced:
        b, n, d = tokens.features.shape
        budget = resolve_budget(n, self.keep, self.ratio)
        if budget == n:
            return identity(tokens)
        (h, w), (rows, cols) = tokens.grid, grid_shape(budget, tokens.grid)
        plane = tokens.features.transpose(1, 2).reshape(b, d, h, w)  # [B, D, H, W]
        resized = resize(plane, (rows, cols), self.mode).flatten(2).transpose(1, 2)  # [B, rows*cols, D]
        device = tokens.features.device
        centre = (
            cell_centres(rows, h, device)[:, None] * w + cell_centres(cols, w, device)[None, :]
        ).flatten()
        lengths = torch.full((b,), rows * cols, device=device, dtype=torch.long)
        return Reduced(features=resized.contiguous(), index=centre.expand(b, -1), lengths=lengths)

    def flops(self, n: int, kept: int, width: int) -> int:
        """Each input patch is read once per output token whose filter covers it: ~4 N D for the filters here."""
        return 4 * n * width


def resize(plane: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """[B, D, H, W] -> [B, D, rows, cols] with an image-resize filter, computed in float32 and cast back.

    Args:
        plane: the feature map.
        size: (rows, cols).
        mode: bilinear | bicubic (antialiased, align_corners=False) | area (average pooling).
    """
    x = plane.float()
    if mode == "area":
        out = F.adaptive_avg_pool2d(x, size)
    else:
        out = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    return out.to(plane.dtype)
