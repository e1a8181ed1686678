"""Signals reducers ask for, computed from a model's own modules under any attention backend.

Nothing here switches a model to eager attention or registers hooks: each signal is recomputed
from a hidden state the adapter already has, with the model's own projection layers.
"""

from __future__ import annotations

import torch
from torch import nn


def clip_cls_attention(last_layer: nn.Module, penultimate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PruMerge's CLS attention and patch keys from the last CLIP encoder layer.

    The reference PruMerge definition (notes/prumerge.md §2.2): Q and K are the last layer's
    `q_proj` / `k_proj` outputs (bias included, unscaled) applied to its `layer_norm1` of the
    penultimate hidden state; the attention is one full-width head,
    softmax(Q Kᵀ / sqrt(C)) over all N+1 keys (CLS included), read at the CLS row, patch columns.
    This is not the model's own 16-head attention. Only the CLS query row is computed (the
    softmax is per row, so it equals row 0 of the full matrix). The logits and softmax run in
    float32, so fp16/bf16 towers cannot overflow here.

    Args:
        last_layer: a `CLIPEncoderLayer` (has `layer_norm1` and `self_attn.{q,k}_proj`).
        penultimate: [B, N+1, C] the hidden state entering that layer, CLS first.

    Returns:
        (vit_cls_attn [B, N] float32, vit_keys [B, N, C] in the tower's dtype)
    """
    normed = last_layer.layer_norm1(penultimate)  # [B, N+1, C]
    query = last_layer.self_attn.q_proj(normed[:, :1])  # [B, 1, C]
    keys = last_layer.self_attn.k_proj(normed)  # [B, N+1, C]
    scale = keys.shape[-1] ** -0.5
    logits = torch.matmul(query.float(), keys.float().transpose(1, 2)) * scale  # [B, 1, N+1]
    attention = logits.softmax(dim=-1)[:, 0, 1:]  # [B, N]
    return attention, keys[:, 1:]
