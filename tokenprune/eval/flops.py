"""Analytic FLOPs of one sample from its actual visual and text token counts.

Convention: one multiply-add = 2 FLOPs; matrix products only (norms, softmax, activations,
residual adds and rotary embeddings are left out: < 1 % at the LLaVA-1.5 shapes); attention
scores are counted in full (no causal halving), as LLM-Viewer and most token-reduction papers do.

Notation: L = tokens in a sequence, C = vision width, I_v = vision MLP width, d = LLM width,
m = LLM MLP width, d_kv = key/value width (heads_kv * head_dim), V = vocabulary, p = patch side.

* Vision tower, per image, for the ``depth`` layers the adapter actually runs (L = N + 1 with the
  CLS token)::

      patch embedding   2 * N * (3 p^2) * C
      per layer         2 * L * (4 C^2 + 2 C I_v)      q, k, v, o projections + 2-matrix MLP
                      + 4 * L^2 * C                    scores Q K^T and weights x V

* Signals, counted where the adapter computes them (``signal_flops``, per signal name):
  ``vit_cls_attn`` / ``vit_keys`` (PruMerge), per image: the last CLIP layer's q and k
  projections of all L tokens plus the CLS row of the scores, ``2 * L * 2 C^2 + 2 * L * C``;
  ``llm_text_attn`` (the explainability mapper), per sample: LLM layer 0's q and k projections
  over the whole *unreduced* sequence S_full = images * N + text, plus the scores of the text rows
  against it, ``2 * S_full * (d^2 + d d_kv) + 2 * T * S_full * d`` (T = text tokens, an upper bound
  on the rows after the image; ~41 GFLOPs at LLaVA-1.5-7B, against ~2.4 for the CLIP signals);
  ``relevance`` (the oracle's GAE): a forward and a backward of the unreduced prompt, estimated as
  3 x its prefill; ``vit_cls_attn_heads`` / ``vit_feat_keys`` (VisionZip, VisPruner), per image: the
  feature layer's k projection of all L tokens, the q projection of the CLS row and its scores,
  ``2 * L * C^2 + 2 * C^2 + 2 * L * C`` (one computation for both), ``vit_cls_feature`` 0 (a row
  of that layer's output). Signals of several names add up.
* Reducer, per image, from N patches to M kept: the reducer's own ``flops(n, kept, width)``
  method (each reducer documents its formula; e.g. 0 for index selection, N * C for pooling,
  ``2 M N C + 2 M k C + 2 N C`` for PruMerge / PruMerge+). A reducer without the method counts as
  unknown (None), and so does the total.
* Projector (LLaVA's 2-layer MLP C -> d -> d) on the P tokens it sees (M for a reducer before
  the projector, N after it): ``2 * P * (C d + d^2)``.
* LLM prefill over S = visual + text tokens, n_layers layers, plus the LM head on the last
  position only (``generate`` computes logits for the last token)::

      per layer   2 * S * (2 d^2 + 2 d d_kv + g d m)   q, o (d x d), k, v (d x d_kv), MLP (g = 3 gated, 2 plain)
                + 4 * S^2 * d                        scores and weights over the whole prompt
      head        2 * d * V

* LLM decode, one step with a KV cache of c tokens: ``n_layers * (2 (2 d^2 + 2 d d_kv + g d m)
  + 4 c d) + 2 d V``. A sample with G new tokens makes G - 1 decode steps (the first new token
  comes out of the prefill), at c = S + 1, ..., S + G - 1.
* A reducer inside the LLM (``space="llm_layer"``, cuts after layers K_1 < K_2 < ...): stage i
  runs layers K_i .. K_{i+1} - 1 (K_0 = 0, the last stage to the top) over S_i = text + the visual
  tokens kept after cut i (S_0 = the whole prompt); the prefill sums the per-layer term above with
  each stage's S_i, and a decode step each stage's own cache length (S_i + t). The signals at a
  cut recompute one layer's q and k over its S_i rows and one row of scores,
  ``2 S_i (d^2 + d d_kv) + 2 S_i d`` per cut (DART reads keys and norms instead: the same order);
  the selection itself is counted as 0 (index-only; DART's cosines, 2 N D per pivot, are left out).
  Per stage: the layers' prefill FLOPs (``prefill_stages``) and one layer's (``layer_stages``), i.e.
  the cost before and after each cut.

Paper check (tests/test_flops.py): PruMerge's Table 2 (an LLM-Viewer roofline of the LLM prefill,
prompt length not stated) lists 9.3 TFLOPs for LLaVA-1.5-7B and 0.91 with PruMerge. Solving this
formula for the sequence length gives 698 tokens (576 visual + 122 text) and 70 tokens (32 + 38):
the paper's two rows assumed different text lengths. At those lengths both rows (and the 13B rows,
18.2 and 1.80 TFLOPs) are reproduced within 2 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tokenprune.types import (
    LLM_TEXT_ATTN,
    RELEVANCE,
    VIT_CLS_ATTN,
    VIT_CLS_ATTN_HEADS,
    VIT_CLS_FEATURE,
    VIT_FEAT_KEYS,
    VIT_KEYS,
)


@dataclass(frozen=True)
class VisionShape:
    """A ViT (CLIP) tower: the layers run, widths, patches per image (no CLS) and patch side."""

    depth: int
    width: int
    mlp_width: int
    patches: int
    patch_size: int
    channels: int = 3


@dataclass(frozen=True)
class LlmShape:
    """A decoder-only LLM; ``gated`` for SwiGLU MLPs (3 matrices) as LLaMA / Vicuna."""

    layers: int
    width: int
    mlp_width: int
    heads: int
    kv_heads: int
    vocab: int
    gated: bool = True

    @property
    def kv_width(self) -> int:
        return self.width // self.heads * self.kv_heads

    @property
    def linear_flops_per_token(self) -> int:
        """2 x the multiply-adds of one token through one layer's projections and MLP."""
        d, m = self.width, self.mlp_width
        return 2 * (2 * d * d + 2 * d * self.kv_width + (3 if self.gated else 2) * d * m)


