"""Helpers shared by the adapters whose images come in several grids (Qwen2-VL, LLaVA-OneVision).

A *view* is one patch grid the reducer sees as one sample: a Qwen frame group, a LLaVA-OneVision
base crop, high-resolution canvas or video frame. Views with the same grid are reduced together
in one batched reducer call (reducers are batch-invariant by default, so grouping does not change
what any view keeps); the results come back per view, in the original order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune.types import VIT_CLS_ATTN, VIT_KEYS, Reducer, Video, VisualTokens


@dataclass
class View:
    """One patch grid of one image or video, before reduction.

    Attributes:
        features: [N, D] one row per patch, raster order of `grid`.
        grid: (H, W) with H * W == N.
        signals: per-patch tensors ([N] or [N, C]) under the signal names of tokenprune.types.
    """

    features: torch.Tensor  # [N, D]
    grid: tuple[int, int]
    signals: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ReducedView:
    """A view after reduction.

    Attributes:
        features: [k, D] the kept (or merged) tokens.
        index: [k] long; the source patch of each token (-1: synthetic, e.g. PruMerge's extra token).
        unchanged: the reducer returned its input as is (the identity, e.g. `none` or a keep-all budget).
    """

    features: torch.Tensor  # [k, D]
    index: torch.Tensor  # [k]
    unchanged: bool


@dataclass
class SplicedInputs:
    """What the LLM receives after the splice (left-padded batch).

    Attributes:
        position_ids: [B, L] (1-D RoPE) or [4, B, L] (Qwen M-RoPE: text row, then t/h/w).
        visual_tokens: per sample, the visual placeholder tokens the LLM sees.
        labels: [B, L] answer token ids, -100 elsewhere (teacher forcing), or None.
    """

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor
    mm_encoder_outputs: dict[str, BaseModelOutputWithPooling]
    visual_tokens: list[int]
    labels: torch.Tensor | None = None  # [B, L]

    def as_kwargs(self) -> dict:
        kwargs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }
        if self.mm_encoder_outputs:
            kwargs["mm_encoder_outputs"] = self.mm_encoder_outputs
        if self.labels is not None:
            kwargs["labels"] = self.labels
        return kwargs


def reduce_views(reducer: Reducer, views: Sequence[View]) -> list[ReducedView]:
    """Run `reducer` over `views`, one batched call per distinct grid; results in the views' order.

    Raises:
        ValueError: the reducer requires a signal these views do not carry (e.g. an LLM-input signal,
            which only the LLaVA adapter computes so far).
    """
    available = set(views[0].signals) if views else set()
    missing = sorted(set(reducer.requires) - available)
    if missing:
        raise ValueError(
            f"{type(reducer).__name__} requires signals {missing} that this adapter does not compute "
            f"(it computes {sorted({VIT_CLS_ATTN, VIT_KEYS})}; LLM-input signals such as llm_text_attn "
            "are computed by the LLaVA adapter only so far)"
        )
    groups: dict[tuple[int, int], list[int]] = {}
    for i, view in enumerate(views):
        groups.setdefault(view.grid, []).append(i)
    out: list[ReducedView | None] = [None] * len(views)
    for grid, members in groups.items():
        names = sorted(views[members[0]].signals)
        features = torch.stack([views[i].features for i in members])  # [V, N, D]
        signals = {name: torch.stack([views[i].signals[name] for i in members]) for name in names}
        tokens = VisualTokens(features=features, grid=grid, signals=signals)
        reduced = reducer(tokens)
        unchanged = reduced.features is tokens.features
        for row, (i, n) in enumerate(zip(members, reduced.lengths.tolist())):
            out[i] = ReducedView(reduced.features[row, :n], reduced.index[row, :n], unchanged)
    return out  # type: ignore[return-value]


def video_frames(
    video: Video | Sequence[Image.Image] | np.ndarray | torch.Tensor,
) -> tuple[list[Image.Image], float | None]:
    """A video input as RGB PIL frames and its fps (None when not given).

    Accepts a `Video`, a list of frames (PIL images or [H, W, 3] uint8 arrays), or a [T, H, W, 3]
    uint8 array / tensor.
    """
    fps = None
    if isinstance(video, Video):
        video, fps = video.frames, video.fps
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"a video array must be [T, H, W, 3], got shape {video.shape}")
        frames = [Image.fromarray(np.ascontiguousarray(frame).astype(np.uint8)) for frame in video]
    else:
        frames = [
            Image.fromarray(np.asarray(frame).astype(np.uint8))
            if not isinstance(frame, Image.Image)
            else frame.convert("RGB")
            for frame in video
        ]
    if not frames:
        raise ValueError("a video needs at least one frame")
    return frames, fps


def left_pad(rows: Sequence[Sequence[int]], fill: int, device: torch.device) -> torch.Tensor:
    """Left-pad integer rows to the longest one -> [B, L]."""
    width = max(len(r) for r in rows)
    return torch.tensor([[fill] * (width - len(r)) + list(r) for r in rows], device=device)
