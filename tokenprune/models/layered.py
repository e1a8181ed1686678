"""The reduction point inside the LLM: reducers with `space="llm_layer"` cut the visual tokens after
decoder layer K (FastV, PyramidDrop, SparseVLM, DART and the like).

`LayerRunner` runs the language model's own decoder layers in segments split at the reducer's
`layers` (K_1 < K_2 < ...). Segment s runs layers K_s .. K_{s+1} - 1 on the tokens kept so far; at
each cut it computes the signals the reducer requires (`types.LLM_LAYER_*`, from the layers' own
q/k and rotary embedding for the needed rows: `signals.decoder_query_key`, `mean_row_attention`),
hands the reducer the visual tokens' hidden states (`types.LayerTokens`) and keeps the rows it
returns. Pruned tokens leave the sequence: every later layer computes on, and caches, only the kept
ones.

* **Positions.** Each segment has its own rotary positions: "gather" (default) keeps each token's
  original position (1-D RoPE, or the (t, h, w) M-RoPE rows of Qwen2-VL); "renumber" numbers the
  shortened sequence 0 .. L'-1 from the cut on (1-D RoPE only). A decoded token takes, per segment,
  that segment's last position + 1 (as `generate` does for the unreduced model).
* **Masks.** Rows stay in sequence order, left-padded per segment; a segment's mask is causal over
  its columns with the padding keys hidden (a padding query sees only itself, so no row is empty).
  Boolean for SDPA, additive for eager; FlashAttention (2-D padding masks only) is refused, also
  for the attention-free DART: the signals are recomputed from q/k whatever the backend, but the
  segments pass 4-D masks, and a 2-D-mask path could not be tested here (no flash-attn build).
* **KV cache.** One `DynamicCache`: layers before a cut hold every token, later ones the kept ones;
  a decode step appends one column to every segment's mask.
* **Batches.** Per-sample kept counts may differ; each segment is left-padded to its longest row.

The reducer must return, per sample, strictly ascending indices into its current visual tokens; its
`features` replace those tokens' hidden states.

* **Synthetic tokens** (index -1 after the kept ones, e.g. SparseVLM's recycled tokens): inserted
  right after the sample's last visual token before the cut (so before the text that follows it),
  in the order returned; they are visual tokens from then on (candidates at later cuts, counted in
  `layer_tokens` and so by the FLOP meter), have no LLM-input column (`source` -2) and no label.
  Positions: "renumber" numbers them with the rest; "gather" gives each the position of its
  `Reduced.anchor` (a current visual token chosen by the reducer; M-RoPE: its (t, h, w) row).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import torch

from tokenprune.models._views import LlmInput, SplicedInputs
from tokenprune.models.signals import decoder_query_key, mean_row_attention, row_attention, text_raters
from tokenprune.types import (
    LLM_LAYER_KEYS,
    LLM_LAYER_LAST_ATTN,
    LLM_LAYER_LAST_ATTN_HEADS,
    LLM_LAYER_NEXT_LAST_ATTN,
    LLM_LAYER_NORMED,
    LLM_LAYER_RATER_ATTN,
    LLM_LAYER_RATER_ATTN_ROWS,
    LLM_LAYER_SIGNALS,
    LLM_LAYER_TEXT_ATTN,
    LLM_LAYER_TEXT_KEYS,
    LLM_LAYER_TEXT_LENGTHS,
    LLM_LAYER_TEXT_NORMED,
    LLM_LAYER_TOKEN_SIGNALS,
    RATER_SIGNALS,
    LayerTokens,
    Reduced,
)

_SUPPORTED_GENERATE = {"do_sample": False, "num_beams": 1}


@dataclass
class Rows:
    """The sequence one segment computes on (left-padded), and what each row is.

    Attributes:
        hidden: [B, L, D] hidden states.
        mask: [B, L] bool, real tokens.
        rope: [B, L] (1-D) or [3, B, L] (M-RoPE t/h/w) rotary positions.
        visual: [B, L] bool, the visual tokens.
        text: [B, L] bool, the rows `llm_layer_text_attn` averages.
        last: [B, L] bool, the last prompt token.
        source: [B, L] long, the row's column in the LLM input (-1: padding, -2: a synthetic token).
        rater: [B, L] bool, SparseVLM's text raters (None unless the reducer asks for rater signals).
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    rope: torch.Tensor
    visual: torch.Tensor
    text: torch.Tensor
    last: torch.Tensor
    source: torch.Tensor
    rater: torch.Tensor | None = None


