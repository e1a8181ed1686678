"""Adapter for LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`: SigLIP + 2-layer MLP + Qwen2).

Adapter decisions (docs/models.md):

* **Reduction point: the packed grid, per view.** LLaVA-OneVision encodes a single image as a
  base crop (the whole image at 384 px) plus anyres tiles; it packs the tiles into one
  high-resolution canvas, cuts the padding (`unpad`), bilinearly shrinks a canvas larger than
  `anyres_max_9` and ends every canvas row with a learned newline token. The reducer sees each
  image as up to two views: the **base view** (its grid, e.g. 27x27) and the **canvas view** (the
  unpadded, shrunk canvas, its grid e.g. 54x41): the tokens the LLM would get, so a budget means
  what the LLM receives and PruMerge's outliers are found over the whole canvas, not per tile.
  Images of a multi-image sample are base views only (as the model does); a video frame is one
  view, its 2x2 bilinearly pooled grid (as `get_video_features`). Views of one grid are reduced in
  one batched call.
* **Space.** `space="llm"` reducers get the model's own packed projected tokens (without newlines).
  `space="vision"` reducers get SigLIP features arranged the same way; where the model shrinks or
  pools *after* the projector, the adapter does it to the vision features before it (the same
  bilinear maps; not bit-equal to the model's order for the canvas of a very large image and for
  video frames). A view the reducer returns unchanged (`none`, keep-all budgets) is packed exactly
  as the model packs it.
* **Newlines.** An unchanged canvas keeps a newline after every row; a reduced canvas view is its
  kept tokens followed by one newline (rows no longer exist). Base-only images and videos end with
  one newline, as in the model. The visual token count per sample includes the newlines.
* **Signals.** SigLIP has no CLS token: `vit_cls_attn` is the mean attention each patch receives in
  the layer that produces the features (the last one: all heads and queries of its crop or frame;
  `tokenprune.models.signals.siglip_attention`), `vit_keys` that layer's keys. On a canvas they are
  packed like the features (per-tile attention, then cut and shrunk); a shrunk or pooled attention
  map is rescaled to keep its total, so a merged token weighs what it covers.
* Positions are the usual 1-D ones (`generate` derives them from the attention mask).
* **At the LLM input** (reducers reading `llm_text_attn` / `relevance`): the model's own tokens are
  spliced, the signals computed on that splice (`_views.LlmInput`), and each image (base and canvas
  together) and video (all frames) reduced as one sequence of its non-newline tokens; a reduced item
  is its kept tokens, then one newline. `positions="gather"` keeps the unreduced positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune.models._views import (
    ReducedView,
    SplicedInputs,
    View,
    assemble,
    gathered_positions,
    reduce_items,
    reduce_views,
    video_frames,
)
from tokenprune.models.base import AdapterCore, Capabilities, load_pretrained
from tokenprune.models.signals import siglip_attention
from tokenprune.types import (
    FEATURE_LAYER_SIGNALS,
    VIT_CLS_ATTN,
    VIT_CLS_ATTN_HEADS,
    VIT_CLS_FEATURE,
    VIT_FEAT_KEYS,
    VIT_KEYS,
    Reducer,
    Video,
)

PER_PATCH_FEATURE_LAYER = (VIT_CLS_ATTN_HEADS, VIT_FEAT_KEYS)  # packed / pooled like the features

OV_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{images}{question}<|im_end|>\n<|im_start|>assistant\n"
)
IMAGE_MARKER = "<image>\n"
VIDEO_MARKER = "<video>\n"


@dataclass
class Crops:
    """Preprocessed images: all crops stacked, with how they belong to images.

    Attributes:
        pixel_values: [C, 3, S, S] every crop of every image (an anyres image: base crop, then tiles).
        crops: per image, its number of crops.
        sizes: per image, its original (height, width).
        anyres: per image, whether it is packed with tiles (the only image of its sample).
    """

    pixel_values: torch.Tensor
    crops: list[int]
    sizes: list[list[int]]
    anyres: list[bool]


@dataclass
class Item:
    """One image or video as the LLM receives it.

    Attributes:
        tokens: [k, D] its LLM tokens, newlines included.
        newline: [k] bool; the layout's newline tokens (never reduced at the LLM input).
        grid: (frames, rows, cols) of its unreduced non-newline tokens as a reducer at the LLM input
            sees them: (1, S, S) for a base-only image, (1, 1, S*S + canvas cells) for an anyres image
            (base then canvas: no single grid), (T, s, s) for a video of T pooled frames.
    """

    tokens: torch.Tensor
    newline: torch.Tensor
    grid: tuple[int, int, int]


class LlavaOnevisionAdapter(AdapterCore):
    """LLaVA-OneVision (SigLIP + projector + Qwen2 LLM) with a reducer in the loop."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        family="llava_onevision", supports_video=True, supports_training=True, supports_visualize=False
    )

    def __init__(
        self, model, image_processor, tokenizer, reducer: Reducer | None = None, prompt: str = OV_PROMPT
    ):
        config = model.config
        if config.model_type != "llava_onevision":
            raise ValueError(
                f"LlavaOnevisionAdapter takes llava_onevision checkpoints, got {config.model_type!r}"
            )
        if config.vision_feature_select_strategy != "full" or not isinstance(
            config.vision_feature_layer, int
        ):
            raise ValueError(
                "LlavaOnevisionAdapter supports vision_feature_select_strategy='full' with one vision_feature_layer; "
                f"got {config.vision_feature_select_strategy!r}, {config.vision_feature_layer!r}"
            )
        super().__init__(
            model, tokenizer, reducer, {"image": config.image_token_id, "video": config.video_token_id}
        )
        self.image_processor = image_processor
        self.prompt = prompt
        vision = config.vision_config
        self.crop_size = vision.image_size
        self.side = vision.image_size // vision.patch_size
        self.image_token_id = config.image_token_id
        self.video_token_id = config.video_token_id

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        reducer: Reducer | None = None,
        dtype: str = "bfloat16",
        attn_implementation: str = "sdpa",
        device: str = "auto",
        prompt: str = OV_PROMPT,
        build: str | None = None,
    ) -> LlavaOnevisionAdapter:
        """Load a LLaVA-OneVision checkpoint (local folder or hub id in the HF cache).

        Args:
            path: checkpoint folder or hub id (e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf).
            reducer: the visual-token reducer (None: no reduction).
            dtype: float32 | float16 | bfloat16 | float64.
            attn_implementation: sdpa | flash_attention_2 | eager (for the whole model).
            device: auto | cpu | cuda | cuda:N.
            prompt: the conversation format; `{images}` becomes "<image>\\n" per image, then "<video>\\n" per video.
            build: name of a tiny test model to build at `path` when it is missing (tokenprune.models.tiny).
        """
        from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionForConditionalGeneration

        model, (tokenizer, image_processor) = load_pretrained(
            path,
            build,
            LlavaOnevisionForConditionalGeneration,
            dtype,
            attn_implementation,
            device,
            lambda source: (
                AutoTokenizer.from_pretrained(source),
                AutoImageProcessor.from_pretrained(source),
            ),
        )
        return cls(model, image_processor, tokenizer, reducer=reducer, prompt=prompt)

    def projector(self) -> torch.nn.Module:
        """The trainable bridge between the vision tower and the LLM (the 2-layer MLP)."""
        return self.model.model.multi_modal_projector

    def vision_flops(self) -> None:
        """No analytic formula for the anyres SigLIP tower yet (LLM FLOPs are still counted)."""
        return None

    # ------------------------------------------------------------------ vision side
    def preprocess(self, images: Sequence[Sequence[Image.Image]]) -> Crops:
        """Per sample, its images -> every crop (anyres for a sample's only image, base crop otherwise)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        nested = [[image.convert("RGB") for image in sample] for sample in images if sample]
        out = self.image_processor(images=nested, return_tensors="pt")
        sizes = out["image_sizes"].tolist()
        anyres = [n == 1 for n in out["batch_num_images"] for _ in range(n)]
        pinpoints = self.model.config.image_grid_pinpoints
        crops = [
            image_size_to_num_patches(size, pinpoints, self.crop_size) if single else 1
            for size, single in zip(sizes, anyres)
        ]
        pixel_values = torch.cat([p[:n] for p, n in zip(out["pixel_values"], crops)])
        return Crops(pixel_values.to(self.device, self.model.dtype), crops, sizes, anyres)

    def preprocess_videos(self, videos: Sequence) -> list[torch.Tensor]:
        """Videos -> per video its frames [T, 3, S, S], each resized to the crop size (no anyres)."""
        out = []
        for video in videos:
            frames, _ = video_frames(video)
            pixels = self.image_processor(
                images=frames, image_grid_pinpoints=[[self.crop_size, self.crop_size]], return_tensors="pt"
            )["pixel_values"][:, 0]  # the base crop: the frame resized to S x S
            out.append(pixels.to(self.device, self.model.dtype))
        return out

    def tower(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """SigLIP features [B, N, C] of the feature layer (run only as deep as it), plus the signals
        the reducer asks for: vit_cls_attn [B, N], vit_keys [B, N, C] of that layer."""
        tower = self.model.model.vision_tower
        layers = tower.encoder.layers
        layer = self.model.config.vision_feature_layer
        depth = layer if layer >= 0 else len(layers) + 1 + layer
        hidden = tower.embeddings(pixel_values)  # [B, N, C]
        before = hidden
        for block in layers[:depth]:
            before, hidden = hidden, block(hidden, attention_mask=None)
        out = {"features": hidden}
        if any(name in self.input_reducer.requires for name in (VIT_CLS_ATTN, VIT_KEYS)):
            if depth == 0:
                raise ValueError("vision_feature_layer 0 (the embeddings) has no attention for the signals")
            out[VIT_CLS_ATTN], out[VIT_KEYS] = siglip_attention(layers[depth - 1], before)
        if any(name in self.input_reducer.requires for name in FEATURE_LAYER_SIGNALS):
            if depth == 0:
                raise ValueError("vision_feature_layer 0 (the embeddings) has no attention for the signals")
            heads, out[VIT_FEAT_KEYS] = siglip_attention(layers[depth - 1], before, per_head=True)
            out[VIT_CLS_ATTN_HEADS] = heads.transpose(1, 2)  # [B, N, H] patch-major until the view
        return out

    def _pack(self, crops: torch.Tensor, size: list[int], newline: torch.Tensor | None) -> torch.Tensor:
        """The model's own packing of one anyres image's crops [n, N, D] -> [N + canvas (+ newlines), D]."""
        model = self.model.model
        packed, _ = model.pack_image_features(
            [crops], [size], image_newline=newline, vision_aspect_ratio=self.model.config.vision_aspect_ratio
        )
        return packed[0]

    def canvas_grid(self, crops: int, size: list[int]) -> tuple[int, int]:
        """(rows, cols) of the packed canvas of an anyres image with `crops` crops (after unpad and shrink)."""
        ones = torch.ones(crops, self.side**2, 1)
        cells = self._pack(ones, size, None).shape[0] - self.side**2
        rows = self._pack(ones, size, torch.ones(1)).shape[0] - self.side**2 - cells
        return rows, cells // rows

    @staticmethod
    def _view(
        features: torch.Tensor,
        attention: torch.Tensor | None,
        keys: torch.Tensor | None,
        grid,
        feature_layer: dict[str, torch.Tensor] | None = None,
    ) -> View:
        """A view; its attention normalised to a distribution over the view, like CLS attention over an
        image. `feature_layer`: the view's per-patch vit_cls_attn_heads [n, H] / vit_feat_keys [n, C]."""
        signals = {}
        if attention is not None:
            signals[VIT_CLS_ATTN] = attention / attention.sum()  # [n]
        if keys is not None:
            signals[VIT_KEYS] = keys  # [n, C]
        if feature_layer:
            signals.update(feature_layer)
            if VIT_CLS_ATTN_HEADS in signals:
                heads = signals[VIT_CLS_ATTN_HEADS]  # [n, H]
                signals[VIT_CLS_ATTN_HEADS] = (heads / heads.sum(0)).T  # [H, n], each head sums to 1
            signals[VIT_CLS_FEATURE] = features.new_zeros(0)  # SigLIP has no CLS token
        return View(features, grid, signals)

    def image_views(
        self, crops: Crops, tower: dict[str, torch.Tensor], projected: torch.Tensor | None
    ) -> list[list[View]]:
        """Per image its views, [base] or [base, canvas], with features in the reducer's space."""
        features = tower["features"] if self.input_reducer.space == "vision" else projected  # [C, N, D]
        attention, keys = tower.get(VIT_CLS_ATTN), tower.get(VIT_KEYS)  # [C, N], [C, N, Ck]
        extra = {name: tower[name] for name in PER_PATCH_FEATURE_LAYER if name in tower}  # [C, N, ...]
        cut = self.side**2
        out, start = [], 0
        for n, size, anyres in zip(crops.crops, crops.sizes, crops.anyres):
            views = [
                self._view(
                    features[start],
                    None if attention is None else attention[start],
                    None if keys is None else keys[start],
                    (self.side, self.side),
                    {name: value[start] for name, value in extra.items()},
                )
            ]
            if anyres:

                def pack(x: torch.Tensor, span=slice(start, start + n), size=size) -> torch.Tensor:
                    return self._pack(x[span], size, None)[cut:]  # [cells, D]: unpadded, shrunk canvas

                views.append(
                    self._view(
                        pack(features),
                        None if attention is None else pack(attention.unsqueeze(-1)).squeeze(-1),
                        None if keys is None else pack(keys),
                        self.canvas_grid(n, size),
                        {name: pack(value) for name, value in extra.items()},
                    )
                )
            out.append(views)
            start += n
        return out

    def video_views(self, tower: dict[str, torch.Tensor], projected: torch.Tensor | None) -> list[View]:
        """One view per frame: its 2x2-pooled grid (the model's bilinear pooling), features in the reducer's space."""
        pool = self.model.model.apply_pooling
        features = pool(tower["features"] if self.input_reducer.space == "vision" else projected)  # [T, n, D]
        attention = tower.get(VIT_CLS_ATTN)
        attention = None if attention is None else pool(attention.unsqueeze(-1)).squeeze(-1)  # [T, n]
        keys = None if VIT_KEYS not in tower else pool(tower[VIT_KEYS])  # [T, n, C]
        extra = {name: pool(tower[name]) for name in PER_PATCH_FEATURE_LAYER if name in tower}  # [T, n, ...]
        side = math.ceil(self.side / 2)
        return [
            self._view(
                features[t],
                None if attention is None else attention[t],
                None if keys is None else keys[t],
                (side, side),
                {name: value[t] for name, value in extra.items()},
            )
            for t in range(features.shape[0])
        ]

    def _to_llm(self, reduced: Sequence[ReducedView]) -> list[torch.Tensor | None]:
        """The reduced views' tokens in LLM space (one projector call for a vision-space reducer);
        None for a view returned unchanged (the adapter uses the model's own tokens for it)."""
        changed = [i for i, r in enumerate(reduced) if not r.unchanged]
        out: list[torch.Tensor | None] = [None] * len(reduced)
        if not changed:
            return out
        tokens = torch.cat([reduced[i].features for i in changed])  # [sum k, C or D]
        if self.input_reducer.space == "vision":
            tokens = self.model.model.multi_modal_projector(tokens)  # [sum k, D]
        for i, part in zip(changed, tokens.split([reduced[i].features.shape[0] for i in changed])):
            out[i] = part
        return out

    def encode_images(self, crops: Crops) -> list[torch.Tensor]:
        """Preprocessed images -> per image its LLM tokens [k_i, D] (reduced views, newlines included)."""
        return [item.tokens for item in self.image_items(crops)]

    def image_items(self, crops: Crops) -> list[Item]:
        """Preprocessed images -> per image its LLM tokens with their newline layout."""
        projector = self.model.model.multi_modal_projector
        newline = self.model.model.image_newline
        reducer = self.input_reducer
        tower = self.tower(crops.pixel_values)
        projected = projector(tower["features"]) if reducer.space == "llm" else None  # [C, N, D]
        per_image = self.image_views(crops, tower, projected)
        reduced = reduce_views(reducer, [view for views in per_image for view in views])
        if projected is None and any(r.unchanged for r in reduced):
            projected = projector(tower["features"])  # the model's own tokens
        tokens = iter(self._to_llm(reduced))
        unchanged = iter([r.unchanged for r in reduced])
        out, start = [], 0
        for n, size, anyres, views in zip(crops.crops, crops.sizes, crops.anyres, per_image):
            base, base_same = next(tokens), next(unchanged)
            parts = [projected[start] if base_same else base]
            if anyres:
                canvas, canvas_same = next(tokens), next(unchanged)
                rows, cols = views[1].grid
                if canvas_same:  # the model's packing: canvas rows, each ended by a newline
                    parts.append(self._pack(projected[start : start + n], size, newline)[self.side**2 :])
                    ends = torch.arange(rows * (cols + 1)) % (cols + 1) == cols
                else:
                    parts += [canvas, newline[None].to(canvas.dtype)]
                    ends = torch.arange(canvas.shape[0] + 1) == canvas.shape[0]
                grid = (1, 1, self.side**2 + rows * cols)
            else:
                parts.append(newline[None].to(parts[0].dtype))
                ends = torch.tensor([True])
                grid = (1, self.side, self.side)
            mask = torch.cat([torch.zeros(parts[0].shape[0], dtype=torch.bool), ends])
            out.append(Item(torch.cat(parts), mask, grid))
            start += n
        return out

    def encode_videos(self, videos: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per video its frames [T, 3, S, S] -> per video its LLM tokens (reduced frames, then one newline)."""
        return [item.tokens for item in self.video_items(videos)]

    def video_items(self, videos: Sequence[torch.Tensor]) -> list[Item]:
        """Per video its frames [T, 3, S, S] -> per video its LLM tokens with their newline layout."""
        projector = self.model.model.multi_modal_projector
        newline = self.model.model.image_newline
        reducer = self.input_reducer
        tower = self.tower(torch.cat(list(videos)))
        projected = projector(tower["features"]) if reducer.space == "llm" else None  # [T, N, D]
        views = self.video_views(tower, projected)
        reduced = reduce_views(reducer, views)
        if projected is None and any(r.unchanged for r in reduced):
            projected = projector(tower["features"])
        pooled = None if projected is None else self.model.model.apply_pooling(projected)  # [T, n, D]
        frames = [
            pooled[t] if r.unchanged else part
            for t, (r, part) in enumerate(zip(reduced, self._to_llm(reduced)))
        ]
        side = views[0].grid[0]
        out, start = [], 0
        for video in videos:
            tokens = torch.cat([*frames[start : start + video.shape[0]], newline[None].to(frames[0].dtype)])
            mask = torch.arange(tokens.shape[0]) == tokens.shape[0] - 1
            out.append(Item(tokens, mask, (video.shape[0], side, side)))
            start += video.shape[0]
        return out

    # ------------------------------------------------------------------ text side
    def format_prompt(self, question: str, n_images: int, n_videos: int = 0) -> str:
        return self.prompt.format(images=IMAGE_MARKER * n_images + VIDEO_MARKER * n_videos, question=question)

    def splice(
        self,
        prompts: Sequence[str | Sequence[tuple[str, bool]]],
        media: Sequence[Sequence[tuple[str, int]]],
        image_items: Sequence[Item],
        video_items: Sequence[Item],
        answers: Sequence[str] | None = None,
    ) -> SplicedInputs:
        """Tokenize prompts and give every image/video its count of placeholders.

        Args:
            prompts: one per sample with one "<image>" ("<video>") per image (video): a string (no
                labels), or a conversation as (text, trained) segments whose trained tokens are labels.
            media: per sample, ("image" | "video", flat item index) of each placeholder in prompt order.
            image_items, video_items: per image / video (flat, in sample order), its LLM tokens.
            answers: per sample, the assistant's reply for teacher forcing (answer + eos, labelled).
        """
        token_of = {"image": self.image_token_id, "video": self.video_token_id}
        items = {"image": image_items, "video": video_items}
        rows, targets, placed = [], [], []
        for b, (prompt, sample) in enumerate(zip(prompts, media)):
            ids, labels = [], []
            segments = [(prompt, False)] if isinstance(prompt, str) else prompt
            for i, (text, trained) in enumerate(segments):
                piece = self.tokenizer(text, add_special_tokens=i == 0)["input_ids"]
                ids += piece
                labels += piece if trained else [-100] * len(piece)
            slots = [t for t in ids if t in (self.image_token_id, self.video_token_id)]
            if slots != [token_of[modality] for modality, _ in sample]:
                raise ValueError(
                    f"prompt has {slots.count(self.image_token_id)} <image> and {slots.count(self.video_token_id)} "
                    f"<video> placeholders, not matching the sample's media: {prompt!r}"
                )
            remaining = iter(sample)
            row: list[int] = []
            target: list[int] = []
            for token, label in zip(ids, labels):
                if token in (self.image_token_id, self.video_token_id):
                    modality, index = next(remaining)
                    item = items[modality][index]
                    columns = (~item.newline).nonzero().squeeze(1)
                    placed.append((b, len(row), item.tokens.shape[0], modality, index, item.grid, columns))
                    row.extend([token] * item.tokens.shape[0])
                    target.extend([-100] * item.tokens.shape[0])
                else:
                    row.append(token)
                    target.append(label)
            answer = [] if answers is None else self.answer_ids(answers[b])
            rows.append(row + answer)
            targets.append(target + answer)
        outputs = {}
        if image_items:
            outputs["image"] = BaseModelOutputWithPooling(pooler_output=[i.tokens for i in image_items])
        if video_items:  # the model flattens [*, *, D]: one row of all videos' tokens in order
            outputs["video"] = BaseModelOutputWithPooling(
                pooler_output=torch.cat([i.tokens for i in video_items])[None]
            )
        labelled = answers is not None or any(not isinstance(p, str) for p in prompts)
        return assemble(
            rows,
            targets if labelled else None,
            placed,
            outputs,
            self.tokenizer.pad_token_id,
            self.device,
        )

    def prepare(
        self,
        questions: Sequence[str],
        images: Sequence[Sequence[Image.Image]],
        *,
        videos: Sequence[Sequence[Video]] | None = None,
        answers: Sequence[str] | None = None,
    ) -> SplicedInputs:
        """Questions with their images and videos (and answers, for training) -> the reduced, spliced LLM inputs."""
        videos = videos if videos is not None else [[] for _ in questions]
        if not len(questions) == len(images) == len(videos):
            raise ValueError(
                f"{len(questions)} questions, {len(images)} image lists, {len(videos)} video lists"
            )
        image_items = self.image_items(self.preprocess(images)) if any(images) else []
        flat_videos = [video for sample in videos for video in sample]
        video_items = self.video_items(self.preprocess_videos(flat_videos)) if flat_videos else []
        media = _media(images, videos)
        prompts = [self.format_prompt(q, len(i), len(v)) for q, i, v in zip(questions, images, videos)]
        if self.reduces_at_llm_input:
            return self._prepare_at_llm_input(prompts, media, image_items, video_items, answers)
        return self.splice(prompts, media, image_items, video_items, answers)

    def prepare_conversations(
        self,
        conversations: Sequence[Sequence[tuple[str, bool]]],
        images: Sequence[Sequence[Image.Image]],
    ) -> SplicedInputs:
        """Multi-turn training inputs: rendered conversations (`tokenprune.data.instruct.render` with
        the `onevision_chatml` template, one "<image>\\n" per image in the first) -> LLM inputs with
        labels on the trained segments. The reducer runs in the forward (the loss reaches the projector)."""
        image_items = self.image_items(self.preprocess(images)) if any(images) else []
        media = _media(images, [[] for _ in images])
        if self.reduces_at_llm_input:
            self.check_oracle()
            return self._prepare_at_llm_input(conversations, media, image_items, [], None)
        return self.splice(conversations, media, image_items, [])

    def image_token_budget(self) -> int:
        """An upper bound on the LLM tokens of one image: the base crop plus an anyres canvas of at
        most 3x3 crops (`anyres_max_9` shrinks larger ones), each of its rows ended by a newline."""
        side = self.side
        return side * side + 9 * side * side + 3 * side

    # ------------------------------------------------------------------ reduction at the LLM input
    def _prepare_at_llm_input(
        self,
        prompts: Sequence[str],
        media: Sequence[Sequence[tuple[str, int]]],
        image_items: list[Item],
        video_items: list[Item],
        answers: Sequence[str] | None,
    ) -> SplicedInputs:
        """Splice every visual token, compute the LLM-input signals, reduce each image and video as one
        sequence of its non-newline tokens, splice the kept ones (then one newline) per item. Positions:
        `reducer.positions` "gather" keeps the unreduced ones (a reduced item's newline takes its last
        newline's), "renumber" (or no such attribute) numbers the reduced sequence contiguously."""
        full = self.splice(prompts, media, image_items, video_items, answers)

        def prompt_inputs() -> SplicedInputs:  # autograd-usable copies (explain_oracle)
            cloned = [
                [Item(i.tokens.clone(), i.newline, i.grid) for i in items]
                for items in (image_items, video_items)
            ]
            return self.splice(prompts, media, *cloned)

        signals = self.llm_input_signals(full, prompt_inputs, answers)
        reduced: dict[str, list[Item]] = {"image": [], "video": []}
        sources: dict[tuple[str, int], torch.Tensor] = {}
        for modality, items in (("image", image_items), ("video", video_items)):
            columns = [(~item.newline).nonzero().squeeze(1) for item in items]
            features = [item.tokens[c] for item, c in zip(items, columns)]
            results = reduce_items(self.reducer, modality, features, [i.grid for i in items], signals)
            for index, (item, kept, result) in enumerate(zip(items, columns, results)):
                count = item.tokens.shape[0]
                if result.unchanged:  # exactly the model's own tokens
                    reduced[modality].append(item)
                    sources[(modality, index)] = torch.arange(count)
                else:  # the kept tokens, then the item's last newline
                    tokens = torch.cat([result.features, item.tokens[-1:]])
                    ends = torch.arange(len(tokens)) == len(tokens) - 1
                    reduced[modality].append(Item(tokens, ends, item.grid))
                    sources[(modality, index)] = torch.cat(
                        [kept[result.index.cpu()], torch.tensor([count - 1])]
                    )
        inputs = self.splice(prompts, media, reduced["image"], reduced["video"], answers)
        if getattr(self.reducer, "positions", "renumber") == "gather":
            inputs.position_ids = gathered_positions(full, inputs, sources)
            inputs.gathered_positions = True
        return inputs


def _media(images: Sequence[Sequence], videos: Sequence[Sequence]) -> list[list[tuple[str, int]]]:
    """Per sample, ("image" | "video", flat item index) of its placeholders: its images, then its videos."""
    media, counter = [], {"image": 0, "video": 0}
    for sample_images, sample_videos in zip(images, videos):
        media.append([])
        for modality, count in (("image", len(sample_images)), ("video", len(sample_videos))):
            media[-1] += [(modality, counter[modality] + i) for i in range(count)]
            counter[modality] += count
    return media
