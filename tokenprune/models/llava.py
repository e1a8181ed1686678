"""Adapter for `LlavaForConditionalGeneration` (LLaVA-1.5 7B/13B and the tiny test model).

The adapter owns every model internal: it runs the CLIP tower to the layers it needs, computes
the signals the reducer asks for, applies the reducer before ("vision") or after ("llm") the
projector, and splices each sample's reduced tokens into the LLM input with its own count of
`<image>` placeholders (transformers' `mm_encoder_outputs` path, for `forward` and `generate`).

A reducer that reads a signal of the LLM input (`llm_text_attn`, `relevance`: `types.LLM_SIGNALS`)
runs at the LLM input instead: the unreduced sequence is spliced first, the signal is computed on it
(layer 0's q/k under any attention backend; the relevance by GAE, `tokenprune.models.gae`), the
reducer runs on the projected tokens and the kept ones are spliced again (`_prepare_at_llm_input`).
A reducer inside the LLM (`space="llm_layer"`) gets every visual token spliced; `AdapterCore` runs it.
The splice, the LLM-input signals and generation are the shared core (`_views`, `base.AdapterCore`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune.models._views import SplicedInputs, assemble, gathered_positions, reduce_items
from tokenprune.models.base import AdapterCore, Capabilities, VisionFlops, load_pretrained
from tokenprune.models.signals import SIGNAL_DTYPES, clip_cls_attention, clip_feature_layer_signals
from tokenprune.templates import LLAVA15_PROMPT
from tokenprune.types import (
    FEATURE_LAYER_SIGNALS,
    VIT_CLS_ATTN,
    VIT_KEYS,
    Reducer,
    Video,
    VisualTokens,
)

IMAGE_ASPECTS = ("pad", "crop")


@dataclass
class EncodedImages:
    """Reduced visual tokens of a flat list of images, ready for the LLM."""

    features: list[torch.Tensor]  # per image [k_i, D_llm]
    index: list[torch.Tensor]  # per image [k_i] source patch (-1 synthetic)
    grid: tuple[int, int]


class LlavaAdapter(AdapterCore):
    """LLaVA (CLIP + projector + LLM) with a visual-token reducer in the loop."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        family="llava",
        supports_video=False,
        supports_training=True,
        supports_visualize=True,
        image_aspects=IMAGE_ASPECTS,
    )
    answer_prefix: ClassVar[str] = " "

    def __init__(
        self,
        model,
        processor,
        reducer: Reducer | None = None,
        prompt: str = LLAVA15_PROMPT,
        image_aspect: str = "crop",
        signal_dtype: str = "float32",
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
        super().__init__(model, processor.tokenizer, reducer, {"image": config.image_token_id})
        self.processor = processor
        self.prompt = prompt
        self.image_aspect = image_aspect
        if signal_dtype not in SIGNAL_DTYPES:
            raise ValueError(f"signal_dtype must be one of {SIGNAL_DTYPES}, got {signal_dtype!r}")
        self.signal_dtype = signal_dtype
        self.image_token_id = config.image_token_id
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)

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
        signal_dtype: str = "float32",
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
            signal_dtype: PruMerge's CLS attention in "float32" (CLS row only) or in the tower's dtype
                ("model": the reference's full-matrix fp16 arithmetic, for bit-for-bit agreement with
                it; see `tokenprune.models.signals.clip_cls_attention`).
        """
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model, (processor,) = load_pretrained(
            path,
            build,
            LlavaForConditionalGeneration,
            dtype,
            attn_implementation,
            device,
            lambda source: (AutoProcessor.from_pretrained(source),),
        )
        return cls(
            model,
            processor,
            reducer=reducer,
            prompt=prompt,
            image_aspect=image_aspect,
            signal_dtype=signal_dtype,
        )

    def projector(self) -> torch.nn.Module:
        """The trainable bridge between the vision tower and the LLM (the 2-layer MLP)."""
        return self.model.model.multi_modal_projector

    def image_token_budget(self) -> int:
        """Visual tokens per image before reduction (the patch grid)."""
        return self.grid[0] * self.grid[1]

    def vision_flops(self) -> VisionFlops:
        """The CLIP tower as far as the adapter runs it (to the signal layer's input when a reducer
        reads the vision signals)."""
        config = self.model.config
        vision = config.vision_config
        layer = config.vision_feature_layer
        depth = layer if layer >= 0 else vision.num_hidden_layers + 1 + layer
        if any(name in self.input_reducer.requires for name in (VIT_CLS_ATTN, VIT_KEYS)):
            depth = max(depth, vision.num_hidden_layers - 1)
        return VisionFlops(
            depth=depth,
            width=vision.hidden_size,
            mlp_width=vision.intermediate_size,
            patches=self.grid[0] * self.grid[1],
            patch_size=vision.patch_size,
            channels=vision.num_channels,
        )

    def visual_view(self, image: Image.Image) -> tuple[Image.Image, VisualTokens]:
        """The image as the model sees it (de-normalised RGB) and its unreduced visual tokens."""
        pixel_values = self.preprocess([image])
        processor = self.processor.image_processor
        mean = torch.tensor(processor.image_mean)[:, None, None]
        std = torch.tensor(processor.image_std)[:, None, None]
        pixels = pixel_values[0].float().cpu()  # [3, S, S]
        rgb = ((pixels * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(rgb), self.visual_tokens(pixel_values)

    # ------------------------------------------------------------------ vision side
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
        wants_signals = any(name in self.input_reducer.requires for name in (VIT_CLS_ATTN, VIT_KEYS))
        depth = max(feature_depth, n_layers - 1) if wants_signals else feature_depth
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))  # [I, N+1, C]
        states = [hidden]
        for layer in layers[:depth]:
            hidden = layer(hidden, attention_mask=None)
            states.append(hidden)
        signals = {}
        if wants_signals:
            signals[VIT_CLS_ATTN], signals[VIT_KEYS] = clip_cls_attention(
                layers[-1], states[n_layers - 1], self.signal_dtype
            )
        if any(name in self.input_reducer.requires for name in FEATURE_LAYER_SIGNALS):
            if feature_depth == 0:
                raise ValueError("vision_feature_layer 0 (the embeddings) has no attention for the signals")
            computed = clip_feature_layer_signals(
                layers[feature_depth - 1], states[feature_depth - 1], states[feature_depth]
            )
            signals.update(
                {k: v for k, v in zip(FEATURE_LAYER_SIGNALS, computed) if k in self.input_reducer.requires}
            )
        missing = set(self.reducer.requires) - set(self.capabilities.signals)
        if missing:
            raise ValueError(
                f"{type(self.reducer).__name__} requires signals {sorted(missing)} that the LLaVA adapter "
                f"does not compute; available: {list(self.capabilities.signals)}"
            )
        features = states[feature_depth][:, 1:]  # [I, N, C] drop CLS ("default" strategy)
        return VisualTokens(features=features, grid=self.grid, signals=signals).require_finite()

    def encode_images(self, pixel_values: torch.Tensor) -> EncodedImages:
        """pixel_values [I, 3, S, S] -> per-image reduced LLM-space tokens."""
        projector = self.projector()
        reducer = self.input_reducer
        tokens = self.visual_tokens(pixel_values)
        if reducer.space == "vision":
            reduced = reducer(tokens)
            projected = projector(reduced.features)  # [I, M, D_llm]
        else:
            projected_tokens = VisualTokens(projector(tokens.features), tokens.grid, tokens.signals)
            reduced = reducer(projected_tokens)
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
    ) -> SplicedInputs:
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
        rows, targets, placed = [], [], []
        item = 0
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
                    placed.append((b, len(expanded), n, "image", item, (1, *self.grid)))
                    item += 1
                    expanded += [token] * n
                    expanded_labels += [-100] * n
                else:
                    expanded.append(token)
                    expanded_labels.append(label)
            answer = [] if answers is None else self.answer_ids(answers[b])
            rows.append(expanded + answer)
            targets.append(expanded_labels + answer)
        labelled = answers is not None or any(not isinstance(p, str) for p in prompts)
        outputs = {"image": BaseModelOutputWithPooling(pooler_output=features)} if features else {}
        return assemble(
            rows, targets if labelled else None, placed, outputs, self.tokenizer.pad_token_id, self.device
        )

    def prepare(
        self,
        questions: Sequence[str],
        images: Sequence[Sequence[Image.Image]],
        *,
        videos: Sequence[Sequence[Video]] | None = None,
        answers: Sequence[str] | None = None,
    ) -> SplicedInputs:
        """Questions and their images (and answers, for training) -> the reduced, spliced LLM inputs."""
        if videos is not None and any(videos):
            raise ValueError("the llava adapter takes no videos (images only; give frames as images)")
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

    def prepare_conversations(
        self,
        conversations: Sequence[Sequence[tuple[str, bool]]],
        images: Sequence[Sequence[Image.Image]],
    ) -> SplicedInputs:
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
            self.check_oracle()
            return self._prepare_at_llm_input(conversations, images)
        counts, features = self._encode_samples(images)
        return self.splice(conversations, counts, features)

    # ------------------------------------------------------------------ reduction at the LLM input
    def _prepare_at_llm_input(
        self,
        prompts: Sequence[str | Sequence[tuple[str, bool]]],
        images: Sequence[Sequence[Image.Image]],
        answers: Sequence[str] | None = None,
    ) -> SplicedInputs:
        """Splice every visual token, compute the LLM-input signals, reduce, splice the kept tokens.

        Positions follow the reducer's `positions`: "gather" keeps the unreduced positions of the text
        and the kept tokens (gaps allowed; decoding continues from the last one); "renumber" (also
        without the attribute) numbers the reduced sequence contiguously, as for any other reducer.
        """
        flat = [image for sample in images for image in sample]
        if not flat:
            return self.splice(prompts, [[] for _ in images], [], answers)
        tokens = self.visual_tokens(self.preprocess(flat))
        projected = self.projector()(tokens.features)  # [I, N, D_llm]
        n = projected.shape[1]
        full_counts = [[n] * len(sample) for sample in images]
        full = self.splice(prompts, full_counts, list(projected), answers)

        def prompt_inputs() -> SplicedInputs:  # autograd-usable copies (explain_oracle)
            return self.splice(prompts, full_counts, list(projected.clone()))

        signals = self.llm_input_signals(full, prompt_inputs, answers)
        for i, values in enumerate(zip(*tokens.signals.values())):  # the vision signals too, per image
            signals[("image", i)].update(dict(zip(tokens.signals, values)))
        grids = [(1, *self.grid)] * len(flat)
        results = reduce_items(self.reducer, "image", list(projected), grids, signals)
        kept = iter([r.features.shape[0] for r in results])
        counts = [[next(kept) for _ in sample] for sample in images]
        inputs = self.splice(prompts, counts, [r.features for r in results], answers)
        if getattr(self.reducer, "positions", "renumber") == "gather":
            sources = {("image", i): r.index for i, r in enumerate(results)}
            inputs.position_ids = gathered_positions(full, inputs, sources)
            inputs.gathered_positions = True
        return inputs


def pad_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """Centre `image` on a square canvas of its longer side filled with the mean colour (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(round(c * 255) for c in mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