@dataclass
class LayeredOutput:
    """A forward through the cut LLM.

    Attributes:
        logits: [B, L', V] at every row of the last segment (None when only the last row was asked).
        last_logits: [B, V] at the last column.
        source: [B, L'] long, each last-segment row's column in the LLM input (-1: padding, -2: synthetic).
        segments: per segment, (mask [B, L_s] bool, rope positions) for decoding with the cache.
        layer_tokens: per sample, its visual token count after each cut.
    """

    logits: torch.Tensor | None
    last_logits: torch.Tensor
    source: torch.Tensor
    segments: list[tuple[torch.Tensor, torch.Tensor]]
    layer_tokens: list[list[int]]


def check_layer_reducer(reducer: Any, n_layers: int, mrope: bool) -> tuple[int, ...]:
    """The reducer's cut layers, validated against the model (clear errors naming the fix)."""
    layers = tuple(int(k) for k in reducer.layers)
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 1 or layers[-1] >= n_layers:
        raise ValueError(
            f"{type(reducer).__name__}.layers={list(layers)}: give strictly increasing layers in "
            f"1..{n_layers - 1} (K = decoder layers run on every token before the cut; this LLM has {n_layers})"
        )
    if reducer.positions not in ("gather", "renumber"):
        raise ValueError(f"positions must be gather or renumber, got {reducer.positions!r}")
    if mrope and reducer.positions == "renumber":
        raise ValueError(
            "positions=renumber needs 1-D RoPE; this model's M-RoPE (t, h, w) positions are always gathered"
        )
    unknown = sorted(set(reducer.requires) - set(LLM_LAYER_SIGNALS))
    if unknown:
        raise ValueError(
            f"{type(reducer).__name__} requires {unknown}; inside the LLM the signals are {list(LLM_LAYER_SIGNALS)}"
        )
    return layers


