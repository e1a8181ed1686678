"""Synthetic CLIP-like visual tokens and signals: the one generator the tests and the benchmarks share.

CLIP's CLS attention is a softmax with a few strong outliers (the patches PruMerge keeps); the LLM-input
signals are a layer-0 text->visual attention with outliers and a relevance vector. Everything is drawn
from one seeded generator, so a seed gives the same tensors on every machine. Used by the reducer
contract matrix (`tests/test_reducer_contract.py`) and the reducer benchmarks (`scripts/bench_*.py`).
"""

from __future__ import annotations

import torch

from tokenprune import types
from tokenprune.types import VisualTokens


def clip_like_signals(
    b: int,
    n: int,
    c: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    heads: int | None = None,
    feature_dim: int | None = None,
) -> dict[str, torch.Tensor]:
    """Every signal a reducer before the LLM or at its input reads, for b images of n patches.

    Args:
        c: width of the keys (`vit_keys`, `vit_feat_keys`).
        heads: heads of the feature layer's per-head CLS attention (default 4 when c divides by 4, else 1).
        feature_dim: width of `vit_cls_feature` (default c; the features' width where it differs).
    """
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, n + 1, generator=generator)  # CLS row over [CLS, patches]
    spikes = torch.randint(0, n, (b, max(1, n // 40)), generator=generator)
    logits.scatter_add_(1, spikes + 1, 4 + 2 * torch.rand(spikes.shape, generator=generator))
    attention = logits.softmax(-1)[:, 1:]  # [B, N]
    keys = torch.randn(b, n, c, generator=generator)  # [B, N, C]
    text_attn = (torch.randn(b, n, generator=generator) + 3 * (attention > attention.median())).softmax(-1)
    relevance = torch.rand(b, n, generator=generator) * text_attn  # [B, N]
    heads = heads or (4 if c % 4 == 0 else 1)  # feature-layer signals (VisionZip, VisPruner)
    head_logits = logits[:, None] + torch.randn(b, heads, n + 1, generator=generator)
    feature_layer = {
        "vit_cls_attn_heads": head_logits.softmax(-1)[:, :, 1:].to(dtype),  # [B, H, N]
        "vit_feat_keys": torch.randn(b, n, c, generator=generator).to(dtype),  # [B, N, C]
        "vit_cls_feature": torch.randn(b, feature_dim or c, generator=generator).to(dtype),  # [B, D]
    }
    return feature_layer | {
        "vit_cls_attn": attention.to(dtype),
        "vit_keys": keys.to(dtype),
        "llm_text_attn": text_attn.to(dtype),
        "relevance": relevance.to(dtype),
    }


def clip_like_tokens(
    b: int,
    grid: tuple[int, int],
    dim: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    heads: int | None = None,
    key_dim: int | None = None,
) -> VisualTokens:
    """b images of grid[0] x grid[1] patches: normal features [B, N, dim] and `clip_like_signals`
    (keys of width key_dim, default dim), on `device` in `dtype`."""
    n = grid[0] * grid[1]
    generator = torch.Generator().manual_seed(seed + 1000)
    features = torch.randn(b, n, dim, generator=generator)
    signals = clip_like_signals(b, n, key_dim or dim, seed=seed, heads=heads, feature_dim=dim)
    return VisualTokens(
        features=features.to(device, dtype),
        grid=grid,
        signals={name: value.to(device, dtype) for name, value in signals.items()},
    )


def llm_layer_like_signals(n: int, text: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random `LLM_LAYER_*` signals (attention rows, keys, normed states) for one sample of `n` visual
    and `text` text tokens, as a reducer inside the LLM receives them (`scripts/bench_prefill.py`)."""
    attention = torch.rand(1, n, generator=generator).softmax(-1)
    return {
        types.LLM_LAYER_LAST_ATTN: attention,
        types.LLM_LAYER_LAST_ATTN_HEADS: attention[:, None].expand(1, 4, n),
        types.LLM_LAYER_TEXT_ATTN: attention,
        types.LLM_LAYER_NEXT_LAST_ATTN: attention,
        types.LLM_LAYER_KEYS: torch.randn(1, n, 64, generator=generator),
        types.LLM_LAYER_NORMED: torch.randn(1, n, 64, generator=generator),
        types.LLM_LAYER_TEXT_KEYS: torch.randn(1, text, 64, generator=generator),
        types.LLM_LAYER_TEXT_NORMED: torch.randn(1, text, 64, generator=generator),
        types.LLM_LAYER_TEXT_LENGTHS: torch.tensor([text]),
        types.LLM_LAYER_RATER_ATTN: attention,
        types.LLM_LAYER_RATER_ATTN_ROWS: attention[:, None].expand(1, 4, n),
    }