@dataclass(frozen=True)
class ModelShape:
    """Vision tower + projector (C -> d -> d) + LLM: everything the FLOPs formulas need (vision
    None: a tower without a formula; its stages are then unknown, the LLM's still counted)."""

    vision: VisionShape | None
    llm: LlmShape

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def vit_flops(v: VisionShape) -> int:
    """One image through the patch embedding and ``depth`` encoder layers."""
    tokens = v.patches + 1
    embed = 2 * v.patches * v.channels * v.patch_size**2 * v.width
    per_layer = 2 * tokens * (4 * v.width**2 + 2 * v.width * v.mlp_width) + 4 * tokens**2 * v.width
    return embed + v.depth * per_layer


def signal_flops(shape: ModelShape, requires: Sequence[str], images: int, text_tokens: int) -> int:
    """Work for the signals a reducer reads, where the adapter computes them (0 when it reads none).

    Args:
        shape: the model; requires: the reducer's signal names.
        images: images (or frames) of the sample; text_tokens: its other prompt tokens.
    """
    v, llm = shape.vision, shape.llm
    tokens = v.patches + 1
    full = images * v.patches + text_tokens  # the unreduced LLM input
    costs = {
        "vit": images * (2 * tokens * 2 * v.width**2 + 2 * tokens * v.width),
        LLM_TEXT_ATTN: 2 * full * (llm.width**2 + llm.width * llm.kv_width)
        + 2 * text_tokens * full * llm.width,
        RELEVANCE: 3 * prefill_flops(llm, full),
        # the feature layer's k_proj over every token, q_proj of the CLS row, its attention row
        # (models/signals.clip_feature_layer_signals); its CLS feature is a read of that layer's output
        "feature": images * (2 * tokens * v.width**2 + 2 * v.width**2 + 2 * tokens * v.width),
        VIT_CLS_FEATURE: 0,
    }
    grouped = {VIT_CLS_ATTN: "vit", VIT_KEYS: "vit", VIT_CLS_ATTN_HEADS: "feature", VIT_FEAT_KEYS: "feature"}
    names = {grouped.get(name, name) for name in requires}
    unknown = names - set(costs)
    if unknown:
        raise ValueError(f"no FLOPs formula for the signals {sorted(unknown)}")
    return sum(costs[name] for name in names)