class LayerRunner:
    """Runs a model's language model in segments cut by a `types.LayerReducer` (module docstring).

    Args:
        model: the HF model (`model.model.language_model` with `layers`, `norm`, `rotary_emb`;
            `model.lm_head`).
        llm_input: the adapter's LLM-input helper (input embeddings with the visual tokens in place).
    """

    def __init__(self, model: Any, llm_input: LlmInput) -> None:
        self.model = model
        self.llm_input = llm_input
        implementation = model.config.text_config._attn_implementation
        if implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"reduction inside the LLM runs under sdpa or eager attention, not {implementation!r} "
                "(it passes 4-D masks); load the model with attn_implementation=sdpa"
            )
        self.boolean_mask = implementation == "sdpa"

    @property
    def language_model(self) -> Any:
        return self.model.model.language_model

    # ------------------------------------------------------------------ masks and positions
    def _mask(self, key_mask: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, q, Lk] mask of the last `queries` columns attending causally to the real keys."""
        keys = key_mask.shape[1]
        key_pos = torch.arange(keys, device=key_mask.device)
        query_pos = key_pos[keys - queries :]
        allowed = (key_pos[None, :] <= query_pos[:, None])[None] & key_mask[:, None, :]  # [B, q, Lk]
        allowed |= (key_pos[None, :] == query_pos[:, None])[None]  # a padding query sees itself
        if self.boolean_mask:
            return allowed[:, None]
        blocked = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
        return blocked.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    def _run(self, rows: Rows, layers: range, cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Run `layers` on all rows; returns (output, the last layer's input)."""
        language_model = self.language_model
        mask = self._mask(rows.mask, rows.mask.shape[1], rows.hidden.dtype)
        embeddings = language_model.rotary_emb(rows.hidden, rows.rope)
        hidden = before = rows.hidden
        for i in layers:
            before = hidden
            hidden = language_model.layers[i](
                hidden,
                attention_mask=mask,
                position_embeddings=embeddings,
                position_ids=None,
                cache=cache,
                use_cache=cache is not None,
            )
        return hidden, before

    # ------------------------------------------------------------------ prefill / forward
    def initial_rows(self, inputs: SplicedInputs) -> Rows:
        """The LLM input as segment 0's rows (visual tokens: every modality's placeholders)."""
        ids, mask = inputs.input_ids, inputs.attention_mask.bool()
        visual = torch.zeros_like(mask)
        for token_id in self.llm_input.token_ids.values():
            visual |= ids == token_id
        length = ids.shape[1]
        columns = torch.arange(length, device=ids.device)
        first_visual = torch.where(visual.any(-1), visual.int().argmax(-1), length)  # [B]
        end = torch.full_like(first_visual, length)
        if inputs.labels is not None:
            labelled = inputs.labels != -100
            end = torch.where(labelled.any(-1), labelled.int().argmax(-1), end)
        text = mask & ~visual & (columns[None] > first_visual[:, None]) & (columns[None] < end[:, None])
        last = columns[None] == (end - 1)[:, None]
        rope = inputs.position_ids[1:] if inputs.position_ids.dim() == 3 else inputs.position_ids
        source = torch.where(mask, columns[None].expand_as(mask), -1)
        return Rows(self.llm_input.embeddings(inputs), mask, rope, visual, text, last, source)

    def forward(
        self, reducer: Any, inputs: SplicedInputs, cache: Any = None, all_logits: bool = True
    ) -> LayeredOutput:
        """Every segment of the LLM on `inputs` (one prefill); logits of the last segment's rows."""
        language_model = self.language_model
        n_layers = len(language_model.layers)
        cuts = check_layer_reducer(reducer, n_layers, inputs.position_ids.dim() == 3)
        rows = self.initial_rows(inputs)
        if set(RATER_SIGNALS) & set(reducer.requires):  # SparseVLM's raters, once, on the LLM input
            half = getattr(reducer, "signal_precision", "float32") == "float16"
            rows = replace(rows, rater=text_raters(rows.hidden, rows.visual & rows.mask, rows.text, half))
        original = rows.visual.sum(-1)  # [B]
        bounds = (0, *cuts, n_layers)
        segments, counts = [], []
        hidden = before = rows.hidden
        for stage, (start, stop) in enumerate(itertools.pairwise(bounds)):
            if stage:
                rows = replace(rows, hidden=hidden)
                rows = self.cut(reducer, rows, before, original, start, stage - 1)
                counts.append(rows.visual.sum(-1).tolist())
            hidden, before = self._run(rows, range(start, stop), cache)
            segments.append((rows.mask, rows.rope))
        normed = language_model.norm(hidden)  # [B, L', D]
        head = self.model.lm_head
        logits = head(normed) if all_logits else None  # [B, L', V]
        last_logits = logits[:, -1] if logits is not None else head(normed[:, -1])  # [B, V]
        layer_tokens = [list(per_sample) for per_sample in zip(*counts)]
        return LayeredOutput(logits, last_logits, rows.source, segments, layer_tokens)

    def cut(
        self, reducer: Any, rows: Rows, before: torch.Tensor, original: torch.Tensor, layer: int, stage: int
    ) -> Rows:
        """After `layer` decoder layers: the reducer picks the visual tokens that stay.

        Args:
            rows: the rows with `hidden` = the output of layer `layer` - 1.
            before: [B, L, D] the input of layer `layer` - 1 (its q/k give the layer-K-1 signals).
            original: [B] the visual token counts at the LLM input.
        """
        visual = rows.visual & rows.mask  # [B, L]
        lengths = visual.sum(-1)  # [B]
        n = int(lengths.max()) if lengths.numel() else 0
        slot = torch.arange(n, device=visual.device)
        valid = slot[None] < lengths[:, None]  # [B, N]
        columns = torch.zeros(visual.shape[0], n, dtype=torch.long, device=visual.device)
        columns[valid] = visual.nonzero()[:, 1]  # [B, N] each visual token's column, row-major
        features = rows.hidden.gather(1, columns[..., None].expand(-1, -1, rows.hidden.shape[-1]))
        features = features * valid[..., None]  # [B, N, D]
        plain = tuple(name for name in reducer.requires if name not in RATER_SIGNALS)
        signals = self.signals(plain, rows, before, layer, columns, valid)
        signals.update(self.rater_signals(reducer, rows, before, layer, columns, valid))
        tokens = LayerTokens(features, lengths, original, signals, layer=layer, stage=stage)
        reduced = reducer(tokens)
        kept_columns, synthetic = self._kept_columns(reducer, reduced, columns, lengths)  # [B, M]
        keep = rows.mask & ~visual
        picked = kept_columns >= 0
        batch = torch.arange(visual.shape[0], device=visual.device)[:, None].expand_as(kept_columns)
        keep[batch[picked], kept_columns[picked]] = True
        hidden = rows.hidden.clone()
        hidden[batch[picked], kept_columns[picked]] = reduced.features[picked].to(hidden.dtype)
        rows = replace(rows, hidden=hidden)
        if bool(synthetic.any()):
            rows, keep = self._insert_synthetic(rows, keep, reduced, synthetic, columns, lengths)
        return self._gather(rows, keep, rows.hidden, reducer.positions)

    @staticmethod
    def _insert_synthetic(
        rows: Rows,
        keep: torch.Tensor,
        reduced: Reduced,
        synthetic: torch.Tensor,
        columns: torch.Tensor,
        lengths: torch.Tensor,
    ) -> tuple[Rows, torch.Tensor]:
        """`rows` (and `keep`) with the synthetic tokens placed after each sample's last visual token."""
        counts = synthetic.sum(-1)  # [B]
        width = int(counts.max())
        b, slot = synthetic.nonzero(as_tuple=True)  # row-major: each sample's synthetic tokens in order
        dest = slot - (reduced.lengths - counts)[b]  # their order among the sample's synthetic tokens
        new = torch.zeros(keep.shape[0], width, dtype=torch.bool, device=keep.device)
        new[b, dest] = True  # [B, W] real new rows
        hidden = rows.hidden.new_zeros(keep.shape[0], width, rows.hidden.shape[-1])
        hidden[b, dest] = reduced.features[b, slot].to(hidden.dtype)
        anchor = columns.new_zeros(keep.shape[0], width)  # the anchors' columns (0: renumbered anyway)
        if reduced.anchor is not None:
            anchor[b, dest] = columns[b, reduced.anchor[b, slot]]
        mrope = rows.rope.dim() == 3
        rope = rows.rope.gather(-1, anchor.expand(rows.rope.shape[0], -1, -1) if mrope else anchor)
        last_visual = columns.gather(1, (lengths - 1).clamp(min=0)[:, None])  # [B, 1]
        existing = 2 * torch.arange(keep.shape[1], device=keep.device)[None].expand_as(keep)
        order = torch.cat([existing, (2 * last_visual + 1).expand_as(new)], dim=1).argsort(dim=1, stable=True)

        def placed(values: torch.Tensor, added: torch.Tensor, axis: int = 1) -> torch.Tensor:
            joined = torch.cat([values, added], dim=axis)  # the sequence axis: `axis`, batch: axis - 1
            index = order.view(*([1] * (axis - 1)), *order.shape, *([1] * (joined.dim() - axis - 1)))
            return joined.gather(axis, index.expand_as(joined))

        flag = torch.zeros_like(new)
        rows = Rows(
            hidden=placed(rows.hidden, hidden),
            mask=placed(rows.mask, new),
            rope=placed(rows.rope, rope, axis=2 if mrope else 1),
            visual=placed(rows.visual, new),
            text=placed(rows.text, flag),
            last=placed(rows.last, flag),
            source=placed(rows.source, torch.where(new, -2, -1)),
            rater=None if rows.rater is None else placed(rows.rater, flag),
        )
        return rows, placed(keep, new)

    @staticmethod
    def _kept_columns(
        reducer: Any, reduced: Reduced, columns: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, M] the kept tokens' columns, -1 elsewhere; [B, M] bool the synthetic tokens), after
        checking the output (module docstring)."""
        index, kept = reduced.index, reduced.lengths
        m = index.shape[1]
        valid = torch.arange(m, device=index.device)[None] < kept[:, None]  # [B, M]
        name = type(reducer).__name__
        if bool((kept > lengths).any()):
            raise ValueError(
                f"{name} kept more tokens than it was given ({kept.tolist()} > {lengths.tolist()})"
            )
        synthetic = (index == -1) & valid
        real = (index >= 0) & valid
        if bool(((index < -1) & valid).any()) or bool(((index >= lengths[:, None]) & valid).any()):
            raise ValueError(f"{name} returned an index outside 0..N_b-1 (or -1 for a synthetic token)")
        if bool((synthetic[:, :-1] & real[:, 1:]).any()):
            raise ValueError(f"{name} must return its synthetic tokens (-1) after the kept ones")
        rising = index[:, 1:] > index[:, :-1]
        if bool((~rising & real[:, 1:]).any()):
            raise ValueError(f"{name} must return strictly ascending indices per sample (the sequence order)")
        if bool(synthetic.any()) and reducer.positions == "gather" and reduced.anchor is None:
            raise ValueError(
                f"{name} returned synthetic tokens under positions=gather without Reduced.anchor "
                "(the visual token whose position each one takes); set it, or use positions=renumber"
            )
        if reduced.anchor is not None:
            anchor = reduced.anchor
            if bool((synthetic & ((anchor < 0) | (anchor >= lengths[:, None]))).any()):
                raise ValueError(f"{name} returned a Reduced.anchor outside 0..N_b-1 for a synthetic token")
        safe = index.clamp(min=0).clamp(max=max(columns.shape[1] - 1, 0))
        picked = columns.gather(1, safe) if columns.shape[1] else safe
        return torch.where(real, picked, -1), synthetic

    def _gather(self, rows: Rows, keep: torch.Tensor, hidden: torch.Tensor, positions: str) -> Rows:
        """The kept rows, in order, left-padded to the longest sample."""
        counts = keep.sum(-1)  # [B]
        width = int(counts.max())
        b, col = keep.nonzero(as_tuple=True)  # row-major: each sample's kept columns ascending
        dest = (keep.cumsum(-1) - 1)[b, col] + (width - counts)[b]

        def move(values: torch.Tensor, fill: Any) -> torch.Tensor:
            out = values.new_full((values.shape[0], width, *values.shape[2:]), fill)
            out[b, dest] = values[b, col]
            return out

        mask = move(rows.mask, False)
        if positions == "renumber":
            rope = (mask.cumsum(-1) - 1).clamp(min=0)
        elif rows.rope.dim() == 3:
            rope = rows.rope.new_zeros(3, keep.shape[0], width)
            rope[:, b, dest] = rows.rope[:, b, col]
        else:
            rope = move(rows.rope, 0)
        return Rows(
            hidden=move(hidden, 0.0),
            mask=mask,
            rope=rope,
            visual=move(rows.visual, False),
            text=move(rows.text, False),
            last=move(rows.last, False),
            source=move(rows.source, -1),
            rater=None if rows.rater is None else move(rows.rater, False),
        )

    def signals(
        self,
        requires: tuple[str, ...],
        rows: Rows,
        before: torch.Tensor,
        layer: int,
        columns: torch.Tensor,
        valid: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The `LLM_LAYER_*` signals `requires` names at a cut after `layer` layers (types.py)."""
        language_model = self.language_model
        out: dict[str, torch.Tensor] = {}

        def visual_columns(probs: torch.Tensor) -> torch.Tensor:  # [B, H, L] -> [B, H, N]
            index = columns[:, None].expand(-1, probs.shape[1], -1)
            return probs.gather(2, index) * valid[:, None]

        previous = {LLM_LAYER_LAST_ATTN, LLM_LAYER_LAST_ATTN_HEADS, LLM_LAYER_TEXT_ATTN} & set(requires)
        if previous:
            query, key, scale = decoder_query_key(
                language_model.layers[layer - 1], language_model.rotary_emb, before, rows.rope
            )
            if {LLM_LAYER_LAST_ATTN, LLM_LAYER_LAST_ATTN_HEADS} & previous:
                heads = visual_columns(mean_row_attention(query, key, scale, rows.mask, rows.last))
                out[LLM_LAYER_LAST_ATTN_HEADS] = heads  # [B, H, N]
                out[LLM_LAYER_LAST_ATTN] = heads.mean(1)  # [B, N]
            if LLM_LAYER_TEXT_ATTN in previous:
                probs = mean_row_attention(query, key, scale, rows.mask, rows.text)
                out[LLM_LAYER_TEXT_ATTN] = visual_columns(probs).mean(1)  # [B, N]
        if LLM_LAYER_NEXT_LAST_ATTN in requires:
            query, key, scale = decoder_query_key(
                language_model.layers[layer], language_model.rotary_emb, rows.hidden, rows.rope
            )
            probs = mean_row_attention(query, key, scale, rows.mask, rows.last)
            out[LLM_LAYER_NEXT_LAST_ATTN] = visual_columns(probs).mean(1)  # [B, N]
        if set(LLM_LAYER_TOKEN_SIGNALS) & set(requires):
            out.update(self.token_signals(rows, before, layer, columns, valid))
        return {name: out[name] for name in requires}

    # ------------------------------------------------------------------ token signals (DART)
    def token_signals(
        self, rows: Rows, before: torch.Tensor, layer: int, columns: torch.Tensor, valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Layer `layer` - 1's keys and final-normed outputs of the visual and text tokens (types.py)."""
        language_model = self.language_model
        attention_layer = language_model.layers[layer - 1]
        _, key, _ = decoder_query_key(attention_layer, language_model.rotary_emb, before, rows.rope)
        groups = attention_layer.self_attn.num_key_value_groups
        key = key.repeat_interleave(groups, dim=1)  # [B, Hkv, L, d] -> [B, H, L, d] as repeat_kv
        key = key.transpose(1, 2).flatten(2)  # [B, L, H * d]
        normed = language_model.norm(rows.hidden).float()  # [B, L, D]
        text = rows.text & rows.mask  # [B, L]
        text_lengths = text.sum(-1)  # [B]
        width = int(text_lengths.max()) if text_lengths.numel() else 0
        text_valid = torch.arange(width, device=text.device)[None] < text_lengths[:, None]  # [B, T]
        text_columns = torch.zeros(text.shape[0], width, dtype=torch.long, device=text.device)
        text_columns[text_valid] = text.nonzero()[:, 1]

        def take(values: torch.Tensor, where: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
            picked = values.gather(1, where[..., None].expand(-1, -1, values.shape[-1]))
            return picked * present[..., None]

        return {
            LLM_LAYER_KEYS: take(key, columns, valid),
            LLM_LAYER_NORMED: take(normed, columns, valid),
            LLM_LAYER_TEXT_KEYS: take(key, text_columns, text_valid),
            LLM_LAYER_TEXT_NORMED: take(normed, text_columns, text_valid),
            LLM_LAYER_TEXT_LENGTHS: text_lengths,
        }

    def rater_signals(
        self,
        reducer: Any,
        rows: Rows,
        before: torch.Tensor,
        layer: int,
        columns: torch.Tensor,
        valid: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """SparseVLM's rater signals (`types.RATER_SIGNALS`) the reducer requires, from layer `layer` - 1."""
        wanted = [name for name in RATER_SIGNALS if name in reducer.requires]
        if not wanted:
            return {}
        half = getattr(reducer, "signal_precision", "float32") == "float16"
        language_model = self.language_model
        query, key, scale = decoder_query_key(
            language_model.layers[layer - 1], language_model.rotary_emb, before, rows.rope
        )
        probs, counts = row_attention(query, key, scale, rows.mask, rows.rater, half)  # [B, R, L], [B]
        index = columns[:, None].expand(-1, probs.shape[1], -1)
        per_row = probs.gather(2, index) * valid[:, None]  # [B, R, N]
        mean = per_row.sum(1) / counts.clamp(min=1)[:, None]
        out = {
            LLM_LAYER_RATER_ATTN_ROWS: per_row,
            LLM_LAYER_RATER_ATTN: mean.half().float() if half else mean,
        }
        return {name: out[name] for name in wanted}

    # ------------------------------------------------------------------ loss and generation
    def loss(self, reducer: Any, inputs: SplicedInputs) -> torch.Tensor:
        """Mean cross-entropy over the labelled tokens (they and their predecessors are never cut)."""
        out = self.forward(reducer, inputs)
        labels = torch.where(out.source >= 0, inputs.labels.gather(1, out.source.clamp(min=0)), -100)
        logits = out.logits[:, :-1].float()  # [B, L'-1, V]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )

    def bound(self, reducer: Any) -> BoundGenerator:
        """An object with `generate(**kwargs)` and `device`, as `timing.generate_answers` takes."""
        return BoundGenerator(self, reducer)

    @torch.no_grad()
    def generate(
        self,
        reducer: Any,
        inputs: SplicedInputs,
        max_new_tokens: int,
        pad_token_id: int,
        eos_token_id: int | None,
        logits_processor: Any = None,
    ) -> tuple[torch.Tensor, list[list[int]]]:
        """Greedy decoding with the KV cache; returns ([B, L + T] ids as `generate` does, layer_tokens)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.forward(reducer, inputs, cache=cache, all_logits=False)
        segments = [(mask, rope) for mask, rope in out.segments]
        bounds = (0, *reducer.layers, len(self.language_model.layers))
        ids = inputs.input_ids
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        scores = out.last_logits
        embed = self.model.get_input_embeddings()
        for step in range(max_new_tokens):
            if logits_processor is not None:
                scores = logits_processor(ids, scores)
            token = scores.argmax(-1)  # [B]
            token = torch.where(done, pad_token_id, token)
            ids = torch.cat([ids, token[:, None]], dim=-1)
            if eos_token_id is not None:
                done |= token == eos_token_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            hidden = embed(token)[:, None]  # [B, 1, D]
            for s, (start, stop) in enumerate(itertools.pairwise(bounds)):
                mask, rope = segments[s]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                rope = torch.cat([rope, rope[..., -1:] + 1], dim=-1)
                segments[s] = (mask, rope)
                attention = self._mask(mask, 1, hidden.dtype)
                embeddings = self.language_model.rotary_emb(hidden, rope[..., -1:])
                for i in range(start, stop):
                    hidden = self.language_model.layers[i](
                        hidden,
                        attention_mask=attention,
                        position_embeddings=embeddings,
                        position_ids=None,
                        cache=cache,
                        use_cache=True,
                    )
            scores = self.model.lm_head(self.language_model.norm(hidden[:, -1]))  # [B, V]
        return ids, out.layer_tokens


class BoundGenerator:
    """A `LayerRunner` with its reducer, shaped like an HF model for `timing.generate_answers`."""

    def __init__(self, runner: LayerRunner, reducer: Any) -> None:
        self.runner = runner
        self.reducer = reducer
        self.layer_tokens: list[list[int]] = []

    @property
    def device(self) -> torch.device:
        return self.runner.model.device

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        pad_token_id: int,
        position_ids: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        logits_processor: Any = None,
        eos_token_id: int | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Greedy generation like `model.generate` (sampling and beam search are refused)."""
        unsupported = {k: v for k, v in options.items() if _SUPPORTED_GENERATE.get(k, object()) != v}
        if unsupported:
            raise ValueError(
                f"reduction inside the LLM decodes greedily; unsupported generate options {unsupported}"
            )
        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        inputs = SplicedInputs(input_ids, attention_mask, position_ids, mm_encoder_outputs or {}, [])
        if eos_token_id is None:
            eos_token_id = self.runner.llm_input.tokenizer.eos_token_id
        ids, self.layer_tokens = self.runner.generate(
            self.reducer, inputs, max_new_tokens, pad_token_id, eos_token_id, logits_processor
        )
        return ids
