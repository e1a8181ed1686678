"""The few data types shared across layers: what a reducer receives and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

Space = Literal["vision", "llm"]

# Signal names used across the project (DESIGN §3). Adapters compute them; reducers ask for them
# through their `requires` attribute.
VIT_CLS_ATTN = "vit_cls_attn"  # [B, N] CLS→patch attention (PruMerge definition, see models/signals.py)
VIT_KEYS = "vit_keys"  # [B, N, C] patch keys of the attention layer that produced vit_cls_attn
# The feature layer's own signals (the layer whose output feeds the projector; LLaVA-1.5:
# vision_feature_layer = -2), for VisionZip and VisPruner (docs/peers.md):
# [B, H, N] per-head attention of the CLS query to each patch in that layer (softmax over all N+1
# keys, scale head_dim^-1/2); towers without a CLS token give the per-head mean attention each
# patch receives (the substitute of models/signals.py)
VIT_CLS_ATTN_HEADS = "vit_cls_attn_heads"
# [B, N, C] that layer's patch keys (k_proj of its layer_norm1 input, bias included), heads
# concatenated: viewed as [B, N, H, C / H] with H from vit_cls_attn_heads
VIT_FEAT_KEYS = "vit_feat_keys"
# [B, D] the CLS row of the feature layer's output, in the features' space; [B, 0] for a tower
# without a CLS token
VIT_CLS_FEATURE = "vit_cls_feature"
FEATURE_LAYER_SIGNALS = (VIT_CLS_ATTN_HEADS, VIT_FEAT_KEYS, VIT_CLS_FEATURE)
# [B, N] layer-0 LLM attention from the text after the image to each visual token (rows and heads
# averaged); computed on the spliced, unreduced LLM input, so a reducer that asks for it runs there
LLM_TEXT_ATTN = "llm_text_attn"
# [B, N] GAE relevance of the answer for each visual token (explain_oracle; needs the answer)
RELEVANCE = "relevance"
LLM_SIGNALS = (LLM_TEXT_ATTN, RELEVANCE)  # signals computed on the LLM input, not the vision tower


@dataclass
class VisualTokens:
    """The visual tokens of a batch of images, before reduction.

    Attributes:
        features: [B, N, D] one row per patch, in raster order of `grid`.
        grid: (H, W) patch grid with H * W == N.
        signals: extra per-patch tensors a reducer may ask for (see the names above).
    """

    features: torch.Tensor  # [B, N, D]
    grid: tuple[int, int]
    signals: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.features.dim() != 3:
            raise ValueError(
                f"VisualTokens.features must be [B, N, D], got shape {tuple(self.features.shape)}"
            )
        h, w = self.grid
        if h * w != self.features.shape[1]:
            raise ValueError(f"grid {self.grid} does not match N={self.features.shape[1]} patches")


@dataclass
class Reduced:
    """The output of a reducer: a right-padded batch of variable-length token sets.

    Attributes:
        features: [B, M, D] reduced tokens; rows at or past `lengths[b]` are padding (zeros).
        index: [B, M] long; the source patch each token stands for, -1 for a synthetic token
            with no single source (e.g. PruMerge's extra token) and for padding.
        lengths: [B] long; the number of valid tokens per sample (M == lengths.max()).
    """

    features: torch.Tensor  # [B, M, D]
    index: torch.Tensor  # [B, M]
    lengths: torch.Tensor  # [B]

    def unpad(self) -> list[torch.Tensor]:
        """Per-sample valid tokens, each [lengths[b], D] (one host sync for the lengths)."""
        return [f[:n] for f, n in zip(self.features, self.lengths.tolist())]


@dataclass
class Video:
    """A video as its sampled frames, for adapters that take video input (Qwen2-VL, LLaVA-OneVision).

    Attributes:
        frames: the frames in temporal order: a list of PIL images, or a [T, H, W, 3] uint8 array or tensor.
        fps: frames per second of the *sampled* frames (None: the adapter's default); Qwen2.5-VL
            spaces its temporal positions by it.
    """

    frames: Any
    fps: float | None = None


@runtime_checkable
class Reducer(Protocol):
    """A visual-token reduction method: pure tensor code, no hooks, no I/O.

    `space` says where the adapter applies it: "vision" (on vision-tower features, before the
    projector) or "llm" (on projected features). `requires` names the signals it reads.
    """

    space: ClassVar[Space]
    requires: ClassVar[tuple[str, ...]]

    def __call__(self, tokens: VisualTokens) -> Reduced: ...
