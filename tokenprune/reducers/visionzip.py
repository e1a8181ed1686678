"""VisionZip (Yang et al., CVPR 2025): dominant tokens by CLS attention plus merged contextual tokens.

Semantics of the reference (dvlab-research/VisionZip `visionzip/clip_encoder.py`, read in
`notes/peers_vision.md`), implemented here in our own words and batched. Everything comes from the
**feature layer** (LLaVA-1.5: `vision_feature_layer = -2`), through the adapter's signals:

1. **Dominant.** The CLS row (`vit_cls_feature`) plus the top `dominant - 1` patches by the CLS
   attention summed over heads (`vit_cls_attn_heads`), in sequence order: CLS first, then the
   patches by ascending index (not score order).
2. **Contextual.** The other M = N - dominant + 1 patches, in raster order, are the filtered set.
   Their keys (`vit_feat_keys`, averaged over the H heads) are L2-normalised (no eps); the
   targets are the filtered positions 0, s, 2s, ... (s = max(1, M // contextual)), the first
   `contextual` of them; every other filtered token joins the target whose key is most
   cosine-similar (argmax ties: the lowest target); each contextual token is its target's feature
   plus the mean of its members' features (0 without members).
3. **Output.** [dominant tokens, then the contextual tokens in target order]; index: the CLS and
   every contextual token -1, a dominant patch its patch index.

On a tower without a CLS token (SigLIP, Qwen's ViT: `vit_cls_feature` is [B, 0]) all `dominant`
slots go to patches (the budget stays dominant + contextual); the adapters' attention substitute
is documented in docs/peers.md. Deliberate deviations: the similarity and the member mean run in
float32 (the reference: fp16); a budget that covers every patch (dominant patches + contextual
>= N) returns the input unchanged (the reference crashes when contextual > M).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tokenprune.reducers._ops import gather_tokens, identity
from tokenprune.types import VIT_CLS_ATTN_HEADS, VIT_CLS_FEATURE, VIT_FEAT_KEYS, Reduced, Space, VisualTokens


def head_mean_keys(keys: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, C] keys, heads concatenated -> [B, N, C / heads] their mean over heads, in float32."""
    b, n, c = keys.shape
    if c % heads:
        raise ValueError(f"key width {c} is not a multiple of the {heads} attention heads")
    return keys.float().view(b, n, heads, c // heads).mean(dim=2)  # [B, N, C/H]


def complement(chosen: torch.Tensor, n: int) -> torch.Tensor:
    """The indices in [0, n) not in `chosen` [B, k] (distinct), ascending -> [B, n - k]."""
    b, k = chosen.shape
    rank = torch.arange(n, device=chosen.device).expand(b, n).clone()  # [B, N]
    rank.scatter_(1, chosen, n)  # chosen ones sort last
    return rank.sort(dim=1).values[:, : n - k]


def merge_contextual(
    features: torch.Tensor, rest: torch.Tensor, metric: torch.Tensor, contextual: int
) -> torch.Tensor:
    """VisionZip's contextual tokens from the filtered patches.

    Args:
        features: [B, N, D] every patch's feature.
        rest: [B, M] the filtered patches' indices, in raster order.
        metric: [B, M, c] their head-averaged keys (float32).
        contextual: targets, 1 <= contextual < M.

    Returns:
        [B, contextual, D] in the features' dtype, in target order.
    """
    b, n, d = features.shape
    m = rest.shape[1]
    step = max(1, m // contextual)
    target_pos = torch.arange(0, m, step, device=features.device)[:contextual]  # [c]
    others = complement(target_pos.unsqueeze(0), m)[0]  # [M-c] ascending (no host sync)
    unit = metric / metric.norm(dim=-1, keepdim=True)  # [B, M, c]
    similarity = torch.matmul(unit[:, others], unit[:, target_pos].transpose(1, 2))  # [B, M-c, c]
    assign = similarity.argmax(dim=-1)  # [B, M-c]
    # every patch gets a slot: its target for a member, slot `contextual` (discarded) otherwise, so the
    # member sums read the features in place (raster order, as the members are listed)
    slot = torch.full((b, n), contextual, device=features.device, dtype=torch.long)  # [B, N]
    slot.scatter_(1, rest[:, others], assign)
    x = features.float()  # [B, N, D]
    sums = x.new_zeros(b, contextual + 1, d).scatter_add_(1, slot.unsqueeze(-1).expand(-1, -1, d), x)
    counts = x.new_zeros(b, contextual + 1).scatter_add_(1, slot, x.new_ones(b, n))  # [B, c+1]
    mean = sums[:, :contextual] / counts[:, :contextual].clamp(min=1).unsqueeze(-1)  # [B, c, D] (0 if none)
    tokens = gather_tokens(x, rest[:, target_pos]) + mean  # [B, c, D]
    return tokens.to(features.dtype)


class VisionZip:
    """Dominant tokens (CLS + top CLS-attention patches) and merged contextual tokens, fixed count.

    Args:
        dominant: dominant tokens per image, the CLS row included (paper: 54 / 108 / 162 for
            64 / 128 / 192 tokens); on a tower without a CLS token all of them are patches.
        contextual: merged contextual tokens (paper: 10 / 20 / 30).
    """

    space: ClassVar[Space] = "vision"
    requires: ClassVar[tuple[str, ...]] = (VIT_CLS_ATTN_HEADS, VIT_FEAT_KEYS, VIT_CLS_FEATURE)

    def __init__(self, dominant: int = 54, contextual: int = 10) -> None:
        if dominant < 1 or contextual < 0:
            raise ValueError(
                f"VisionZip needs dominant >= 1 and contextual >= 0, got {dominant}, {contextual}"
            )
        self.dominant, self.contextual = dominant, contextual

    def __call__(self, tokens: VisualTokens) -> Reduced:
        features = tokens.features  # [B, N, D]
        b, n, d = features.shape
        attention = tokens.signals[VIT_CLS_ATTN_HEADS]  # [B, H, N]
        cls = tokens.signals[VIT_CLS_FEATURE]  # [B, D] or [B, 0]
        has_cls = cls.shape[-1] > 0
        if has_cls and cls.shape[-1] != d:
            raise ValueError(f"vit_cls_feature has width {cls.shape[-1]}, the features {d}")
        patches = self.dominant - int(has_cls)  # dominant patches
        if patches + self.contextual >= n:
            return identity(tokens)
        score = attention.float().sum(dim=1)  # [B, N] summed over heads
        top = score.topk(patches, dim=-1).indices.sort(dim=-1).values  # [B, k] ascending patch index
        parts = [gather_tokens(features, top)]  # [B, k, D]
        index = [top]
        if has_cls:
            parts.insert(0, cls.unsqueeze(1).to(features.dtype))  # [B, 1, D]
            index.insert(0, top.new_full((b, 1), -1))
        if self.contextual:
            rest = complement(top, n)  # [B, M] raster order
            metric = head_mean_keys(tokens.signals[VIT_FEAT_KEYS], attention.shape[1])  # [B, N, c]
            merged = merge_contextual(features, rest, gather_tokens(metric, rest), self.contextual)
            parts.append(merged)  # [B, contextual, D]
            index.append(top.new_full((b, self.contextual), -1))
        out = torch.cat(parts, dim=1)  # [B, dominant + contextual, D]
        lengths = torch.full((b,), out.shape[1], device=features.device, dtype=torch.long)
        return Reduced(features=out, index=torch.cat(index, dim=1), lengths=lengths)

    def flops(self, n: int, kept: int, width: int) -> int:
        """Similarity of the non-target to the target keys (key width ~ width) plus the member sums."""
        m = max(n - self.dominant + 1, 0)
        return 2 * m * self.contextual * width + 2 * m * width
