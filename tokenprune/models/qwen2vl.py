"""Adapter for Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

One adapter serves both: they differ only inside the vision tower (Qwen2.5-VL's windowed
attention, whose token order the adapter undoes) and in the temporal spacing of video positions
(`second_per_grid_ts`, Qwen2.5-VL only), which `get_rope_index` handles.

Adapter decisions (docs/models.md):

* **Reduction point.** Qwen's `PatchMerger` is its projector: it turns each 2x2 group of ViT
  patches into one LLM token. The reducer sees one *view* per image and per video frame group
  (`temporal_patch_size` = 2 frames), its grid the merged (h/2, w/2) grid, i.e. exactly the tokens
  the LLM would get. `space="vision"` reducers get the 2x2 groups of the tower's output (what the
  merger consumes, [N, 4C], the four patches concatenated) and the merger runs on what they return;
  `space="llm"` reducers get the merger's output. The merger always sees whole 2x2 groups. Views
  of the same grid are reduced in one batched call.
* **Signals.** The tower has no CLS token: `vit_cls_attn` is the mean attention each patch
  receives in the last vision block (all heads and queries of its attention segment: one frame
  group; a window when Qwen2.5-VL's last block is windowed), summed over the 2x2 group, so it sums
  to 1 per view; `vit_keys` are that block's keys before the rotary embedding, the four patches
  concatenated (`tokenprune.models.signals.qwen_vision_attention`, computed under SDPA from the
  block's own `qkv`; a forward pre-hook on the last block, removed right after, captures its input).
* **M-RoPE.** Positions are computed by the model's own `get_rope_index` on the *unpruned*
  sequence (every image and video at its full token count) and gathered for the kept tokens, so
  a kept token keeps its (t, h, w) position and the text after an image keeps its offset (gaps
  allowed). A synthetic token (`Reduced.index == -1`, e.g. PruMerge's extra token) takes the
  position of its view's centre token (row h'//2, column w'//2 of its frame group). The LLM gets
  `position_ids` [4, B, L] (text row for the mask, then t/h/w); `generate` continues every row
  from its last value + 1, as it does for the unreduced model.
* **Video.** Frames are resized like images (one size per video, `video_min_pixels` ..
  `video_max_pixels`), patchified into `temporal_patch_size` frame groups as Qwen2VLVideoProcessor
  does (which itself needs torchvision), and reduced per frame group.
* **At the LLM input** (a reducer that reads `llm_text_attn` / `relevance`, e.g. the explainability
  mapper): every image and video is spliced unreduced, the signals are computed on that splice
  (`_views.LlmInput`: layer 0's q/k with the M-RoPE (t, h, w) positions of `get_rope_index`), and
  each image, and each video with all its frame groups as one sequence (grid (t * h', w')), is
  reduced among the merger's output tokens; the kept ones are spliced with their unpruned M-RoPE
  positions gathered, as for any reducer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune.models._views import (
    SplicedInputs,
    View,
    assemble,
    reduce_items,
    reduce_views,
    video_frames,
)
from tokenprune.models.base import AdapterCore, Capabilities, load_pretrained
from tokenprune.models.signals import qwen_vision_attention
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

QWEN_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{images}{question}<|im_end|>\n<|im_start|>assistant\n"
)
IMAGE_MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_MARKER = "<|vision_start|><|video_pad|><|vision_end|>"
FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@dataclass
class EncodedMedia:
    """Reduced visual tokens of a flat list of images (or of videos), ready for the LLM.

    Attributes:
        features: per item [k_i, D_llm].
        sources: per item [k_i] long; the position of each token in the item's unpruned token run
            (frame group g, patch p -> g * h'w' + p; a synthetic token -> its frame group's centre).
        full: per item, its unpruned token count (t * h' * w').
        grid_thw: [I, 3] the items' patch grids (before the 2x2 merge), as the model takes them.
        seconds: [I] seconds per temporal grid step (videos; Qwen2.5-VL's `second_per_grid_ts`).
    """

    features: list[torch.Tensor]
    sources: list[torch.Tensor]
    full: list[int]
    grid_thw: torch.Tensor
    seconds: list[float]


class Qwen2VLAdapter(AdapterCore):
    """Qwen2-VL / Qwen2.5-VL (ViT + PatchMerger + Qwen2 LLM with M-RoPE) with a reducer in the loop."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        family="qwen2_vl", supports_video=True, supports_training=True, supports_visualize=False
    )

    def __init__(
        self,
        model,
        image_processor,
        tokenizer,
        reducer: Reducer | None = None,
        prompt: str = QWEN_PROMPT,
        video_min_pixels: int | None = None,
        video_max_pixels: int | None = None,
        video_fps: float = 2.0,
    ) -> None:
        config = model.config
        if config.model_type not in FAMILIES:
            raise ValueError(
                f"Qwen2VLAdapter takes {FAMILIES} checkpoints, got model_type {config.model_type!r}"
            )
        super().__init__(
            model, tokenizer, reducer, {"image": config.image_token_id, "video": config.video_token_id}
        )
        self.image_processor = image_processor
        self.prompt = prompt
        self.windowed = config.model_type == "qwen2_5_vl"
        vision = config.vision_config
        self.merge = vision.spatial_merge_size
        self.temporal_patch = vision.temporal_patch_size
        self.image_token_id = config.image_token_id
        self.video_token_id = config.video_token_id
        size = image_processor.size
        self.video_size = {
            "shortest_edge": video_min_pixels or size["shortest_edge"],
            "longest_edge": video_max_pixels or size["longest_edge"],
        }
        self.video_fps = video_fps

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        reducer: Reducer | None = None,
        dtype: str = "bfloat16",
        attn_implementation: str = "sdpa",
        device: str = "auto",
        prompt: str = QWEN_PROMPT,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        video_min_pixels: int | None = None,
        video_max_pixels: int | None = None,
        video_fps: float = 2.0,
        build: str | None = None,
    ) -> Qwen2VLAdapter:
        """Load a Qwen2-VL or Qwen2.5-VL checkpoint (local folder or hub id in the HF cache).

        Args:
            path: checkpoint folder or hub id (e.g. Qwen/Qwen2-VL-7B-Instruct).
            reducer: the visual-token reducer (None: no reduction).
            dtype: float32 | float16 | bfloat16 | float64.
            attn_implementation: sdpa | flash_attention_2 | eager (for the whole model).
            device: auto | cpu | cuda | cuda:N.
            prompt: the conversation format; `{images}` becomes one vision marker per image, then
                one per video.
            min_pixels, max_pixels: image resize bounds (None: the checkpoint's image processor's).
            video_min_pixels, video_max_pixels: per-frame resize bounds for video (None: as images).
            video_fps: frames per second assumed for a video given without fps (Qwen2.5-VL positions).
            build: name of a tiny test model to build at `path` when it is missing (tokenprune.models.tiny).
        """
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        model, (tokenizer, image_processor) = load_pretrained(
            path,
            build,
            AutoModelForImageTextToText,
            dtype,
            attn_implementation,
            device,
            lambda source: (
                AutoTokenizer.from_pretrained(source),
                AutoImageProcessor.from_pretrained(source),
            ),
        )
        bounds = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        if any(v is not None for v in bounds.values()):
            size = dict(image_processor.size)
            size.update({k: v for k, v in bounds.items() if v is not None})
            image_processor.size = size
        return cls(
            model,
            image_processor,
            tokenizer,
            reducer=reducer,
            prompt=prompt,
            video_min_pixels=video_min_pixels,
            video_max_pixels=video_max_pixels,
            video_fps=video_fps,
        )

    def projector(self) -> torch.nn.Module:
        """The trainable bridge between the vision tower and the LLM (the 2x2 PatchMerger)."""
        return self.model.model.visual.merger

    def vision_flops(self) -> None:
        """No analytic formula for Qwen's variable-resolution tower yet (LLM FLOPs are still counted)."""
        return None

    # ------------------------------------------------------------------ vision side
    def preprocess(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images -> (pixel_values [P, C*2*p*p] flattened patches, image_grid_thw [I, 3])."""
        out = self.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return out["pixel_values"].to(self.device, self.model.dtype), out["image_grid_thw"]

    def preprocess_videos(self, videos: Sequence) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """Videos -> (pixel_values_videos [P, C*2*p*p], video_grid_thw [V, 3], seconds per grid step [V]).

        Every frame is resized by the image processor to the video's one size; frames are grouped
        by `temporal_patch_size` (the last frame repeated to fill the last group) in the layout of
        Qwen2VLVideoProcessor: per group, merge block-major patches of (C, t, p, p).
        """
        patches, grids, seconds = [], [], []
        step = self.temporal_patch
        for video in videos:
            frames, fps = video_frames(video)
            out = self.image_processor(
                images=frames, size=self.video_size, temporal_patch_size=1, return_tensors="pt"
            )
            grid = out["image_grid_thw"]  # [T, 3], rows (1, gh, gw)
            if not bool((grid == grid[0]).all()):
                raise ValueError("all frames of a video must have the same size")
            _, gh, gw = grid[0].tolist()
            flat = out["pixel_values"].view(len(frames), gh * gw, 3, -1)  # [T, n, C, p*p]
            if pad := -len(frames) % step:
                flat = torch.cat([flat, flat[-1:].expand(pad, -1, -1, -1)])
            groups = flat.shape[0] // step
            flat = flat.view(groups, step, gh * gw, 3, -1).permute(0, 2, 3, 1, 4)  # [T', n, C, t, p*p]
            patches.append(flat.reshape(groups * gh * gw, -1))
            grids.append([groups, gh, gw])
            seconds.append(step / (fps or self.video_fps))
        pixel_values = torch.cat(patches).to(self.device, self.model.dtype)
        return pixel_values, torch.tensor(grids), seconds

    def _wants_signals(self) -> bool:
        return any(
            name in self.input_reducer.requires for name in (VIT_CLS_ATTN, VIT_KEYS, *FEATURE_LAYER_SIGNALS)
        )

    def tower(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the vision tower once. All outputs are per merged token (2x2 group), in raster order
        of (t, h', w') over the items in turn:

        units [U, 4C] (the merger's input), merged [U, D] (its output) and, when the reducer asks
        for them, vit_cls_attn [U] and vit_keys [U, 4C].
        """
        visual = self.model.model.visual
        wants = self._wants_signals()
        captured: dict = {}

        def grab(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["cu_seqlens"] = kwargs["cu_seqlens"]
            captured["position_embeddings"] = kwargs["position_embeddings"]

        handle = visual.blocks[-1].register_forward_pre_hook(grab, with_kwargs=True) if wants else None
        try:
            out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw.to(pixel_values.device))
        finally:
            if handle is not None:
                handle.remove()
        unit = self.merge**2
        order = self._raster_order(grid_thw)
        hidden = out.last_hidden_state  # [P, C], the tower's (window) order
        result = {"units": hidden.reshape(-1, unit * hidden.shape[-1]), "merged": out.pooler_output}
        block = (
            visual.blocks[-1],
            captured.get("hidden"),
            captured.get("cu_seqlens"),
            captured.get("position_embeddings"),
        )
        if any(name in self.input_reducer.requires for name in (VIT_CLS_ATTN, VIT_KEYS)):
            received, keys = qwen_vision_attention(*block)
            result[VIT_CLS_ATTN] = received.view(-1, unit).sum(-1)  # [U]
            result[VIT_KEYS] = keys.reshape(-1, unit * keys.shape[-1])  # [U, 4C]
        if any(name in self.input_reducer.requires for name in FEATURE_LAYER_SIGNALS):
            # the last block feeds the merger: it is the feature layer (VisionZip / VisPruner, no CLS)
            per_head, keys = qwen_vision_attention(*block, per_head=True)  # [P, H], [P, C]
            heads = per_head.shape[-1]
            result[VIT_CLS_ATTN_HEADS] = per_head.view(-1, unit, heads).sum(1)  # [U, H]
            grouped = keys.view(-1, unit, heads, keys.shape[-1] // heads).transpose(1, 2)  # [U, H, 4, d]
            result[VIT_FEAT_KEYS] = grouped.reshape(-1, unit * keys.shape[-1])  # [U, H * 4d] heads-major
        if order is not None:
            result.update({k: v[order] for k, v in result.items() if k != "merged"})
        return result

    def _raster_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Qwen2.5-VL: the permutation from the tower's window order back to raster order (per 2x2 unit)."""
        if not self.windowed:
            return None
        from transformers.vision_utils import get_vision_window_index

        vision = self.model.config.vision_config
        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=self.merge,
            window_size=vision.window_size,
            patch_size=vision.patch_size,
        )
        return torch.argsort(window_index).to(self.device)

    def views(self, tower: dict[str, torch.Tensor], grid_thw: torch.Tensor) -> list[View]:
        """One view per frame group of every item: the reducer's input (space picks units or merged)."""
        key = "units" if self.input_reducer.space == "vision" else "merged"
        names = [
            name for name in (VIT_CLS_ATTN, VIT_KEYS, VIT_CLS_ATTN_HEADS, VIT_FEAT_KEYS) if name in tower
        ]
        views, start = [], 0
        for t, h, w in grid_thw.tolist():
            rows, cols = h // self.merge, w // self.merge
            for _ in range(t):
                span = slice(start, start + rows * cols)
                signals = {name: tower[name][span] for name in names}
                if VIT_CLS_ATTN in signals:  # summed over the frame's queries -> mean: sums to 1 per view
                    signals[VIT_CLS_ATTN] = signals[VIT_CLS_ATTN] / (h * w)
                if VIT_CLS_ATTN_HEADS in signals:  # the same per head -> [H, n]
                    signals[VIT_CLS_ATTN_HEADS] = (signals[VIT_CLS_ATTN_HEADS] / (h * w)).T
                if VIT_CLS_FEATURE in self.input_reducer.requires:  # no CLS token
                    signals[VIT_CLS_FEATURE] = tower[key].new_zeros(0)
                views.append(View(tower[key][span], (rows, cols), signals))
                start += rows * cols
        return views

    def encode(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, seconds: Sequence[float] = ()
    ) -> EncodedMedia:
        """Flattened patches of some images (or videos) -> per-item reduced LLM tokens and their sources."""
        tower = self.tower(pixel_values, grid_thw)
        views = self.views(tower, grid_thw)
        reduced = reduce_views(self.input_reducer, views)
        features, start = [], 0
        for view, result in zip(views, reduced):
            if result.unchanged:  # exactly the model's own merged tokens
                features.append(tower["merged"][start : start + view.features.shape[0]])
            else:
                features.append(result.features)
            start += view.features.shape[0]
        merge = (
            [i for i, r in enumerate(reduced) if not r.unchanged]
            if self.input_reducer.space == "vision"
            else []
        )
        if merge:  # one merger call for every reduced view: [sum k, 4C] -> [sum k, D]
            groups = torch.cat([features[i] for i in merge])
            merged = self.model.model.visual.merger(groups.reshape(-1, groups.shape[-1] // self.merge**2))
            for i, tokens in zip(merge, merged.split([features[i].shape[0] for i in merge])):
                features[i] = tokens
        out = EncodedMedia([], [], [], grid_thw, list(seconds))
        position = 0
        for t, h, w in grid_thw.tolist():
            rows, cols = h // self.merge, w // self.merge
            centre = (rows // 2) * cols + cols // 2
            chunk = range(position, position + t)
            out.features.append(torch.cat([features[v] for v in chunk]))
            out.sources.append(
                torch.cat(
                    [
                        torch.where(reduced[v].index >= 0, reduced[v].index, centre).cpu() + g * rows * cols
                        for g, v in enumerate(chunk)
                    ]
                )
            )
            out.full.append(t * rows * cols)
            position += t
        return out

    # ------------------------------------------------------------------ text side
    def format_prompt(self, question: str, n_images: int, n_videos: int = 0) -> str:
        return self.prompt.format(images=IMAGE_MARKER * n_images + VIDEO_MARKER * n_videos, question=question)

    def splice(
        self,
        prompts: Sequence[str | Sequence[tuple[str, bool]]],
        images: Sequence[Sequence[int]],
        videos: Sequence[Sequence[int]],
        encoded_images: EncodedMedia | None,
        encoded_videos: EncodedMedia | None,
        answers: Sequence[str] | None = None,
    ) -> SplicedInputs:
        """Tokenize prompts, give every image/video its kept count of placeholders, gather M-RoPE.

        Args:
            prompts: one per sample with one image (video) placeholder per image (video): a string
                (no labels), or a conversation as (text, trained) segments whose trained tokens are
                labels (-100 elsewhere).
            images, videos: per sample, the indices of its images (videos) in the encoded lists.
            encoded_images, encoded_videos: the reduced tokens (None when there are none).
            answers: per sample, the assistant's reply for teacher forcing (answer + eos, labelled).
        """
        rope_index = self.model.model.get_rope_index
        rows, targets, positions, placed = [], [], [], []
        for b, prompt in enumerate(prompts):
            ids, labels = [], []
            segments = [(prompt, False)] if isinstance(prompt, str) else prompt
            for i, (text, trained) in enumerate(segments):
                piece = self.tokenizer(text, add_special_tokens=i == 0)["input_ids"]
                ids += piece
                labels += piece if trained else [-100] * len(piece)
            answer = [] if answers is None else self.answer_ids(answers[b])
            pending = {self.image_token_id: list(images[b]), self.video_token_id: list(videos[b])}
            expected = {k: len(v) for k, v in pending.items()}
            if [sum(t == k for t in ids) for k in pending] != list(expected.values()):
                raise ValueError(
                    f"prompt has {sum(t == self.image_token_id for t in ids)} image and "
                    f"{sum(t == self.video_token_id for t in ids)} video placeholders but "
                    f"{expected[self.image_token_id]} images and {expected[self.video_token_id]} videos: {prompt!r}"
                )
            full, types, row, gather, target = [], [], [], [], []
            for token, label in zip(ids + answer, labels + answer):
                if token in pending:
                    media = encoded_images if token == self.image_token_id else encoded_videos
                    item = pending[token].pop(0)
                    t, h, w = media.grid_thw[item].tolist()
                    modality = "image" if token == self.image_token_id else "video"
                    grid = (t, h // self.merge, w // self.merge)
                    placed.append((b, len(row), len(media.sources[item]), modality, item, grid))
                    start = len(full)
                    full += [token] * media.full[item]
                    types += [1 if token == self.image_token_id else 2] * media.full[item]
                    row += [token] * len(media.sources[item])
                    target += [-100] * len(media.sources[item])
                    gather += (media.sources[item] + start).tolist()
                else:
                    gather.append(len(full))
                    full.append(token)
                    types.append(0)
                    row.append(token)
                    target.append(label)
            extra = {}
            if self.windowed and videos[b]:
                extra["second_per_grid_ts"] = torch.tensor([encoded_videos.seconds[i] for i in videos[b]])
            pos3, _ = rope_index(
                torch.tensor([full]),
                mm_token_type_ids=torch.tensor([types]),
                image_grid_thw=encoded_images.grid_thw[list(images[b])] if images[b] else None,
                video_grid_thw=encoded_videos.grid_thw[list(videos[b])] if videos[b] else None,
                **extra,
            )
            positions.append(pos3[:, 0, gather])  # [3, L_b]
            rows.append(row)
            targets.append(target)
        outputs = {}
        if encoded_images is not None and encoded_images.features:
            outputs["image"] = BaseModelOutputWithPooling(pooler_output=encoded_images.features)
        if encoded_videos is not None and encoded_videos.features:
            outputs["video"] = BaseModelOutputWithPooling(pooler_output=encoded_videos.features)
        labelled = answers is not None or any(not isinstance(p, str) for p in prompts)
        inputs = assemble(
            rows,
            targets if labelled else None,
            placed,
            outputs,
            self.tokenizer.pad_token_id,
            self.device,
        )
        width = inputs.input_ids.shape[1]
        spatial = torch.zeros(3, len(rows), width, dtype=torch.long)
        for b, pos in enumerate(positions):
            spatial[:, b, width - pos.shape[1] :] = pos
        inputs.position_ids = torch.cat([inputs.position_ids[None], spatial.to(self.device)])  # [4, B, L]
        return inputs

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
        flat_images = [image for sample in images for image in sample]
        flat_videos = [video for sample in videos for video in sample]
        image_ids, video_ids = _number(images), _number(videos)
        prompts = [self.format_prompt(q, len(i), len(v)) for q, i, v in zip(questions, images, videos)]
        if self.reduces_at_llm_input:
            full_images = self.unreduced(*self.preprocess(flat_images)) if flat_images else None
            full_videos = self.unreduced(*self.preprocess_videos(flat_videos)) if flat_videos else None
            return self._prepare_at_llm_input(
                prompts, image_ids, video_ids, full_images, full_videos, answers
            )
        encoded_images = self.encode(*self.preprocess(flat_images)) if flat_images else None
        encoded_videos = self.encode(*self.preprocess_videos(flat_videos)) if flat_videos else None
        return self.splice(prompts, image_ids, video_ids, encoded_images, encoded_videos, answers)

    def prepare_conversations(
        self,
        conversations: Sequence[Sequence[tuple[str, bool]]],
        images: Sequence[Sequence[Image.Image]],
    ) -> SplicedInputs:
        """Multi-turn training inputs: rendered conversations (`tokenprune.data.instruct.render` with
        the `qwen_chatml` template, one vision marker per image in the first) -> LLM inputs with labels
        on the trained segments. The reducer runs in the forward, so the loss reaches the merger."""
        image_ids, video_ids = _number(images), [[] for _ in images]
        flat = [image for sample in images for image in sample]
        if self.reduces_at_llm_input:
            self.check_oracle()
            full_images = self.unreduced(*self.preprocess(flat)) if flat else None
            return self._prepare_at_llm_input(conversations, image_ids, video_ids, full_images, None, None)
        encoded = self.encode(*self.preprocess(flat)) if flat else None
        return self.splice(conversations, image_ids, video_ids, encoded, None)

    def image_token_budget(self) -> int:
        """The most LLM tokens one image can give (the image processor's max_pixels, merged 2x2)."""
        vision = self.model.config.vision_config
        return self.image_processor.size["longest_edge"] // (vision.patch_size * self.merge) ** 2

    # ------------------------------------------------------------------ reduction at the LLM input
    def unreduced(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, seconds: Sequence[float] = ()
    ) -> EncodedMedia:
        """Flattened patches of some images (or videos) -> every item's merged tokens, unreduced."""
        merged = self.tower(pixel_values, grid_thw)["merged"]  # [U, D]
        counts = [t * h * w // self.merge**2 for t, h, w in grid_thw.tolist()]
        sources = [torch.arange(n) for n in counts]
        return EncodedMedia(list(merged.split(counts)), sources, counts, grid_thw, list(seconds))

    def _prepare_at_llm_input(
        self,
        prompts: Sequence[str],
        image_ids: Sequence[Sequence[int]],
        video_ids: Sequence[Sequence[int]],
        images: EncodedMedia | None,
        videos: EncodedMedia | None,
        answers: Sequence[str] | None,
    ) -> SplicedInputs:
        """Splice every visual token, compute the LLM-input signals, reduce each image and video as one
        sequence, and splice the kept tokens with their unpruned M-RoPE positions (`splice` gathers them).

        Raises:
            ValueError: the reducer asks for `positions="renumber"`: M-RoPE positions are (t, h, w)
                grid coordinates, which a 1-D renumbering cannot give; they are always gathered.
        """
        if getattr(self.reducer, "positions", "gather") != "gather":
            raise ValueError(
                "Qwen2-VL keeps the M-RoPE (t, h, w) positions of the unpruned sequence for every kept "
                f"token; positions={self.reducer.positions!r} is not supported (use gather)"
            )
        full = self.splice(prompts, image_ids, video_ids, images, videos, answers)

        def prompt_inputs() -> SplicedInputs:  # autograd-usable copies (explain_oracle)
            return self.splice(prompts, image_ids, video_ids, _cloned(images), _cloned(videos))

        signals = self.llm_input_signals(full, prompt_inputs, answers)
        reduced = {}
        for modality, media in (("image", images), ("video", videos)):
            if media is None:
                continue
            grids = [(t, h // self.merge, w // self.merge) for t, h, w in media.grid_thw.tolist()]
            results = reduce_items(self.reducer, modality, media.features, grids, signals)
            reduced[modality] = EncodedMedia(
                [r.features for r in results],
                [r.index.cpu() for r in results],
                media.full,
                media.grid_thw,
                media.seconds,
            )
        return self.splice(prompts, image_ids, video_ids, reduced.get("image"), reduced.get("video"), answers)


def _cloned(media: EncodedMedia | None) -> EncodedMedia | None:
    if media is None:
        return None
    return EncodedMedia(
        [f.clone() for f in media.features], media.sources, media.full, media.grid_thw, media.seconds
    )


def _number(per_sample: Sequence[Sequence]) -> list[list[int]]:
    """Per sample, the flat indices of its items (items numbered across samples in order)."""
    out, start = [], 0
    for sample in per_sample:
        out.append(list(range(start, start + len(sample))))
        start += len(sample)
    return out
