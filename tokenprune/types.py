"""The few data types shared across layers: what a reducer receives and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

Space = Literal["vision", "llm", "llm_layer"]
Positions = Literal["gather", "renumber"]

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

# Signals of the reduction point inside the LLM (`space="llm_layer"`, a cut after decoder layer K, i.e.
# the first K layers, indices 0..K-1, saw every token). All are attention probabilities recomputed in
# float32 from a decoder layer's own input norm, q/k projections and rotary embedding (1-D RoPE or
# M-RoPE at the positions that layer used) for the rows needed, whatever backend the LLM runs; a row's
# softmax runs over every key it may attend to (causal, left padding excluded), then the sample's
# visual columns (its current visual tokens, in sequence order) are taken: [B, N] right-padded with 0
# past the sample's count (or [B, H, N] per query head; grouped-query attention reads key head
# h // (H / H_kv) as transformers' `repeat_kv`).
#   last-token: the row of the sequence's last prompt token (the token that predicts the answer).
#   text: the mean over the rows of every real, non-visual token after the sample's first visual
#     token and before its first labelled (answer) token.
#   layer K-1 (the last layer that saw every token, FastV's score) unless named "next": layer K's
#     q/k applied to layer K-1's output (PyramidDrop's score: what the next layer would attend).
LLM_LAYER_LAST_ATTN = "llm_layer_last_attn"  # [B, N] layer K-1, last-token row, heads averaged
LLM_LAYER_LAST_ATTN_HEADS = "llm_layer_last_attn_heads"  # [B, H, N] layer K-1, last-token row, per head
LLM_LAYER_TEXT_ATTN = "llm_layer_text_attn"  # [B, N] layer K-1, text rows averaged, heads averaged
LLM_LAYER_NEXT_LAST_ATTN = (
    "llm_layer_next_last_attn"  # [B, N] layer K on K-1's output, last-token row, heads averaged
)
# Token signals of layer K-1 (DART's, `reducers/dart.py`; no attention is read). "Keys": the layer's keys
# recomputed in float32 as above (input norm, k_proj, rotary embedding at the positions it used: post-
# RoPE), each of the H_kv key heads repeated H / H_kv times as `repeat_kv` does, the H heads concatenated:
# [.., H * d]. "Normed": the layer's output (the hidden states the cut receives, `LayerTokens.features`)
# through the LLM's final norm (the norm before the LM head), float32. Visual tokens: [B, N, .] in
# sequence order, zero past `lengths`; text tokens: the `text` rows above (real, non-visual, after the
# first visual token, before the first labelled token) in sequence order, [B, T, .] zero past
# `llm_layer_text_lengths`.
LLM_LAYER_KEYS = "llm_layer_keys"  # [B, N, H * d] visual tokens' keys
LLM_LAYER_NORMED = "llm_layer_normed"  # [B, N, D] visual tokens' output through the final norm
LLM_LAYER_TEXT_KEYS = "llm_layer_text_keys"  # [B, T, H * d] text tokens' keys
LLM_LAYER_TEXT_NORMED = "llm_layer_text_normed"  # [B, T, D] text tokens' output through the final norm
LLM_LAYER_TEXT_LENGTHS = "llm_layer_text_lengths"  # [B] long, each sample's text token count T_b
LLM_LAYER_TOKEN_SIGNALS = (
    LLM_LAYER_KEYS,
    LLM_LAYER_NORMED,
    LLM_LAYER_TEXT_KEYS,
    LLM_LAYER_TEXT_NORMED,
    LLM_LAYER_TEXT_LENGTHS,
)
# SparseVLM's text raters (docs/peers.md): computed once per prefill on the LLM input embeddings, per
# sample, from its visual rows V and its text rows T (the rows `llm_layer_text_attn` averages): the
# softmax over the text axis of the raw dot products V·Tᵀ, averaged over the visual rows, gives each
# text token a score s_j; the raters are the text tokens with s_j above the mean of s. The rater
# signals are layer K-1's attention from the rater rows (heads averaged) to the current visual tokens.
# A reducer attribute `signal_precision = "float16"` makes the runner emulate the reference's
# half-precision eager attention for them (logits, probabilities and the means rounded to fp16);
# the default "float32" computes them in float32 like the other signals.
LLM_LAYER_RATER_ATTN = "llm_layer_rater_attn"  # [B, N] layer K-1, rater rows averaged, heads averaged
LLM_LAYER_RATER_ATTN_ROWS = "llm_layer_rater_attn_rows"  # [B, R, N] per rater row (zero rows past its count)
RATER_SIGNALS = (LLM_LAYER_RATER_ATTN, LLM_LAYER_RATER_ATTN_ROWS)
LLM_LAYER_SIGNALS = (
    LLM_LAYER_LAST_ATTN,
    LLM_LAYER_LAST_ATTN_HEADS,
    LLM_LAYER_TEXT_ATTN,
    LLM_LAYER_NEXT_LAST_ATTN,
    *LLM_LAYER_TOKEN_SIGNALS,
    *RATER_SIGNALS,
)


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

    def require_finite(self) -> VisualTokens:
        """Self, after checking every floating-point signal is finite (one host sync per batch).

        Adapters call it before reducing: a NaN or inf in a signal (e.g. the CLS attention of a
        degenerate image) would otherwise silently change what the reducer keeps.

        Raises:
            NonFiniteSignal: naming the signal and the rows (images) affected.
        """
        for name, value in self.signals.items():
            if value.is_floating_point():
                bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(-1)  # [B]
                if bool(bad.any()):
                    rows = bad.nonzero().flatten().tolist()
                    raise NonFiniteSignal(
                        f"signal {name} has NaN/inf values (image rows {rows} of the batch)"
                    )
        return self


class NonFiniteSignal(ValueError):
    """A signal a reducer reads holds NaN or inf; the affected samples fail instead of being reduced."""


@dataclass
class Reduced:
    """The output of a reducer: a right-padded batch of variable-length token sets.

    Attributes:
        features: [B, M, D] reduced tokens; rows at or past `lengths[b]` are padding (zeros).
        index: [B, M] long; the source patch each token stands for, -1 for a synthetic token
            with no single source (e.g. PruMerge's extra token) and for padding.
        lengths: [B] long; the number of valid tokens per sample (M == lengths.max()).
        anchor: [B, M] long or None; inside the LLM, for each synthetic token, the current visual
            token whose (M-)RoPE position it takes under `positions="gather"` (ignored elsewhere).
    """

    features: torch.Tensor  # [B, M, D]
    index: torch.Tensor  # [B, M]
    lengths: torch.Tensor  # [B]
    anchor: torch.Tensor | None = None  # [B, M]

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


@dataclass
class LayerTokens:
    """What a reducer at the reduction point inside the LLM (`space="llm_layer"`) receives.

    Attributes:
        features: [B, N, D] the hidden states of each sample's current visual tokens after decoder
            layer `layer` (in sequence order; every image and video of the sample together), right-
            padded: rows at or past `lengths[b]` are zeros.
        lengths: [B] long; each sample's current visual token count.
        original: [B] long; each sample's visual token count at the LLM input (schedules relative to it).
        signals: the `LLM_LAYER_*` signals the reducer requires ([B, N] or [B, H, N], zero-padded).
        layer: K, the number of decoder layers that have run on these tokens.
        stage: the index of `layer` in the reducer's `layers`.
    """

    features: torch.Tensor  # [B, N, D]
    lengths: torch.Tensor  # [B]
    original: torch.Tensor  # [B]
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    layer: int = 0
    stage: int = 0


@runtime_checkable
class LayerReducer(Protocol):
    """A reducer inside the LLM: after each decoder layer in `layers` it returns which visual tokens stay.

    It returns a `Reduced` whose `index[b, :lengths[b]]` are positions among the sample's current
    visual tokens (0 .. N_b - 1), strictly ascending (the sequence keeps its order), optionally
    followed by synthetic tokens (-1, e.g. SparseVLM's recycled tokens; at most N_b tokens in all);
    `features` become those tokens' hidden states for the later layers (return the gathered input
    rows to prune, other values to modify them). Synthetic tokens enter the sequence right after
    the sample's last visual token (before the text that follows it), in the order returned, and
    are visual tokens (candidates) at later cuts. Every later layer and the KV cache hold only the
    kept and synthetic tokens. `positions`: "gather" keeps each token's original (M-)RoPE position
    (a synthetic token takes the position of its `Reduced.anchor`), "renumber" numbers the
    shortened sequence contiguously from the cut on (1-D RoPE only).
    """

    space: ClassVar[Space]
    requires: ClassVar[tuple[str, ...]]
    layers: tuple[int, ...]
    positions: Positions

    def __call__(self, tokens: LayerTokens) -> Reduced: ...


@runtime_checkable
class Reducer(Protocol):
    """A visual-token reduction method: pure tensor code, no hooks, no I/O.

    `space` says where the adapter applies it: "vision" (on vision-tower features, before the
    projector) or "llm" (on projected features); "llm_layer" reducers are `LayerReducer`s. `requires`
    names the signals it reads. `flops` is its own cost per image (the signals' cost is counted where
    the adapter computes them).
    """

    space: ClassVar[Space]
    requires: ClassVar[tuple[str, ...]]

    def __call__(self, tokens: VisualTokens) -> Reduced: ...

    def flops(self, n: int, kept: int, width: int) -> int:
        """FLOPs of reducing one image from `n` tokens of `width` to `kept` output tokens."""
        ...
