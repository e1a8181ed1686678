"""Signals reducers ask for, computed from a model's own modules under any attention backend.

Nothing here switches a model to eager attention or registers hooks: each signal is recomputed
from a hidden state the adapter already has, with the model's own projection layers.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

SIGNAL_DTYPES = ("float32", "model")


def clip_cls_attention(
    last_layer: nn.Module, penultimate: torch.Tensor, dtype: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """PruMerge's CLS attention and patch keys from the last CLIP encoder layer.

    The reference PruMerge definition (notes/prumerge.md §2.2): Q and K are the last layer's
    `q_proj` / `k_proj` outputs (bias included, unscaled) applied to its `layer_norm1` of the
    penultimate hidden state; the attention is one full-width head,
    softmax(Q Kᵀ / sqrt(C)) over all N+1 keys (CLS included), read at the CLS row, patch columns.
    This is not the model's own 16-head attention.

    Args:
        last_layer: a `CLIPEncoderLayer` (has `layer_norm1` and `self_attn.{q,k}_proj`).
        penultimate: [B, N+1, C] the hidden state entering that layer, CLS first.
        dtype: "float32" (default) computes only the CLS query row, logits and softmax in float32,
            so fp16/bf16 towers cannot overflow here; "model" computes as the reference does, in the
            tower's dtype: the full [N+1, N+1] logits, scaled and softmaxed in that dtype, then row 0
            (fp16: the reference's attention values bit for bit, hence its ties and its kept order).

    Returns:
        (vit_cls_attn [B, N] float32 or the tower's dtype, vit_keys [B, N, C] in the tower's dtype)
    """
    if dtype not in SIGNAL_DTYPES:
        raise ValueError(f"signal_dtype must be one of {SIGNAL_DTYPES}, got {dtype!r}")
    normed = last_layer.layer_norm1(penultimate)  # [B, N+1, C]
    keys = last_layer.self_attn.k_proj(normed)  # [B, N+1, C]
    scale = keys.shape[-1] ** -0.5
    if dtype == "model":
        query = last_layer.self_attn.q_proj(normed)  # [B, N+1, C]
        logits = torch.matmul(query, keys.transpose(1, 2)) * scale  # [B, N+1, N+1], tower dtype
        return logits.softmax(dim=-1)[:, 0, 1:], keys[:, 1:]
    query = last_layer.self_attn.q_proj(normed[:, :1])  # [B, 1, C]
    logits = torch.matmul(query.float(), keys.float().transpose(1, 2)) * scale  # [B, 1, N+1]
    attention = logits.softmax(dim=-1)[:, 0, 1:]  # [B, N]
    return attention, keys[:, 1:]


def clip_feature_layer_signals(
    layer: nn.Module, entering: torch.Tensor, output: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's / VisPruner's signals of the CLIP feature layer (the one feeding the projector).

    The layer's own multi-head attention (notes/peers_vision.md): Q and K are its `q_proj` /
    `k_proj` outputs (bias included) of `layer_norm1(entering)`; per head h,
    softmax(q_h k_hᵀ · head_dim^-½) over all N+1 keys (CLS included), read at the CLS row, patch
    columns. Only the CLS query row is computed (the softmax is per row), in float32.

    Args:
        layer: a `CLIPEncoderLayer` (has `layer_norm1`, `self_attn.{q,k}_proj`, `self_attn.num_heads`).
        entering: [B, N+1, C] the hidden state entering that layer, CLS first.
        output: [B, N+1, C] the layer's output (the features LLaVA projects, CLS first).

    Returns:
        (vit_cls_attn_heads [B, H, N] float32, vit_feat_keys [B, N, C] heads concatenated, in the
        tower's dtype, vit_cls_feature [B, C] the CLS row of `output`)
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(entering)  # [B, N+1, C]
    b, length, c = normed.shape
    heads = attn.num_heads
    query = attn.q_proj(normed[:, :1]).float().view(b, heads, 1, c // heads)  # [B, H, 1, d]
    keys = attn.k_proj(normed)  # [B, N+1, C]
    per_head = keys.float().view(b, length, heads, c // heads).permute(0, 2, 3, 1)  # [B, H, d, N+1]
    logits = torch.matmul(query, per_head) * (c // heads) ** -0.5  # [B, H, 1, N+1]
    attention = logits.softmax(dim=-1)[:, :, 0, 1:]  # [B, H, N]
    return attention, keys[:, 1:], output[:, 0]


# ---------------------------------------------------------------------------------------------
# Towers without a CLS token (SigLIP in LLaVA-OneVision, Qwen2-VL's ViT): the `vit_cls_attn`
# substitute is the mean attention each patch *receives* in the tower's last layer,
#     a_j = 1 / (H * Q) * sum_h sum_i softmax_h(q_i k_j / sqrt(d))        (i over the Q queries),
# the model's own multi-head attention (its scale, its RoPE), averaged over heads and queries. Per
# image (per attention segment) it is a distribution over the patches like CLS attention
# (sum 1), high where many patches look. `vit_keys` are the same layer's keys, all heads
# concatenated (Qwen: before the rotary embedding, i.e. content only).

_CHUNK_ELEMENTS = 1 << 25  # attention probabilities materialised at once (float32: 128 MiB)


def mean_received_attention(
    query: torch.Tensor, key: torch.Tensor, scale: float, per_head: bool = False
) -> torch.Tensor:
    """Mean attention each key receives from all queries and heads (or per head), in float32.

    Args:
        query: [B, H, Nq, d] queries (after any positional rotation).
        key: [B, H, Nk, d] keys.
        scale: the softmax temperature the layer uses (usually d ** -0.5).
        per_head: keep the heads apart (the mean over queries only).

    Returns:
        [B, Nk] float32 (per_head: [B, H, Nk]); each row sums to 1. The queries are processed in chunks so that at most
        ~2^25 probabilities exist at once, whatever the sequence length.
    """
    b, h, nq, _ = query.shape
    nk = key.shape[2]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * nk))
    keys = key.float().transpose(-1, -2)  # [B, H, d, Nk]
    total = torch.zeros(b, *((h,) if per_head else ()), nk, device=key.device, dtype=torch.float32)
    for start in range(0, nq, chunk):
        logits = torch.matmul(query[:, :, start : start + chunk].float(), keys) * scale  # [B, H, c, Nk]
        total += logits.softmax(dim=-1).sum(dim=2 if per_head else (1, 2))  # [B, (H,) Nk]
    return total / (nq if per_head else h * nq)


def siglip_attention(
    layer: nn.Module, hidden: torch.Tensor, per_head: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS-free substitute (mean attention received) and keys of one SigLIP encoder layer.

    Args:
        layer: a `SiglipEncoderLayer` (has `layer_norm1` and `self_attn.{q,k}_proj`, `.num_heads`, `.scale`).
        hidden: [B, N, C] the hidden state entering that layer (no CLS token).
        per_head: the substitute per head (`vit_cls_attn_heads`, [B, H, N]) instead of the head mean.

    Returns:
        (vit_cls_attn [B, N] (per_head: [B, H, N]) float32, vit_keys [B, N, C] in the tower's dtype)
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)  # [B, N, C]
    b, n, _ = normed.shape
    heads = attn.num_heads
    query = attn.q_proj(normed).view(b, n, heads, -1).transpose(1, 2)  # [B, H, N, d]
    keys = attn.k_proj(normed)  # [B, N, C]
    received = mean_received_attention(
        query, keys.view(b, n, heads, -1).transpose(1, 2), attn.scale, per_head
    )
    return received, keys


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qwen_vision_attention(
    block: nn.Module,
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    per_head: bool = False,
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
        per_head: keep the heads apart (`received` [L, H]).

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
    received = torch.empty(length, *((heads,) if per_head else ()), device=hidden.device, dtype=torch.float32)
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        q = rotated_q[start:end].transpose(0, 1)[None]  # [1, H, n, d]
        k = rotated_k[start:end].transpose(0, 1)[None]
        segment = mean_received_attention(q, k, scale, per_head)[0] * (end - start)  # [n] or [H, n]
        received[start:end] = segment.T if per_head else segment
    return received, keys.reshape(length, -1)


# ---------------------------------------------------------------------------------------------
# `llm_text_attn`: layer-0 attention of the LLM from the text after an image to its visual tokens
# (the explainability mapper's input, notes/explainability_mapper.md §2.1). Computed from layer
# 0's own input norm, q/k projections and the model's rotary embedding on the spliced, unreduced
# input, so the LLM itself keeps running under SDPA / FlashAttention.


def decoder_query_key(
    layer: nn.Module, rotary: nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rotated queries and keys of a Llama-style decoder layer (Llama, Mistral, Qwen2), in float32.

    Args:
        layer: the decoder layer (has `input_layernorm` and `self_attn.{q,k}_proj`, `self_attn.head_dim`,
            `self_attn.scaling`).
        rotary: the model's rotary embedding module (`rotary(x, position_ids) -> (cos, sin)`, each
            [B, L, d]): 1-D RoPE, or Qwen2-VL's multimodal RoPE, which takes (t, h, w) positions and
            interleaves its `mrope_section`s itself.
        embeds: [B, L, D] the layer's input (the LLM's input embeddings for layer 0).
        position_ids: the positions the model uses for this input: [B, L] (1-D RoPE) or [3, B, L]
            (M-RoPE: the t/h/w rows, e.g. rows 1-3 of the [4, B, L] ids the Qwen2-VL LM takes).

    Returns:
        (query [B, H, L, d], key [B, Hkv, L, d], scale): float32, RoPE applied, keys not repeated.

    Raises:
        ValueError: the layer attends within a sliding window (its mask is not the causal one
            `text_to_visual_attention` applies).
    """
    attn = layer.self_attn
    if getattr(attn, "sliding_window", None) is not None:
        raise ValueError(
            f"layer 0 uses sliding-window attention (window {attn.sliding_window}); llm_text_attn "
            "supports full causal attention only"
        )
    normed = layer.input_layernorm(embeds)  # [B, L, D]
    b, length, _ = normed.shape
    d = attn.head_dim
    query = attn.q_proj(normed).view(b, length, -1, d).transpose(1, 2).float()  # [B, H, L, d]
    key = attn.k_proj(normed).view(b, length, -1, d).transpose(1, 2).float()  # [B, Hkv, L, d]
    cos, sin = rotary(query, position_ids)  # [B, L, d] each
    cos, sin = cos.float()[:, None], sin.float()[:, None]  # [B, 1, L, d]
    query = query * cos + _rotate_half(query) * sin
    key = key * cos + _rotate_half(key) * sin
    return query, key, float(attn.scaling)


def text_to_visual_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    attention_mask: torch.Tensor,
    blocks: list[tuple[int, int, int]],
    rows: torch.Tensor,
) -> torch.Tensor:
    """Mean causal attention from chosen query rows to each visual token of a block, over rows and heads.

    The softmax of each row runs over every key it may attend to (causal, padding excluded), as the
    model's own attention does; the visual columns are then sliced out. Grouped-query attention:
    query head h reads key head h // (H / Hkv), as transformers' `repeat_kv`.

    Args:
        query: [B, H, L, d] rotated queries; key: [B, Hkv, L, d] rotated keys (float32).
        scale: the softmax temperature (the layer's `scaling`).
        attention_mask: [B, L] 1 for real tokens (left padding 0).
        blocks: per image (video), (sample b, first column, visual token count n); the counts may differ.
        rows: [I, L] bool, per image the query rows to average (e.g. the text after it).

    Returns:
        [I, max n] float32; row i is valid up to its block's count, zero after it. An image with no
        row gets zeros.
    """
    b, heads, length, d = query.shape
    groups = heads // key.shape[1]
    n = max((block[2] for block in blocks), default=0)
    out = query.new_zeros(len(blocks), n)
    positions = torch.arange(length, device=query.device)
    for sample in range(b):
        images = [i for i, block in enumerate(blocks) if block[0] == sample]
        if not images:
            continue
        wanted = rows[images].any(0).nonzero().squeeze(1)  # [R] query rows of this sample
        if wanted.numel() == 0:
            continue
        keys = key[sample].transpose(-1, -2)[:, None]  # [Hkv, 1, d, L]
        visible = attention_mask[sample].bool()  # [L]
        chunk = max(1, _CHUNK_ELEMENTS // max(1, heads * length))
        probs = []
        for start in range(0, wanted.numel(), chunk):
            r = wanted[start : start + chunk]  # [c]
            q = query[sample][:, r].view(-1, groups, r.numel(), d)  # [Hkv, G, c, d]
            logits = torch.matmul(q, keys) * scale  # [Hkv, G, c, L]
            allowed = (positions[None, :] <= r[:, None]) & visible[None, :]  # [c, L]
            logits = logits.masked_fill(~allowed, float("-inf"))
            probs.append(logits.softmax(dim=-1).mean(dim=(0, 1)))  # [c, L] head mean
        attention = torch.cat(probs)  # [R, L]
        for i in images:
            _, first, count = blocks[i]
            chosen = rows[i][wanted]  # [R]
            if bool(chosen.any()):
                out[i, :count] = attention[chosen, first : first + count].mean(dim=0)
    return out


def mean_row_attention(
    query: torch.Tensor, key: torch.Tensor, scale: float, attention_mask: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Per query head, the causal attention of chosen rows to every key, averaged over the rows.

    The softmax of each row runs over the keys it may attend to (columns up to its own, padding
    excluded), in float32, as the model's own attention does; grouped-query attention reads key
    head h // (H / Hkv) (transformers' `repeat_kv`). Only the chosen rows are computed.

    Args:
        query: [B, H, L, d] rotated queries; key: [B, Hkv, L, d] rotated keys (float32).
        scale: the softmax temperature (the layer's `scaling`).
        attention_mask: [B, L] 1 (True) for real tokens.
        rows: [B, L] bool, the query rows to average per sample (a sample with none gets zeros).

    Returns:
        [B, H, L] float32; row b sums to 1 over L per head when sample b has a chosen row.
    """
    b, heads, length, d = query.shape
    groups = heads // key.shape[1]
    out = query.new_zeros(b, heads, length)
    positions = torch.arange(length, device=query.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, heads * length))
    for sample in range(b):
        wanted = rows[sample].nonzero().squeeze(1)  # [R]
        if wanted.numel() == 0:
            continue
        keys = key[sample].transpose(-1, -2)[:, None]  # [Hkv, 1, d, L]
        visible = attention_mask[sample].bool()  # [L]
        total = query.new_zeros(heads, length)
        for start in range(0, wanted.numel(), chunk):
            r = wanted[start : start + chunk]  # [c]
            q = query[sample][:, r].view(-1, groups, r.numel(), d)  # [Hkv, G, c, d]
            logits = torch.matmul(q, keys) * scale  # [Hkv, G, c, L]
            allowed = (positions[None, :] <= r[:, None]) & visible[None, :]  # [c, L]
            probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            total += probs.sum(dim=2).reshape(heads, length)
        out[sample] = total / wanted.numel()
    return out


def _rounded(values: torch.Tensor, half: bool) -> torch.Tensor:
    """`values` rounded to float16 and back (emulating a half-precision reference) when `half`."""
    return values.half().float() if half else values


def text_raters(
    embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, half: bool = False
) -> torch.Tensor:
    """SparseVLM's text raters (types.py): the text rows whose visual-averaged relevance is above the mean.

    Per sample: M = softmax over the text axis of V·Tᵀ (raw dot products of the LLM input
    embeddings, no scale), s = M averaged over the visual rows, raters = {j : s_j > mean(s)}.

    Args:
        embeds: [B, L, D] the LLM input embeddings.
        visual, text: [B, L] bool, each sample's visual rows and text rows.
        half: emulate the reference's float16 arithmetic (the products, softmax and means rounded).

    Returns:
        [B, L] bool, the rater rows (a sample without visual or text rows has none).
    """
    out = torch.zeros_like(text)
    for b in range(embeds.shape[0]):
        rows, cols = visual[b].nonzero().squeeze(1), text[b].nonzero().squeeze(1)
        if rows.numel() == 0 or cols.numel() == 0:
            continue
        v, t = _rounded(embeds[b, rows].float(), half), _rounded(embeds[b, cols].float(), half)
        logits = _rounded(v @ t.T, half)  # [n, T]
        score = _rounded(_rounded(logits.softmax(-1), half).mean(0), half)  # [T]
        out[b, cols[score > _rounded(score.mean(), half)]] = True
    return out


def row_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    half: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal attention of each chosen row to every key, heads averaged (one row per query row).

    Softmax and masking as `mean_row_attention`; `half` emulates a float16 eager attention (the
    logits, the probabilities and the head mean rounded to float16).

    Args:
        query: [B, H, L, d]; key: [B, Hkv, L, d] rotated (float32); scale: the layer's `scaling`.
        attention_mask: [B, L] 1 (True) for real tokens.
        rows: [B, L] bool, the query rows per sample.

    Returns:
        ([B, R, L] float32 per chosen row in sequence order, zero rows past each sample's count;
        [B] long, each sample's row count), R = the largest count.
    """
    b, heads, length, d = query.shape
    groups = heads // key.shape[1]
    counts = rows.sum(-1)
    out = query.new_zeros(b, int(counts.max()) if b else 0, length)
    positions = torch.arange(length, device=query.device)
    for sample in range(b):
        wanted = rows[sample].nonzero().squeeze(1)  # [R]
        if wanted.numel() == 0:
            continue
        q = query[sample][:, wanted].view(-1, groups, wanted.numel(), d)  # [Hkv, G, R, d]
        logits = _rounded(torch.matmul(q, key[sample].transpose(-1, -2)[:, None]) * scale, half)
        allowed = (positions[None, :] <= wanted[:, None]) & attention_mask[sample].bool()[None, :]  # [R, L]
        probs = _rounded(logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1), half)
        out[sample, : wanted.numel()] = _rounded(probs.mean(dim=(0, 1)), half)  # [R, L]
    return out, counts
