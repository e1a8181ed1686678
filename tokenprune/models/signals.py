"""Signals reducers ask for, computed from a model's own modules under any attention backend.

Nothing here switches a model to eager attention or registers hooks: each signal is recomputed
from a hidden state the adapter already has, with the model's own projection layers.
"""

from __future__ import annotations

import itertools

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


# ---------------------------------------------------------------------------------------------
# Towers without a CLS token (SigLIP in LLaVA-OneVision, Qwen2-VL's ViT): the `vit_cls_attn`
# substitute is the mean attention each patch *receives* in the tower's last layer,
#     a_j = 1 / (H * Q) * sum_h sum_i softmax_h(q_i k_j / sqrt(d))        (i over the Q queries),
# the model's own multi-head attention (its scale, its RoPE), averaged over heads and queries. Per
# image (per attention segment) it is a distribution over the patches like CLS attention
# (sum 1), high where many patches look. `vit_keys` are the same layer's keys, all heads
# concatenated (Qwen: before the rotary embedding, i.e. content only).

_CHUNK_ELEMENTS = 1 << 25  # attention probabilities materialised at once (float32: 128 MiB)


def mean_received_attention(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean attention each key receives from all queries and heads, in float32.

    Args:
        query: [B, H, Nq, d] queries (after any positional rotation).
        key: [B, H, Nk, d] keys.
        scale: the softmax temperature the layer uses (usually d ** -0.5).

    Returns:
        [B, Nk] float32; each row sums to 1. The queries are processed in chunks so that at most
        ~2^25 probabilities exist at once, whatever the sequence length.
    """
    b, h, nq, _ = query.shape
    nk = key.shape[2]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * nk))
    keys = key.float().transpose(-1, -2)  # [B, H, d, Nk]
    total = torch.zeros(b, nk, device=key.device, dtype=torch.float32)
    for start in range(0, nq, chunk):
        logits = torch.matmul(query[:, :, start : start + chunk].float(), keys) * scale  # [B, H, c, Nk]
        total += logits.softmax(dim=-1).sum(dim=(1, 2))  # [B, Nk]
    return total / (h * nq)


def siglip_attention(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS-free substitute (mean attention received) and keys of one SigLIP encoder layer.

    Args:
        layer: a `SiglipEncoderLayer` (has `layer_norm1` and `self_attn.{q,k}_proj`, `.num_heads`, `.scale`).
        hidden: [B, N, C] the hidden state entering that layer (no CLS token).

    Returns:
        (vit_cls_attn [B, N] float32, vit_keys [B, N, C] in the tower's dtype)
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)  # [B, N, C]
    b, n, _ = normed.shape
    heads = attn.num_heads
    query = attn.q_proj(normed).view(b, n, heads, -1).transpose(1, 2)  # [B, H, N, d]
    keys = attn.k_proj(normed)  # [B, N, C]
    received = mean_received_attention(query, keys.view(b, n, heads, -1).transpose(1, 2), attn.scale)
    return received, keys


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qwen_vision_attention(
    block: nn.Module,
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS-free substitute and keys of a Qwen2-VL / Qwen2.5-VL vision block, per attention segment.

    The block's fused `qkv` is applied to its `norm1` of `hidden`; queries and keys get the vision
    rotary embedding the block received; the softmax runs within each `cu_seqlens` segment (a frame
    group of one image or video, or a Qwen2.5-VL window), as the block's own attention does.

    Args:
        block: a `Qwen2VLVisionBlock` / `Qwen2_5_VLVisionBlock` (has `norm1`, `attn.qkv`, `attn.num_heads`).
        hidden: [L, C] the packed hidden state entering the block (all images, in the block's order).
        cu_seqlens: [S + 1] segment boundaries the block attends within.
        position_embeddings: (cos, sin), each [L, d], as the block received them.

    Returns:
        (received [L] float32, keys [L, C] before the rotary embedding, in the tower's dtype).
        `received` is the attention each token receives summed over its segment's queries and
        averaged over heads: within a segment of n tokens it sums to n, so dividing by a frame's
        token count gives the mean over the frame's queries (sum 1 per frame, windows or not).
    """
    attn = block.attn
    length = hidden.shape[0]
    heads = attn.num_heads
    qkv = attn.qkv(block.norm1(hidden)).reshape(length, 3, heads, -1)  # [L, 3, H, d]
    query, keys = qkv[:, 0], qkv[:, 1]  # [L, H, d]
    cos, sin = (t.unsqueeze(-2).float() for t in position_embeddings)  # [L, 1, d]
    rotated_q = query.float() * cos + _rotate_half(query.float()) * sin  # [L, H, d]
    rotated_k = keys.float() * cos + _rotate_half(keys.float()) * sin
    scale = rotated_q.shape[-1] ** -0.5
    received = torch.empty(length, device=hidden.device, dtype=torch.float32)
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        q = rotated_q[start:end].transpose(0, 1)[None]  # [1, H, n, d]
        k = rotated_k[start:end].transpose(0, 1)[None]
        received[start:end] = mean_received_attention(q, k, scale)[0] * (end - start)
    return received, keys.reshape(length, -1)
