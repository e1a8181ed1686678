"""GAE relevance (Chefer et al. 2021, rule 5 + 6, no LRP) of a decoder's answer for its input tokens.

The token-compression paper's target (notes/explainability_mapper.md §1.3): for each answer token
y_t a relevance matrix starts at the identity and every layer, from the first to the last, adds
its gradient-weighted, head-averaged attention, R ← R + mean_h((∇A ⊙ A)^+) · R; the row of the
position that predicts y_t is read and the rows are averaged over the answer.

Implementation (§6.3, exactly equivalent):

* **One teacher-forced forward** over prompt + answer: with a causal mask its attention maps'
  leading sub-blocks are the maps of every generation step.
* **One backward per answer token** (`retain_graph`), of the logit (or log-probability) of y_t at
  the position p_t that predicts it. Its gradient is zero outside the first p_t + 1 rows/columns.
* **The single-row recursion.** Row p of R_t = (I + Ā^{L-1}) ⋯ (I + Ā^0) is v ← e_p, then
  v ← v + v Ā^l for l = L-1 … 0: the order in which the backward pass reaches the layers. So each
  layer's Ā^l is formed inside a gradient hook on that layer's attention probabilities the moment
  the gradient arrives, applied to v, and dropped: no N×N matrix is stored, nothing is `.grad`.
  Ā is cropped to the first p_t + 1 positions and accumulated in float32 (heads in chunks).
* **Attention kept only where needed.** The LLM runs a registered attention function
  (`tokenprune_gae`: transformers' eager attention plus the hook) only inside `gae_attention(...)`;
  the probabilities autograd saves for the backward are the only extra memory (L·H·N² in the
  model dtype); the vision tower and every other forward keep their SDPA / FlashAttention.

This module registers one attention function with transformers and switches one model's
language model to it for the duration of a call; it knows nothing about any model family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

GAE_ATTENTION = "tokenprune_gae"
TARGETS = ("logit", "logprob")
_HEAD_CHUNK_ELEMENTS = 1 << 26  # float32 elements of (A ⊙ ∇A) materialised at once (256 MiB)


@dataclass
class _Recorder:
    """The row being propagated during one backward pass (shared with the attention hooks)."""

    n_layers: int
    row: torch.Tensor | None = None  # [p + 1] float32
    next_layer: int = -1  # the layer whose gradient must arrive next
    seen: list[int] = field(default_factory=list)

    def start(self, position: int, device: torch.device) -> None:
        self.row = torch.zeros(position + 1, device=device, dtype=torch.float32)
        self.row[position] = 1.0
        self.next_layer = self.n_layers - 1
        self.seen = []

    def update(self, layer: int, probs: torch.Tensor, grad: torch.Tensor) -> None:
        """v ← v + v · mean_h(clamp(A ⊙ ∇A, 0)), on the first p + 1 positions (batch 1)."""
        if self.row is None:
            return
        if layer != self.next_layer:
            raise RuntimeError(
                f"GAE: the gradient of layer {layer} arrived when layer {self.next_layer} was expected; "
                "the single-row recursion needs the backward to reach the layers last to first"
            )
        size = self.row.shape[0]
        heads = probs.shape[1]
        chunk = max(1, _HEAD_CHUNK_ELEMENTS // (size * size))
        weighted = torch.zeros(size, size, device=self.row.device, dtype=torch.float32)
        for start in range(0, heads, chunk):
            a = probs[0, start : start + chunk, :size, :size].float()  # [h, p+1, p+1]
            g = grad[0, start : start + chunk, :size, :size].float()
            weighted += (a * g).clamp_min(0).sum(dim=0)
        self.row = self.row + self.row @ (weighted / heads)
        self.seen.append(layer)
        self.next_layer = layer - 1

    def finish(self) -> torch.Tensor:
        if len(self.seen) != self.n_layers:
            raise RuntimeError(f"GAE: {len(self.seen)} of {self.n_layers} layers' attention got a gradient")
        row, self.row = self.row, None
        return row


_ACTIVE: list[_Recorder] = []


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, L, d] -> [B, Hkv * groups, L, d], query head h reading key head h // groups."""
    if groups == 1:
        return states
    b, heads, length, d = states.shape
    return states[:, :, None].expand(b, heads, groups, length, d).reshape(b, heads * groups, length, d)