def reducer_flops(reducer: Any, n: int, kept: int, width: int) -> int | None:
    """FLOPs of reducing one image from ``n`` patches of ``width`` to ``kept`` tokens: the reducer's
    own ``flops`` method (None for a reducer that does not declare one)."""
    own = getattr(reducer, "flops", None)
    return None if own is None else int(own(n, kept, width))


def projector_flops(vision_width: int, llm_width: int, tokens: int) -> int:
    return 2 * tokens * (vision_width * llm_width + llm_width**2)


def prefill_flops(llm: LlmShape, seq_len: int | Sequence[tuple[int, int]]) -> int:
    """LLM prefill over ``seq_len`` tokens, with the LM head on the last position; or, staged, over
    (layers, tokens) pairs whose layers sum to the LLM's (a reducer inside the LLM)."""
    stages = [(llm.layers, seq_len)] if isinstance(seq_len, int) else list(seq_len)
    return sum(stage_flops(llm, stages)) + 2 * llm.width * llm.vocab


def stage_flops(llm: LlmShape, stages: Sequence[tuple[int, int]]) -> list[int]:
    """Per (layers, tokens) stage, the prefill FLOPs of its decoder layers (no LM head)."""
    return [layers * (s * llm.linear_flops_per_token + 4 * s**2 * llm.width) for layers, s in stages]


def decode_step_flops(llm: LlmShape, context: int | Sequence[tuple[int, int]]) -> int:
    """One decode step attending to a KV cache of ``context`` tokens (or, staged, (layers, cache) pairs)."""
    stages = [(llm.layers, context)] if isinstance(context, int) else list(context)
    per_layer = sum(layers * (llm.linear_flops_per_token + 4 * c * llm.width) for layers, c in stages)
    return per_layer + 2 * llm.width * llm.vocab


def llm_stages(llm: LlmShape, cuts: Sequence[int], tokens: Sequence[int]) -> list[tuple[int, int]]:
    """(layers, tokens) per stage of an LLM cut after layers ``cuts``, with ``tokens[i]`` rows in stage i."""
    bounds = [0, *cuts, llm.layers]
    return [(bounds[i + 1] - bounds[i], tokens[i]) for i in range(len(bounds) - 1)]


def layer_signal_flops(llm: LlmShape, tokens: Sequence[int]) -> int:
    """The signals of the cuts of a reducer inside the LLM, ``tokens[i]`` rows at cut i."""
    return sum(2 * s * (llm.width**2 + llm.width * llm.kv_width) + 2 * s * llm.width for s in tokens)


