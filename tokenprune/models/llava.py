"""Adapter for `LlavaForConditionalGeneration` (LLaVA-1.5 7B/13B and the tiny test model).

The adapter owns every model internal: it runs the CLIP tower to the layers it needs, computes
the signals the reducer asks for, applies the reducer before ("vision") or after ("llm") the
projector, and splices each sample's reduced tokens into the LLM input with its own count of
`<image>` placeholders (transformers' `mm_encoder_outputs` path, for `forward` and `generate`).

A reducer that reads a signal of the LLM input (`llm_text_attn`, `relevance`: `types.LLM_SIGNALS`)
runs at the LLM input instead: the unreduced sequence is spliced first, the signal is computed on it
(layer 0's q/k under any attention backend; the relevance by GAE, `tokenprune.explain.gae`), the
reducer runs on the projected tokens and the kept ones are spliced again (`_prepare_at_llm_input`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune.models._loading import hub_error, resolve_checkpoint, resolve_device, resolve_dtype
from tokenprune.models.signals import (
    clip_cls_attention,
    clip_feature_layer_signals,
    decoder_query_key,
    text_to_visual_attention,
)
from tokenprune.models.timing import generate_answers, generated_lengths
from tokenprune.reducers.baselines import NoReduction
from tokenprune.types import (
    FEATURE_LAYER_SIGNALS,
    LLM_SIGNALS,
    LLM_TEXT_ATTN,
    RELEVANCE,
    VIT_CLS_ATTN,
    VIT_KEYS,
    Reduced,
    Reducer,
    VisualTokens,
)

# LLaVA-1.5's vicuna_v1 conversation format, as its training and eval scripts render it.
LLAVA15_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA15_PROMPT = LLAVA15_SYSTEM + " USER: {images}{question} ASSISTANT:"
IMAGE_ASPECTS = ("pad", "crop")


@dataclass
class EncodedImages:
    """Reduced visual tokens of a flat list of images, ready for the LLM."""

    features: list[torch.Tensor]  # per image [k_i, D_llm]
    index: list[torch.Tensor]  # per image [k_i] source patch (-1 synthetic)
    grid: tuple[int, int]


@dataclass
class ModelInputs:
    """What the LLM receives after the splice (left-padded batch)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    mm_encoder_outputs: dict[str, BaseModelOutputWithPooling]
    visual_tokens: list[int]  # per sample: visual tokens given to the LLM
    labels: torch.Tensor | None = None  # [B, L] answer token ids, -100 elsewhere
    gathered_positions: bool = False  # position_ids are not the mask's cumsum (kept from the unreduced input)

    def as_kwargs(self) -> dict:
        kwargs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "mm_encoder_outputs": self.mm_encoder_outputs,
        }
        if self.labels is not None:
            kwargs["labels"] = self.labels
        return kwargs