def gae_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (softmax in float32, cast back), plus a gradient hook on the
    probabilities that feeds the active recorder. Signature of `AttentionInterface` functions."""
    groups = query.shape[1] // key.shape[1]
    keys = _repeat_kv(key, groups)
    values = _repeat_kv(value, groups)
    logits = torch.matmul(query, keys.transpose(2, 3)) * scaling  # [B, H, Lq, Lk]
    if attention_mask is not None:
        logits = logits + attention_mask[:, :, :, : keys.shape[-2]]
    probs = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    if _ACTIVE and probs.requires_grad:
        recorder, layer, seen = _ACTIVE[-1], int(module.layer_idx), probs.detach()
        probs.register_hook(lambda grad: recorder.update(layer, seen, grad))
    output = torch.matmul(probs, values).transpose(1, 2).contiguous()  # [B, Lq, H, d]
    return output, probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    if GAE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(GAE_ATTENTION, gae_attention_forward)
    if GAE_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        ALL_MASK_ATTENTION_FUNCTIONS.register(GAE_ATTENTION, eager_mask)


@contextlib.contextmanager
def gae_attention(language_model: nn.Module) -> Iterator[_Recorder]:
    """Run `language_model` with the recording attention function inside the block (restored after).

    Only the language model's config is switched, so the vision tower keeps its implementation.
    Its parameters are frozen for the duration (no parameter gradients are formed).
    """
    _register()
    config = language_model.config
    before = config._attn_implementation_internal
    flags = [(p, p.requires_grad) for p in language_model.parameters()]
    recorder = _Recorder(n_layers=int(config.num_hidden_layers))
    config._attn_implementation_internal = GAE_ATTENTION
    _ACTIVE.append(recorder)
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield recorder
    finally:
        _ACTIVE.remove(recorder)
        config._attn_implementation_internal = before
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def relevance_row(
    model: nn.Module,
    language_model: nn.Module,
    embeds: torch.Tensor,
    position_ids: torch.Tensor,
    targets: Sequence[tuple[int, int]],
    target: str = "logit",
) -> torch.Tensor:
    """GAE relevance of the answer tokens for every input position, averaged over the answer.

    Args:
        model: the causal LM; called as `model(inputs_embeds=..., position_ids=..., use_cache=False)`
            and returns `.logits` [1, S, V].
        language_model: its decoder stack (the module whose config picks the attention function).
        embeds: [1, S, D] the input embeddings of prompt + answer (one sample, no padding).
        position_ids: [1, S] (or the model's own position layout) for that input.
        targets: (position p_t, token y_t): explain y_t through the score at p_t, which predicts it.
        target: "logit" (pre-softmax score, GAE's convention) or "logprob" (log-softmax).

    Returns:
        [S] float32: mean over targets of row p_t of R_t (zero past p_t; entry p_t includes the identity).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if embeds.shape[0] != 1:
        raise ValueError("relevance_row explains one sample at a time (batch 1)")
    length = embeds.shape[1]
    total = torch.zeros(length, device=embeds.device, dtype=torch.float32)
    if not targets:
        return total
    with gae_attention(language_model) as recorder, torch.enable_grad():
        leaf = embeds.detach().requires_grad_(True)
        logits = model(inputs_embeds=leaf, position_ids=position_ids, use_cache=False).logits[0]  # [S, V]
        for position, token in targets:
            score = logits[position, token]
            if target == "logprob":
                score = torch.log_softmax(logits[position].float(), dim=-1)[token]
            recorder.start(position, embeds.device)
            torch.autograd.grad(score, leaf, retain_graph=True)
            total[: position + 1] += recorder.finish()
    return total / len(targets)