def sample_flops(
    shape: ModelShape,
    reducer: Any,
    requires: Sequence[str],
    space: str,
    images: int,
    visual_tokens: int,
    text_tokens: int,
    new_tokens: int,
    cuts: Sequence[int] = (),
    layer_tokens: Sequence[int] = (),
) -> dict[str, int | None]:
    """Every stage's FLOPs for one sample: ``images`` images keeping ``visual_tokens`` in all,
    ``text_tokens`` other prompt tokens and ``new_tokens`` generated tokens; with a reducer inside
    the LLM (``space="llm_layer"``), ``visual_tokens`` enter the LLM and ``layer_tokens[i]`` remain
    after the cut after layer ``cuts[i]``.

    Returns keys vit, signals, reducer (None if unknown), projector, prefill, decode (all steps),
    decode_steps, prefill_full (the prefill with every patch kept) and total (None if a stage is
    unknown, e.g. the vision tower of a family without a formula); inside the LLM also
    prefill_stages (per stage, before the first cut and after each, its layers' prefill FLOPs) and
    layer_stages (per stage, one of its decoder layers' prefill FLOPs).
    """
    v, llm = shape.vision, shape.llm
    in_llm = space == "llm_layer"
    seq = visual_tokens + text_tokens
    stages = llm_stages(llm, cuts, [seq, *(k + text_tokens for k in layer_tokens)]) if in_llm else seq
    steps = max(new_tokens - 1, 0)
    out: dict[str, int | None] = {
        "prefill": prefill_flops(llm, stages),
        "decode": sum(decode_step_flops(llm, _grown(stages, i)) for i in range(1, steps + 1)),
        "decode_steps": steps,
    }
    if in_llm:
        out["prefill_stages"] = stage_flops(llm, stages)
        out["layer_stages"] = stage_flops(llm, [(1, tokens) for _, tokens in stages])
    if v is None:
        out.update(vit=None, signals=None, reducer=None, projector=None)
        out["prefill_full"] = prefill_flops(llm, seq) if in_llm else None
    else:
        width = v.width if space == "vision" else llm.width
        kept = images * v.patches if in_llm else visual_tokens
        per_image = [kept // images + (1 if i < kept % images else 0) for i in range(images)]
        reduce = [0 if in_llm else reducer_flops(reducer, v.patches, k, width) for k in per_image]
        out.update(
            vit=images * vit_flops(v),
            signals=signal_flops(shape, () if in_llm else requires, images, text_tokens),
            reducer=None if any(r is None for r in reduce) else sum(r for r in reduce if r is not None),
            projector=projector_flops(v.width, llm.width, kept if space == "vision" else images * v.patches),
            prefill_full=prefill_flops(llm, images * v.patches + text_tokens),
        )
    if in_llm and out["signals"] is not None:
        out["signals"] += layer_signal_flops(llm, [s for _, s in stages[:-1]])
    parts = [out[k] for k in ("vit", "signals", "reducer", "projector", "prefill", "decode")]
    out["total"] = None if any(p is None for p in parts) else sum(p for p in parts if p is not None)
    return out


def _grown(stages: int | list[tuple[int, int]], step: int) -> int | list[tuple[int, int]]:
    """A prefill's token counts after ``step`` decoded tokens (the decode step's cache lengths)."""
    if isinstance(stages, int):
        return stages + step
    return [(layers, s + step) for layers, s in stages]


def llm_shape(text_config: Any) -> LlmShape:
    """The LLM shape of a transformers text config (Llama, Qwen2, Qwen2-VL's text model)."""
    tc = text_config
    return LlmShape(
        layers=tc.num_hidden_layers,
        width=tc.hidden_size,
        mlp_width=tc.intermediate_size,
        heads=tc.num_attention_heads,
        kv_heads=getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
        vocab=tc.vocab_size,
        gated=getattr(tc, "hidden_act", "silu") in ("silu", "swiglu"),
    )


def shape_from_llava_config(config: Any, vision_depth: int | None = None) -> ModelShape:
    """The shape of a transformers ``LlavaConfig`` (vision_config + text_config).

    ``vision_depth`` is the number of CLIP layers the adapter runs (default: up to the feature layer).
    """
    vc, tc = config.vision_config, config.text_config
    if vision_depth is None:
        layer = config.vision_feature_layer
        vision_depth = layer if layer >= 0 else vc.num_hidden_layers + 1 + layer
    side = vc.image_size // vc.patch_size
    vision = VisionShape(
        depth=vision_depth,
        width=vc.hidden_size,
        mlp_width=vc.intermediate_size,
        patches=side * side,
        patch_size=vc.patch_size,
        channels=getattr(vc, "num_channels", 3),
    )
    return ModelShape(vision=vision, llm=llm_shape(tc))


# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 run to layer 23 of 24 + Vicuna-7B.
LLAVA15_7B = ModelShape(
    vision=VisionShape(depth=23, width=1024, mlp_width=4096, patches=576, patch_size=14),
    llm=LlmShape(layers=32, width=4096, mlp_width=11008, heads=32, kv_heads=32, vocab=32064),
)
# LLaVA-1.5-13B: the same tower + Vicuna-13B.
LLAVA15_13B = ModelShape(
    vision=LLAVA15_7B.vision,
    llm=LlmShape(layers=40, width=5120, mlp_width=13824, heads=40, kv_heads=40, vocab=32064),
)