class LlavaAdapter:
    """LLaVA (CLIP + projector + LLM) with a visual-token reducer in the loop."""

    family = "llava"

    def __init__(
        self,
        model,
        processor,
        reducer: Reducer | None = None,
        prompt: str = LLAVA15_PROMPT,
        image_aspect: str = "crop",
    ) -> None:
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
        config = model.config
        if config.vision_feature_select_strategy != "default" or not isinstance(
            config.vision_feature_layer, int
        ):
            raise ValueError(
                "LlavaAdapter supports vision_feature_select_strategy='default' with one vision_feature_layer "
                f"(LLaVA-1.5); got {config.vision_feature_select_strategy!r}, {config.vision_feature_layer!r}"
            )
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.reducer = reducer if reducer is not None else NoReduction()
        self.prompt = prompt
        self.image_aspect = image_aspect
        self.image_token_id = config.image_token_id
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; set one in the checkpoint's tokenizer_config.json"
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        reducer: Reducer | None = None,
        dtype: str = "bfloat16",
        attn_implementation: str = "sdpa",
        device: str = "auto",
        prompt: str = LLAVA15_PROMPT,
        image_aspect: str = "crop",
        build: str | None = None,
    ) -> LlavaAdapter:
        """Load a LLaVA checkpoint (local folder or hub id in the HF cache).

        Args:
            path: checkpoint folder or hub id (e.g. llava-hf/llava-1.5-7b-hf).
            reducer: the visual-token reducer (None: no reduction).
            dtype: float32 | float16 | bfloat16 | float64.
            attn_implementation: sdpa | flash_attention_2 | eager (for the whole model).
            device: auto | cpu | cuda | cuda:N.
            prompt: the conversation format; `{images}` becomes one "<image>\\n" per image.
            image_aspect: "pad" pads each image to a square with the processor's mean colour
                before resizing (LLaVA-1.5's `image_aspect_ratio=pad`, used in its training and
                most of its evals); "crop" is the HF processor's resize + centre crop.
            build: name of a tiny test model to build at `path` when it is missing (tokenprune.models.tiny).
        """
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        source = resolve_checkpoint(path, build)
        try:
            processor = AutoProcessor.from_pretrained(source)
            model = LlavaForConditionalGeneration.from_pretrained(
                source, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
            )
        except OSError as error:
            raise hub_error(path, error) from error
        model.to(resolve_device(device)).eval()
        return cls(model, processor, reducer=reducer, prompt=prompt, image_aspect=image_aspect)

    # ------------------------------------------------------------------ vision side
    @property
    def device(self) -> torch.device:
        return self.model.device

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> pixel_values [I, 3, S, S] on the model's device and dtype."""
        images = [image.convert("RGB") for image in images]
        if self.image_aspect == "pad":
            images = [pad_to_square(image, self.processor.image_processor.image_mean) for image in images]
        pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return pixel_values.to(self.device, self.model.dtype)

    def visual_tokens(self, pixel_values: torch.Tensor) -> VisualTokens:
        """Run the CLIP tower only as deep as needed; features before the projector plus signals."""
        tower = self.model.model.vision_tower
        layers = tower.encoder.layers
        n_layers = len(layers)
        feature_layer = self.model.config.vision_feature_layer
        feature_depth = feature_layer if feature_layer >= 0 else n_layers + 1 + feature_layer
        wants_signals = any(name in self.reducer.requires for name in (VIT_CLS_ATTN, VIT_KEYS))
        depth = max(feature_depth, n_layers - 1) if wants_signals else feature_depth
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))  # [I, N+1, C]
        states = [hidden]
        for layer in layers[:depth]:
            hidden = layer(hidden, attention_mask=None)
            states.append(hidden)
        signals = {}
        if wants_signals:
            signals[VIT_CLS_ATTN], signals[VIT_KEYS] = clip_cls_attention(layers[-1], states[n_layers - 1])
        if any(name in self.reducer.requires for name in FEATURE_LAYER_SIGNALS):
            if feature_depth == 0:
                raise ValueError("vision_feature_layer 0 (the embeddings) has no attention for the signals")
            computed = clip_feature_layer_signals(
                layers[feature_depth - 1], states[feature_depth - 1], states[feature_depth]
            )
            signals.update(
                {k: v for k, v in zip(FEATURE_LAYER_SIGNALS, computed) if k in self.reducer.requires}
            )
        missing = set(self.reducer.requires) - set(signals) - {VIT_CLS_ATTN, VIT_KEYS, *LLM_SIGNALS}
        if missing:
            raise ValueError(
                f"{type(self.reducer).__name__} requires signals {sorted(missing)} that the LLaVA adapter "
                f"does not compute; available: {[VIT_CLS_ATTN, VIT_KEYS, *FEATURE_LAYER_SIGNALS]}"
            )
        features = states[feature_depth][:, 1:]  # [I, N, C] drop CLS ("default" strategy)
        return VisualTokens(features=features, grid=self.grid, signals=signals)

    def encode_images(self, pixel_values: torch.Tensor) -> EncodedImages:
        """pixel_values [I, 3, S, S] -> per-image reduced LLM-space tokens."""
        projector = self.model.model.multi_modal_projector
        tokens = self.visual_tokens(pixel_values)
        if self.reducer.space == "vision":
            reduced = self.reducer(tokens)
            projected = projector(reduced.features)  # [I, M, D_llm]
        else:
            projected_tokens = VisualTokens(projector(tokens.features), tokens.grid, tokens.signals)
            reduced = self.reducer(projected_tokens)
            projected = reduced.features
        lengths = reduced.lengths.tolist()
        return EncodedImages(
            features=[f[:n] for f, n in zip(projected, lengths)],
            index=[i[:n] for i, n in zip(reduced.index, lengths)],
            grid=tokens.grid,
        )

    # ------------------------------------------------------------------ text side
    def format_prompt(self, question: str, n_images: int) -> str:
        return self.prompt.format(images="<image>\n" * n_images, question=question)

    def splice(
        self,
        prompts: Sequence[str | Sequence[tuple[str, bool]]],
        counts: Sequence[Sequence[int]],
        features: list[torch.Tensor],
        answers: Sequence[str] | None = None,
    ) -> ModelInputs:
        """Tokenize prompts and give image j of sample b exactly counts[b][j] placeholders.

        Args:
            prompts: one per sample with one "<image>" per image: a string (no labels), or a
                conversation as (text, trained) segments, tokenized one by one (special tokens
                only for the first); the trained segments' tokens are labels, -100 elsewhere.
            counts: per sample, the kept token count of each of its images.
            features: per image (flat, in sample order) [k_i, D_llm].
            answers: per sample, the assistant's reply for teacher forcing; it is appended
                (" " + answer + eos) and is labelled (with a string prompt, the only labelled part).
        """
        rows, targets = [], []
        for b, (prompt, sample_counts) in enumerate(zip(prompts, counts)):
            segments = [(prompt, False)] if isinstance(prompt, str) else prompt
            ids: list[int] = []
            labels: list[int] = []
            for i, (text, trained) in enumerate(segments):
                piece = self.tokenizer(text, add_special_tokens=i == 0)["input_ids"]
                ids += piece
                labels += piece if trained else [-100] * len(piece)
            slots = sum(token == self.image_token_id for token in ids)
            if slots != len(sample_counts):
                raise ValueError(
                    f"prompt has {slots} <image> tokens but {len(sample_counts)} images: {prompt!r}"
                )
            remaining = iter(sample_counts)
            expanded: list[int] = []
            expanded_labels: list[int] = []
            for token, label in zip(ids, labels):
                if token == self.image_token_id:  # placeholders are never labels
                    n = next(remaining)
                    expanded += [token] * n
                    expanded_labels += [-100] * n
                else:
                    expanded.append(token)
                    expanded_labels.append(label)
            answer = [] if answers is None else self._answer_ids(answers[b])
            rows.append(expanded + answer)
            targets.append(expanded_labels + answer)
        labelled = answers is not None or any(not isinstance(p, str) for p in prompts)
        return self._pad(rows, [sum(c) for c in counts], features, targets if labelled else None)

    def _answer_ids(self, answer: str) -> list[int]:
        return [
            *self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"],
            self.tokenizer.eos_token_id,
        ]

    def _pad(
        self,
        rows: list[list[int]],
        visual: list[int],
        features: list[torch.Tensor],
        targets: list[list[int]] | None,
    ) -> ModelInputs:
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id

        def left_pad(values: list[list[int]], fill: int) -> torch.Tensor:
            return torch.tensor([[fill] * (width - len(v)) + v for v in values], device=self.device)

        input_ids = left_pad(rows, pad)  # [B, L]
        attention_mask = left_pad([[1] * len(r) for r in rows], 0)  # [B, L]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
        labels = None if targets is None else left_pad(targets, -100)  # [B, L]
        outputs = {"image": BaseModelOutputWithPooling(pooler_output=features)} if features else {}
        return ModelInputs(input_ids, attention_mask, position_ids, outputs, visual, labels)

    def prepare(
        self,
        questions: Sequence[str],
        images: Sequence[Sequence[Image.Image]],
        answers: Sequence[str] | None = None,
    ) -> ModelInputs:
        """Questions and their images (and answers, for training) -> the reduced, spliced LLM inputs."""
        prompts = [self.format_prompt(q, len(sample)) for q, sample in zip(questions, images)]
        if self.reduces_at_llm_input:
            return self._prepare_at_llm_input(prompts, images, answers)
        counts, features = self._encode_samples(images)
        return self.splice(prompts, counts, features, answers)

    def _encode_samples(
        self, images: Sequence[Sequence[Image.Image]]
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Every sample's images, reduced: per sample the kept count of each image, and the flat features."""
        flat = [image for sample in images for image in sample]
        encoded = self.encode_images(self.preprocess(flat)) if flat else EncodedImages([], [], self.grid)
        kept = iter([f.shape[0] for f in encoded.features])
        return [[next(kept) for _ in sample] for sample in images], encoded.features

    @torch.inference_mode()
    def generate(
        self,
        questions: Sequence[str],
        images: Sequence[Sequence[Image.Image]],
        max_new_tokens: int = 16,
        timing: dict | None = None,
        **generate_kwargs,
    ) -> tuple[list[str], list[int]]:
        """Batched generation; returns the decoded answers and each sample's visual token count.

        Args:
            timing: if a dict is given, it is filled with the batch's stage times
                (`tokenprune.models.timing.StageClock.summary`: encode_ms, prefill_ms, decode_ms,
                decode_steps, total_ms, timer) and per-sample `text_tokens` (prompt tokens other
                than visual ones) and `new_tokens` (generated, up to and including EOS).
        """
        return generate_answers(
            self.model,
            self.tokenizer,
            lambda: self.prepare(questions, images),
            _generate_inputs,
            max_new_tokens,
            timing,
            generate_kwargs,
        )

    def prepare_conversations(
        self,
        conversations: Sequence[Sequence[tuple[str, bool]]],
        images: Sequence[Sequence[Image.Image]],
    ) -> ModelInputs:
        """Multi-turn training inputs: rendered conversations and their images -> LLM inputs with labels.

        Args:
            conversations: per sample, (text, trained) segments in order (e.g. from
                `tokenprune.data.instruct.render`); the first holds one "<image>" per image. The
                labels are the trained segments' tokens (assistant replies and their end token).
            images: per sample, its images (empty for a text-only sample).

        The reducer runs in the forward (not under no_grad), so the loss reaches the projector
        through the reduced tokens.
        """
        if self.reduces_at_llm_input:
            if RELEVANCE in self.reducer.requires:
                raise ValueError("a reducer that reads `relevance` (explain_oracle) is for evaluation only")
            return self._prepare_at_llm_input(conversations, images)
        counts, features = self._encode_samples(images)
        return self.splice(conversations, counts, features)

    # ------------------------------------------------------------------ reduction at the LLM input
    @property
    def reduces_at_llm_input(self) -> bool:
        """Whether the reducer reads a signal of the spliced LLM input (it then runs there)."""
        return any(name in LLM_SIGNALS for name in self.reducer.requires)

    def _prepare_at_llm_input(
        self,
        prompts: Sequence[str | Sequence[tuple[str, bool]]],
        images: Sequence[Sequence[Image.Image]],
        answers: Sequence[str] | None = None,
    ) -> ModelInputs:
        """Splice every visual token, compute the LLM-input signals, reduce, splice the kept tokens.

        Positions follow the reducer's `positions`: "gather" keeps the unreduced positions of the text
        and the kept tokens (gaps allowed; decoding continues from the last one); "renumber" (also
        without the attribute) numbers the reduced sequence contiguously, as for any other reducer.
        """
        flat = [image for sample in images for image in sample]
        if not flat:
            return self.splice(prompts, [[] for _ in images], [], answers)
        tokens = self.visual_tokens(self.preprocess(flat))
        projected = self.model.model.multi_modal_projector(tokens.features)  # [I, N, D_llm]
        n = projected.shape[1]
        full = self.splice(prompts, [[n] * len(sample) for sample in images], list(projected), answers)
        signals = dict(tokens.signals)
        if LLM_TEXT_ATTN in self.reducer.requires:
            signals[LLM_TEXT_ATTN] = self.text_attention(full)
        if RELEVANCE in self.reducer.requires:
            signals[RELEVANCE] = self._oracle_relevance(prompts, images, projected, answers)
        reduced = self.reducer(VisualTokens(projected, tokens.grid, signals))
        lengths = reduced.lengths.tolist()
        kept = iter(lengths)
        counts = [[next(kept) for _ in sample] for sample in images]
        features = [f[:k] for f, k in zip(reduced.features, lengths)]
        inputs = self.splice(prompts, counts, features, answers)
        if getattr(self.reducer, "positions", "renumber") == "gather":
            inputs.position_ids = self._gathered_positions(full, inputs, reduced)
            inputs.gathered_positions = True
        return inputs

    def input_embeddings(self, inputs: ModelInputs) -> torch.Tensor:
        """The LLM's input [B, L, D]: token embeddings with the visual tokens scattered in (as LlavaModel does)."""
        embeds = self.model.get_input_embeddings()(inputs.input_ids)  # [B, L, D]
        features = inputs.mm_encoder_outputs.get("image")
        if features is None:
            return embeds
        visual = torch.cat(list(features.pooler_output)).to(embeds.device, embeds.dtype)  # [sum k, D]
        mask = (inputs.input_ids == self.image_token_id).unsqueeze(-1)  # [B, L, 1]
        return embeds.masked_scatter(mask, visual)

    def image_blocks(self, inputs: ModelInputs) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
        """Where each image sits in an *unreduced* splice, and the text rows after it.

        Returns:
            blocks: per image (flat, sample order), (sample, first column, token count).
            rows: [I, L] bool; the real, non-visual tokens after the image's block and before the
                first labelled (answer) token: the rows `llm_text_attn` averages.
        """
        n = self.grid[0] * self.grid[1]
        is_image = inputs.input_ids == self.image_token_id  # [B, L]
        length = is_image.shape[1]
        positions = torch.arange(length, device=is_image.device)
        text = inputs.attention_mask.bool() & ~is_image  # [B, L]
        if inputs.labels is not None:
            labelled = inputs.labels != -100
            first = torch.where(labelled.any(-1), labelled.int().argmax(-1), length)  # [B]
            text &= positions[None] < first[:, None]
        blocks, rows = [], []
        for b, starts in enumerate(is_image.sum(-1).tolist()):
            if starts % n:
                raise ValueError(
                    f"sample {b} has {starts} image tokens, not a multiple of {n}: reduced input?"
                )
            for start in is_image[b].nonzero().squeeze(1)[::n].tolist():
                blocks.append((b, start, n))
                rows.append(text[b] & (positions >= start + n))
        return blocks, torch.stack(rows) if rows else text[:0]

    @torch.no_grad()
    def text_attention(self, inputs: ModelInputs) -> torch.Tensor:
        """`llm_text_attn` [I, N] float32 of an unreduced splice: layer-0 attention from the text after
        each image to its visual tokens, averaged over those rows and the heads (see `image_blocks`).

        Computed from layer 0's input norm, q/k projections and the model's rotary embedding
        (`tokenprune.models.signals`), whatever attention backend the model runs.
        """
        language_model = self.model.model.language_model
        blocks, rows = self.image_blocks(inputs)
        embeds = self.input_embeddings(inputs)  # [B, L, D]
        query, key, scale = decoder_query_key(
            language_model.layers[0], language_model.rotary_emb, embeds, inputs.position_ids
        )
        return text_to_visual_attention(query, key, scale, inputs.attention_mask, blocks, rows)

    def answer_relevance(
        self, inputs: ModelInputs, answer_ids: Sequence[Sequence[int]], target: str = "logit"
    ) -> torch.Tensor:
        """GAE relevance [I, N] float32 of each sample's answer for its visual tokens (notes §1, §6.3).

        Args:
            inputs: an unreduced splice of the prompts only (no labels).
            answer_ids: per sample, the answer tokens to explain (teacher-forced after the prompt);
                each one is explained at the position that predicts it and the rows are averaged.
            target: the differentiated score: "logit" (GAE's convention) or "logprob".
        """
        from tokenprune.explain.gae import relevance_row

        blocks, _ = self.image_blocks(inputs)
        embeds = self.input_embeddings(inputs).detach()  # [B, L, D]
        out = embeds.new_zeros(len(blocks), self.grid[0] * self.grid[1], dtype=torch.float32)
        for b, answer in enumerate(answer_ids):
            images = [i for i, block in enumerate(blocks) if block[0] == b]
            if not images or not answer:
                continue
            valid = inputs.attention_mask[b].bool()  # left padding dropped
            offset = int((~valid).sum())
            answer_embeds = self.model.get_input_embeddings()(
                torch.tensor(list(answer), device=embeds.device)
            )
            sequence = torch.cat([embeds[b, valid], answer_embeds])  # [S, D]
            targets = [(int(valid.sum()) - 1 + t, int(y)) for t, y in enumerate(answer)]
            positions = torch.arange(sequence.shape[0], device=embeds.device)[None]
            row = relevance_row(
                self.model, self.model.model.language_model, sequence[None], positions, targets, target
            )  # [S]
            for i in images:
                _, first, count = blocks[i]
                out[i] = row[first - offset : first - offset + count]
        return out

    def _oracle_relevance(
        self,
        prompts: Sequence[str | Sequence[tuple[str, bool]]],
        images: Sequence[Sequence[Image.Image]],
        projected: torch.Tensor,
        answers: Sequence[str] | None,
    ) -> torch.Tensor:
        """`relevance` for explain_oracle: the given answers, or the unreduced model's greedy ones."""
        counts = [[projected.shape[1]] * len(sample) for sample in images]
        with torch.inference_mode(False):  # generate() runs under inference mode; GAE needs autograd
            prompt_inputs = self.splice(prompts, counts, list(projected.clone()))
            if answers is not None:
                answer_ids = [self._answer_ids(a) for a in answers]
            else:
                most = int(getattr(self.reducer, "answer_tokens", 16))
                answer_ids = self.greedy_answer_ids(prompt_inputs, most)
            if not getattr(self.reducer, "include_eos", False):
                eos = self.tokenizer.eos_token_id
                answer_ids = [[t for t in ids if t != eos] for ids in answer_ids]
            target = str(getattr(self.reducer, "target", "logit"))
            return self.answer_relevance(prompt_inputs, answer_ids, target=target)  # float32: no bf16 ties

    @torch.no_grad()
    def greedy_answer_ids(self, inputs: ModelInputs, max_new_tokens: int) -> list[list[int]]:
        """The model's greedy answer to each prompt of an unreduced splice: token ids up to and including EOS."""
        kwargs = inputs.as_kwargs()
        kwargs.pop("position_ids")
        if not kwargs["mm_encoder_outputs"]:
            kwargs.pop("mm_encoder_outputs")
        pad = self.tokenizer.pad_token_id
        output = self.model.generate(
            **kwargs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        new_tokens = output[:, inputs.input_ids.shape[1] :]
        lengths = generated_lengths(new_tokens, self.tokenizer.eos_token_id)
        return [row[:n].tolist() for row, n in zip(new_tokens, lengths)]

    def _gathered_positions(
        self, full: ModelInputs, reduced_inputs: ModelInputs, reduced: Reduced
    ) -> torch.Tensor:
        """Position ids [B, L'] of a reduced splice taken from the unreduced one: the text keeps its
        positions, a kept visual token the position of its source patch (a synthetic token, index -1,
        that of its grid's centre patch); left padding gets 0."""
        blocks, _ = self.image_blocks(full)
        h, w = self.grid
        centre = (h // 2) * w + w // 2
        lengths = reduced.lengths.tolist()
        out = torch.zeros_like(reduced_inputs.position_ids)  # [B, L']
        for b in range(full.input_ids.shape[0]):
            valid = full.attention_mask[b].bool()
            positions = full.position_ids[b]
            pieces, cursor = [], 0
            for i, (sample, first, count) in enumerate(blocks):
                if sample != b:
                    continue
                pieces.append(positions[cursor:first][valid[cursor:first]])
                index = reduced.index[i, : lengths[i]]
                pieces.append(positions[first + torch.where(index >= 0, index, centre)])
                cursor = first + count
            pieces.append(positions[cursor:][valid[cursor:]])
            row = torch.cat(pieces)
            if row.numel() != int(reduced_inputs.attention_mask[b].sum()):
                raise RuntimeError("gathered positions do not match the reduced splice")
            out[b, out.shape[1] - row.numel() :] = row
        return out


def _generate_inputs(inputs: ModelInputs) -> dict:
    """The spliced inputs as `generate` takes them: positions only when gathered (else generate
    derives them from the attention mask), no empty `mm_encoder_outputs`."""
    kwargs = inputs.as_kwargs()
    if not inputs.gathered_positions:
        kwargs.pop("position_ids")
    if not kwargs["mm_encoder_outputs"]:
        kwargs.pop("mm_encoder_outputs")
    return kwargs


def pad_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """Centre `image` on a square canvas of its longer side filled with the mean colour (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(round(c * 255) for c in mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
