"""The LLM-input core every adapter shares (the splice, positions, LLM-input signals), and views.

`assemble` is the one splice: left padding, attention mask, positions, labels and the `Block` of
every image / video; `gathered_positions` takes a reduced splice's positions from the unreduced
one; `LlmInput` computes the LLM-input signals and the model's input embeddings.

A *view* is one patch grid the reducer sees as one sample: a Qwen frame group, a LLaVA-OneVision
base crop, high-resolution canvas or video frame. Views with the same grid are reduced together
in one batched reducer call (reducers are batch-invariant by default, so grouping does not change
what any view keeps); the results come back per view, in the original order.

Reduction at the LLM input (reducers that read `types.LLM_SIGNALS`, e.g. the explainability
mapper): the adapter splices every visual token first, and its splice records where each image or
video sits (`Block`). `LlmInput` computes the signals of such an unreduced splice per block
(`llm_text_attn` from layer 0's q/k under any attention backend; `relevance` by GAE), and
`reduce_items` reduces each image or video as *one* sequence (a video: all its frames, frame-major),
the image mapper on images and the video mapper on videos (`modality_reducer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune.models.signals import decoder_query_key, text_to_visual_attention
from tokenprune.models.timing import generated_lengths
from tokenprune.types import (
    LLM_SIGNALS,
    LLM_TEXT_ATTN,
    RELEVANCE,
    VIT_CLS_ATTN,
    VIT_KEYS,
    Reducer,
    Video,
    VisualTokens,
)

MODALITIES = ("image", "video")


@dataclass
class View:
    """One patch grid of one image or video, before reduction.

    Attributes:
        features: [N, D] one row per patch, raster order of `grid`.
        grid: (H, W) with H * W == N.
        signals: per-patch tensors ([N] or [N, C]) under the signal names of tokenprune.types.
    """

    features: torch.Tensor  # [N, D]
    grid: tuple[int, int]
    signals: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ReducedView:
    """A view after reduction.

    Attributes:
        features: [k, D] the kept (or merged) tokens.
        index: [k] long; the source patch of each token (-1: synthetic, e.g. PruMerge's extra token).
        unchanged: the reducer returned its input as is (the identity, e.g. `none` or a keep-all budget).
    """

    features: torch.Tensor  # [k, D]
    index: torch.Tensor  # [k]
    unchanged: bool


@dataclass
class Block:
    """Where one image or video sits in a splice, and which of its tokens a reducer at the LLM input sees.

    Attributes:
        sample: its batch row.
        first: the column of its first placeholder (left padding included).
        count: its placeholder tokens.
        modality: "image" | "video".
        item: its index among the batch's images (videos), flat in sample order.
        grid: (frames, rows, cols) of the tokens a reducer at the LLM input sees of the *unreduced*
            item (Qwen: merged grid per frame group; a video has frames > 1).
        columns: [n] long, those tokens' offsets in the block; None: every token (LLaVA-OneVision
            leaves out its newline tokens, which are layout, not content).
    """

    sample: int
    first: int
    count: int
    modality: str
    item: int
    grid: tuple[int, int, int]
    columns: torch.Tensor | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.modality, self.item


@dataclass
class SplicedInputs:
    """What the LLM receives after the splice (left-padded batch).

    Attributes:
        position_ids: [B, L] (1-D RoPE) or [4, B, L] (Qwen M-RoPE: text row, then t/h/w).
        visual_tokens: per sample, the visual placeholder tokens the LLM sees.
        labels: [B, L] answer token ids, -100 elsewhere (teacher forcing), or None.
        blocks: every image and video of the batch, in sample and prompt order.
        gathered_positions: 1-D position_ids taken from the unreduced sequence (gaps), which
            `generate` must be given (otherwise it derives them from the attention mask).
    """

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor
    mm_encoder_outputs: dict[str, BaseModelOutputWithPooling]
    visual_tokens: list[int]
    labels: torch.Tensor | None = None  # [B, L]
    blocks: list[Block] = field(default_factory=list)
    gathered_positions: bool = False

    def as_kwargs(self) -> dict:
        kwargs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }
        if self.mm_encoder_outputs:
            kwargs["mm_encoder_outputs"] = self.mm_encoder_outputs
        if self.labels is not None:
            kwargs["labels"] = self.labels
        return kwargs

    def generate_kwargs(self) -> dict:
        """The inputs as `generate` takes them: position ids only when gathered from the unreduced
        sequence or M-RoPE ([4, B, L]; generate continues each row by +1 per step); otherwise
        generate derives them from the attention mask. No labels."""
        kwargs = self.as_kwargs()
        kwargs.pop("labels", None)
        if not self.gathered_positions and self.position_ids.dim() == 2:
            kwargs.pop("position_ids")
        return kwargs


def reduce_views(reducer: Reducer, views: Sequence[View]) -> list[ReducedView]:
    """Run `reducer` over `views`, one batched call per distinct grid; results in the views' order.

    Raises:
        ValueError: the reducer requires a signal these views do not carry (the vision side computes
            vit_cls_attn / vit_keys; LLM-input signals exist only on the adapters' LLM-input path).
    """
    if not views:
        return []
    available = set(views[0].signals)
    missing = sorted(set(reducer.requires) - available)
    if missing:
        raise ValueError(
            f"{type(reducer).__name__} requires signals {missing} that this adapter does not compute "
            f"here (the vision side computes {sorted({VIT_CLS_ATTN, VIT_KEYS})}; the LLM-input signals "
            f"{list(LLM_SIGNALS)} are computed when the reducer runs at the LLM input)"
        )
    groups: dict[tuple[int, int], list[int]] = {}
    for i, view in enumerate(views):
        groups.setdefault(view.grid, []).append(i)
    out: list[ReducedView | None] = [None] * len(views)
    for grid, members in groups.items():
        names = sorted(views[members[0]].signals)
        features = torch.stack([views[i].features for i in members])  # [V, N, D]
        signals = {name: torch.stack([views[i].signals[name] for i in members]) for name in names}
        tokens = VisualTokens(features=features, grid=grid, signals=signals).require_finite()
        reduced = reducer(tokens)
        unchanged = reduced.features is tokens.features
        for row, (i, n) in enumerate(zip(members, reduced.lengths.tolist())):
            out[i] = ReducedView(reduced.features[row, :n], reduced.index[row, :n], unchanged)
    return out  # type: ignore[return-value]


def video_frames(
    video: Video | Sequence[Image.Image] | np.ndarray | torch.Tensor,
) -> tuple[list[Image.Image], float | None]:
    """A video input as RGB PIL frames and its fps (None when not given).

    Accepts a `Video`, a list of frames (PIL images or [H, W, 3] uint8 arrays), or a [T, H, W, 3]
    uint8 array / tensor.
    """
    fps = None
    if isinstance(video, Video):
        video, fps = video.frames, video.fps
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"a video array must be [T, H, W, 3], got shape {video.shape}")
        frames = [Image.fromarray(np.ascontiguousarray(frame).astype(np.uint8)) for frame in video]
    else:
        frames = [
            Image.fromarray(np.asarray(frame).astype(np.uint8))
            if not isinstance(frame, Image.Image)
            else frame.convert("RGB")
            for frame in video
        ]
    if not frames:
        raise ValueError("a video needs at least one frame")
    return frames, fps


def left_pad(rows: Sequence[Sequence[int]], fill: int, device: torch.device) -> torch.Tensor:
    """Left-pad integer rows to the longest one -> [B, L]."""
    width = max(len(r) for r in rows)
    return torch.tensor([[fill] * (width - len(r)) + list(r) for r in rows], device=device)


def assemble(
    rows: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]] | None,
    placed: Sequence[tuple],
    outputs: dict[str, BaseModelOutputWithPooling],
    pad: int,
    device: torch.device,
) -> SplicedInputs:
    """The one splice core every adapter ends with: left padding, mask, 1-D positions, labels, blocks.

    Args:
        rows: per sample, its token ids with every visual token's placeholder in place.
        targets: per sample, its labels (-100: not trained), aligned with `rows`; None: no labels.
        placed: per image / video in sample and prompt order, the `Block` fields with `first`
            counted in the unpadded row: (sample, first, count, modality, item, grid[, columns]).
        outputs: the visual tokens per modality (`mm_encoder_outputs`).
        pad: the pad token id.

    Returns:
        the spliced inputs with position ids = the mask's cumsum (an M-RoPE adapter replaces them).
    """
    input_ids = left_pad(rows, pad, device)  # [B, L]
    attention_mask = left_pad([[1] * len(r) for r in rows], 0, device)  # [B, L]
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # [B, L]
    labels = None if targets is None else left_pad(targets, -100, device)  # [B, L]
    width = input_ids.shape[1]
    blocks = [Block(b, width - len(rows[b]) + at, *rest) for b, at, *rest in placed]
    visual = [sum(k.count for k in blocks if k.sample == b) for b in range(len(rows))]
    return SplicedInputs(input_ids, attention_mask, position_ids, outputs, visual, labels, blocks)


# ---------------------------------------------------------------------------------------------
# Reduction at the LLM input


def modality_reducer(reducer: Reducer, modality: str) -> Reducer:
    """The reducer for one modality: `reducer.for_modality(modality)` when it has one (the
    explainability mapper keeps one mapper per modality), else the reducer itself."""
    pick = getattr(reducer, "for_modality", None)
    return reducer if pick is None else pick(modality)


def block_rows(inputs: SplicedInputs) -> torch.Tensor:
    """[I, L] bool: per block, the query rows `llm_text_attn` averages: the real tokens after the block
    that are not visual (any block's placeholders excluded) and come before the first labelled
    (answer) token."""
    mask = inputs.attention_mask.bool()  # [B, L]
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device)
    visual = torch.zeros_like(mask)
    for block in inputs.blocks:
        visual[block.sample, block.first : block.first + block.count] = True
    text = mask & ~visual
    if inputs.labels is not None:
        labelled = inputs.labels != -100
        first = torch.where(labelled.any(-1), labelled.int().argmax(-1), length)  # [B]
        text &= positions[None] < first[:, None]
    rows = [text[block.sample] & (positions >= block.first + block.count) for block in inputs.blocks]
    return torch.stack(rows) if rows else text[:0]


def _columns(values: torch.Tensor, block: Block) -> torch.Tensor:
    return values if block.columns is None else values[block.columns.to(values.device)]


class LlmInput:
    """The LLM-input signals of a splice that records its blocks (every adapter), and its embeddings.

    Per block of an *unreduced* splice, restricted to the block's `columns`:

    * `text_attention`: `llm_text_attn`, layer 0's attention from the text after the block to its
      tokens, averaged over those rows (`block_rows`) and all query heads; computed from layer 0's
      input norm, q/k projections and the model's own rotary embedding (1-D, or M-RoPE with the
      splice's (t, h, w) rows) at the splice's positions, in float32, whatever backend the LLM runs.
    * `answer_relevance`: GAE relevance of given answer tokens (`tokenprune.models.gae`), each
      sample alone, its answer teacher-forced after the prompt at positions continuing the prompt's.

    Args:
        model: the HF model (`model.model.language_model` has `layers` and `rotary_emb`).
        tokenizer: its tokenizer (pad and eos ids).
        token_ids: placeholder token id per modality ("image", "video").
        generate_kwargs: the adapter's spliced inputs -> `model.generate` keyword arguments.
    """

    def __init__(
        self,
        model,
        tokenizer,
        token_ids: dict[str, int],
        generate_kwargs: Callable[[SplicedInputs], dict],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.token_ids = token_ids
        self.generate_kwargs = generate_kwargs

    @property
    def language_model(self):
        return self.model.model.language_model

    def embeddings(self, inputs: SplicedInputs) -> torch.Tensor:
        """The LLM's input [B, L, D]: token embeddings with each modality's tokens scattered in (as the model does)."""
        embeds = self.model.get_input_embeddings()(inputs.input_ids)  # [B, L, D]
        for modality, token_id in self.token_ids.items():
            output = inputs.mm_encoder_outputs.get(modality)
            if output is None:
                continue
            visual = torch.cat([f.reshape(-1, f.shape[-1]) for f in output.pooler_output])  # [sum k, D]
            mask = (inputs.input_ids == token_id).unsqueeze(-1)  # [B, L, 1]
            embeds = embeds.masked_scatter(mask, visual.to(embeds.device, embeds.dtype))
        return embeds

    @torch.no_grad()
    def text_attention(self, inputs: SplicedInputs) -> list[torch.Tensor]:
        """`llm_text_attn` of an unreduced splice: per block, [n] float32 over its `columns`."""
        if not inputs.blocks:
            return []
        language_model = self.language_model
        positions = inputs.position_ids
        if positions.dim() == 3:  # M-RoPE [4, B, L]: row 0 only builds the mask; rotate by t/h/w
            positions = positions[-3:]
        query, key, scale = decoder_query_key(
            language_model.layers[0], language_model.rotary_emb, self.embeddings(inputs), positions
        )
        blocks = [(block.sample, block.first, block.count) for block in inputs.blocks]
        attention = text_to_visual_attention(
            query, key, scale, inputs.attention_mask, blocks, block_rows(inputs)
        )  # [I, max n]
        return [_columns(attention[i, : block.count], block) for i, block in enumerate(inputs.blocks)]

    def answer_relevance(
        self, inputs: SplicedInputs, answer_ids: Sequence[Sequence[int]], target: str = "logit"
    ) -> list[torch.Tensor]:
        """GAE relevance of each sample's answer for its visual tokens: per block, [n] float32 over its `columns`.

        Args:
            inputs: an unreduced splice of the prompts only (no labels).
            answer_ids: per sample, the answer tokens to explain, each at the position predicting it.
            target: the differentiated score: "logit" (GAE's convention) or "logprob".
        """
        from tokenprune.models.gae import relevance_row

        with torch.no_grad():
            embeds = self.embeddings(inputs)  # [B, L, D]
        embed = self.model.get_input_embeddings()
        out = [embeds.new_zeros(block.count, dtype=torch.float32) for block in inputs.blocks]
        for b, answer in enumerate(answer_ids):
            mine = [i for i, block in enumerate(inputs.blocks) if block.sample == b]
            if not mine or not answer:
                continue
            valid = inputs.attention_mask[b].bool()  # left padding dropped
            offset = int((~valid).sum())
            with torch.no_grad():
                answer_embeds = embed(torch.tensor(list(answer), device=embeds.device))  # [T, D]
            sequence = torch.cat([embeds[b, valid], answer_embeds])  # [S, D]
            prompt = inputs.position_ids[..., b, :][..., valid]  # [S0] or [4, S0]
            steps = torch.arange(1, len(answer) + 1, device=prompt.device)
            positions = torch.cat([prompt, prompt[..., -1:] + steps], -1).unsqueeze(-2)  # [1, S] / [4, 1, S]
            targets = [(int(valid.sum()) - 1 + t, int(y)) for t, y in enumerate(answer)]
            row = relevance_row(
                self.model, self.language_model, sequence[None], positions, targets, target
            )  # [S]
            for i in mine:
                first = inputs.blocks[i].first - offset
                out[i] = row[first : first + inputs.blocks[i].count]
        return [_columns(values, block) for values, block in zip(out, inputs.blocks)]

    @torch.no_grad()
    def greedy_answer_ids(self, inputs: SplicedInputs, max_new_tokens: int) -> list[list[int]]:
        """The model's greedy answer to each prompt of a splice: token ids up to and including EOS."""
        kwargs = self.generate_kwargs(inputs)
        kwargs.pop("labels", None)
        output = self.model.generate(
            **kwargs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        new_tokens = output[:, inputs.input_ids.shape[1] :]
        lengths = generated_lengths(new_tokens, self.tokenizer.eos_token_id)
        return [row[:n].tolist() for row, n in zip(new_tokens, lengths)]

    def signals(
        self,
        reducer: Reducer,
        full: SplicedInputs,
        prompt_inputs: Callable[[], SplicedInputs],
        answer_ids: Sequence[Sequence[int]] | None,
    ) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
        """The LLM-input signals `reducer` requires, per (modality, item).

        Args:
            full: the unreduced splice the model would get (answers included when training).
            prompt_inputs: builds an unreduced splice of the prompts only, from tensors usable by
                autograd (explain_oracle: the answer is generated and explained on it).
            answer_ids: per sample, the given answers (training inputs); None: the oracle explains
                the unreduced model's greedy answer (`reducer.answer_tokens` at most).
        """
        out: dict[tuple[str, int], dict[str, torch.Tensor]] = {block.key: {} for block in full.blocks}
        if LLM_TEXT_ATTN in reducer.requires:
            for block, values in zip(full.blocks, self.text_attention(full)):
                out[block.key][LLM_TEXT_ATTN] = values
        if RELEVANCE in reducer.requires:
            with torch.inference_mode(False):  # generate() runs under inference mode; GAE needs autograd
                inputs = prompt_inputs()
                if answer_ids is None:
                    answer_ids = self.greedy_answer_ids(inputs, int(getattr(reducer, "answer_tokens", 16)))
                if not getattr(reducer, "include_eos", False):
                    eos = self.tokenizer.eos_token_id
                    answer_ids = [[t for t in ids if t != eos] for ids in answer_ids]
                target = str(getattr(reducer, "target", "logit"))
                relevance = self.answer_relevance(inputs, answer_ids, target=target)
            for block, values in zip(inputs.blocks, relevance):
                out[block.key][RELEVANCE] = values
        return out


def reduce_items(
    reducer: Reducer,
    modality: str,
    features: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int, int]],
    signals: dict[tuple[str, int], dict[str, torch.Tensor]],
) -> list[ReducedView]:
    """Reduce each image (video) of a batch as one sequence at the LLM input.

    Args:
        reducer: the adapter's reducer (`modality_reducer` picks the modality's own).
        modality: "image" | "video".
        features: per item, [N, D] the LLM-space tokens a reducer sees, frame-major.
        grids: per item, (frames, rows, cols) with frames * rows * cols == N; the reducer sees the
            grid (frames * rows, cols) (frames stacked).
        signals: per (modality, item), its LLM-input signals ([N] each).

    Returns:
        per item a `ReducedView` whose `index` names the source token of each kept one (a synthetic
        token, index -1, gets the grid's centre token); `unchanged` when the reducer kept the input.
    """
    views = [
        View(f, (g[0] * g[1], g[2]), signals[(modality, i)]) for i, (f, g) in enumerate(zip(features, grids))
    ]
    out = []
    for view, result in zip(views, reduce_views(modality_reducer(reducer, modality), views)):
        rows, cols = view.grid
        centre = (rows // 2) * cols + cols // 2
        out.append(
            ReducedView(
                result.features, torch.where(result.index >= 0, result.index, centre), result.unchanged
            )
        )
    return out


def gathered_positions(
    full: SplicedInputs, reduced: SplicedInputs, sources: dict[tuple[str, int], torch.Tensor]
) -> torch.Tensor:
    """Position ids of a reduced splice taken from the unreduced one (same prompts and answers).

    The text keeps its positions; token j of a block takes the position of offset sources[key][j] in
    the unreduced block; left padding gets 0. Works for [B, L] and [4, B, L] position ids.
    """
    out = torch.zeros_like(reduced.position_ids)  # [..., B, L']
    for b in range(full.input_ids.shape[0]):
        valid = full.attention_mask[b].bool()
        positions = full.position_ids[..., b, :]  # [..., L]
        pieces, cursor = [], 0
        for block in sorted((k for k in full.blocks if k.sample == b), key=lambda k: k.first):
            pieces.append(positions[..., cursor : block.first][..., valid[cursor : block.first]])
            pieces.append(positions[..., block.first + sources[block.key].to(positions.device)])
            cursor = block.first + block.count
        pieces.append(positions[..., cursor:][..., valid[cursor:]])
        row = torch.cat(pieces, -1)
        if row.shape[-1] != int(reduced.attention_mask[b].sum()):
            raise RuntimeError("gathered positions do not match the reduced splice")
        out[..., b, out.shape[-1] - row.shape[-1] :] = row
    return out
