"""The adapter contract every model family implements, and the code the families share.

`Adapter` is the typed protocol callers (evaluation, labels, the meter, training, visualize) rely
on; they never probe an adapter with `getattr` or a family name. `Capabilities` declares what a
family supports, so a caller can refuse clearly and at once. `AdapterCore` is the implementation
the three families (`LlavaAdapter`, `Qwen2VLAdapter`, `LlavaOnevisionAdapter`) share: loading,
the LLM-input signals (`_views.LlmInput`), generation with stage timings, the teacher-forced loss
and the reduction point inside the LLM (`tokenprune.models.layered`, reducers with
`space="llm_layer"`). A family adds its vision side and its splice (`prepare`).

Reduction points (`Capabilities.reduction_points`):

* "vision": on the vision tower's features, before the projector (`space="vision"`);
* "llm": on the projected tokens (`space="llm"`);
* "llm_input": on the spliced, unreduced LLM input (reducers reading `types.LLM_SIGNALS`);
* "llm_layer": after decoder layer K inside the LLM (`space="llm_layer"`, `types.LayerReducer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from PIL import Image

from tokenprune.models._loading import hub_error, resolve_checkpoint, resolve_device, resolve_dtype
from tokenprune.models._views import LlmInput, SplicedInputs
from tokenprune.models.layered import LayerRunner
from tokenprune.models.timing import generate_answers
from tokenprune.reducers.baselines import NoReduction
from tokenprune.types import (
    FEATURE_LAYER_SIGNALS,
    LLM_LAYER_SIGNALS,
    LLM_SIGNALS,
    RELEVANCE,
    VIT_CLS_ATTN,
    VIT_KEYS,
    Reducer,
    Video,
    VisualTokens,
)

REDUCTION_POINTS = ("vision", "llm", "llm_input", "llm_layer")


@dataclass(frozen=True)
class Capabilities:
    """What a model family supports; callers check these instead of probing the adapter.

    Attributes:
        family: the family's name (for messages and result files only).
        supports_video: `prepare` / `generate` take `videos` through the model's own video path.
        supports_training: the LoRA stage works (`prepare_conversations`, `projector`).
        supports_visualize: `python -m tokenprune.visualize` works (`visual_view`).
        reduction_points: where a reducer can run (module docstring).
        image_aspects: the `image_aspect` values the adapter takes (empty: the processor's own).
        signals: every signal name its reducers may require.
    """

    family: str
    supports_video: bool
    supports_training: bool
    supports_visualize: bool
    reduction_points: tuple[str, ...] = REDUCTION_POINTS
    image_aspects: tuple[str, ...] = ()
    signals: tuple[str, ...] = (
        VIT_CLS_ATTN,
        VIT_KEYS,
        *FEATURE_LAYER_SIGNALS,
        *LLM_SIGNALS,
        *LLM_LAYER_SIGNALS,
    )


@dataclass(frozen=True)
class VisionFlops:
    """The vision tower as the analytic FLOPs formulas see it (`tokenprune.eval.flops.VisionShape`)."""

    depth: int
    width: int
    mlp_width: int
    patches: int
    patch_size: int
    channels: int = 3


@runtime_checkable
class Adapter(Protocol):
    """The contract of a model family with a visual-token reducer in the loop.

    Inputs are per sample: `questions[b]`, `images[b]` (PIL images) and, keyword-only, `videos[b]`
    (`types.Video` or frames; only where `capabilities.supports_video`) and `answers[b]` (teacher
    forcing). Outputs of `prepare` are `SplicedInputs` (left-padded, one `Block` per image / video).
    """

    capabilities: ClassVar[Capabilities]
    model: Any
    tokenizer: Any
    reducer: Any
    image_aspect: str | None

    @property
    def device(self) -> torch.device: ...

    def prepare(
        self,
        questions: Sequence[str],
        images: Sequence[Sequence[Image.Image]],
        *,
        videos: Sequence[Sequence[Video]] | None = None,
        answers: Sequence[str] | None = None,
    ) -> SplicedInputs: ...

    def prepare_conversations(
        self, conversations: Sequence[Sequence[tuple[str, bool]]], images: Sequence[Sequence[Image.Image]]
    ) -> SplicedInputs: ...

    def loss(self, inputs: SplicedInputs) -> torch.Tensor: ...

    def generate(
        self,
        questions: Sequence[str],
        images: Sequence[Sequence[Image.Image]],
        *,
        videos: Sequence[Sequence[Video]] | None = None,
        max_new_tokens: int = 16,
        timing: dict | None = None,
        **generate_kwargs: Any,
    ) -> tuple[list[str], list[int]]: ...

    def answer_ids(self, answer: str) -> list[int]: ...

    def greedy_answer_ids(self, inputs: SplicedInputs, max_new_tokens: int) -> list[list[int]]: ...

    def text_attention(self, inputs: SplicedInputs) -> list[torch.Tensor]: ...

    def answer_relevance(
        self, inputs: SplicedInputs, answer_ids: Sequence[Sequence[int]], target: str = "logit"
    ) -> list[torch.Tensor]: ...

    def projector(self) -> torch.nn.Module: ...

    def image_token_budget(self) -> int: ...

    def vision_flops(self) -> VisionFlops | None: ...

    def visual_view(self, image: Image.Image) -> tuple[Image.Image, VisualTokens]: ...


def load_pretrained(
    path: str,
    build: str | None,
    model_class: Any,
    dtype: str,
    attn_implementation: str,
    device: str,
    parts: Callable[[str], tuple],
) -> tuple[Any, tuple]:
    """Load a checkpoint's model (on `device`, eval mode) and its processing parts (`parts(source)`).

    Raises:
        FileNotFoundError: the checkpoint is neither a local folder nor in the HF cache (how to get it).
    """
    source = resolve_checkpoint(path, build)
    try:
        loaded = parts(source)
        model = model_class.from_pretrained(
            source, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
        )
    except OSError as error:
        raise hub_error(path, error) from error
    model.to(resolve_device(device)).eval()
    return model, loaded


class AdapterCore:
    """What every family shares: reducer routing, LLM-input signals, generation, loss, the in-LLM point.

    A family subclass sets `capabilities` and `answer_prefix`, and implements `prepare` (vision side
    and splice, reducing with `input_reducer`), `projector` and `vision_flops`.

    Args:
        model: the HF model (`model.model.language_model` holds the decoder layers).
        tokenizer: its tokenizer (must have a pad token).
        reducer: the reducer (None: no reduction).
        token_ids: the placeholder token id per modality ("image", "video").
    """

    capabilities: ClassVar[Capabilities]
    answer_prefix: ClassVar[str] = ""  # prepended to a teacher-forced answer (LLaVA: " ")
    image_aspect: str | None = None

    def __init__(self, model: Any, tokenizer: Any, reducer: Any, token_ids: dict[str, int]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.reducer = reducer if reducer is not None else NoReduction()
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; set one in the checkpoint's tokenizer_config.json"
            )
        self.llm_input = LlmInput(model, tokenizer, token_ids, SplicedInputs.generate_kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ reducer routing
    @property
    def reduces_at_llm_input(self) -> bool:
        """Whether the reducer reads a signal of the spliced LLM input (it then runs there)."""
        return any(name in LLM_SIGNALS for name in self.reducer.requires)

    @property
    def reduces_in_llm(self) -> bool:
        """Whether the reducer runs inside the LLM, after decoder layer K (`space="llm_layer"`)."""
        return self.reducer.space == "llm_layer"

    @property
    def layers(self) -> LayerRunner | None:
        """The LLM run in segments cut by the reducer (None: the reducer does not run inside the LLM)."""
        return LayerRunner(self.model, self.llm_input) if self.reduces_in_llm else None

    @property
    def input_reducer(self) -> Reducer:
        """The reducer the vision side applies: none for a reducer at the LLM input or inside the LLM."""
        return NoReduction() if self.reduces_at_llm_input or self.reduces_in_llm else self.reducer

    # ------------------------------------------------------------------ answers, signals
    def answer_ids(self, answer: str) -> list[int]:
        """A teacher-forced reply's token ids: the answer, then EOS."""
        ids = self.tokenizer(self.answer_prefix + answer, add_special_tokens=False)["input_ids"]
        return [*ids, self.tokenizer.eos_token_id]

    def text_attention(self, inputs: SplicedInputs) -> list[torch.Tensor]:
        """`llm_text_attn` of an unreduced splice: per image / video (`inputs.blocks`), [n] float32."""
        return self.llm_input.text_attention(inputs)

    def answer_relevance(
        self, inputs: SplicedInputs, answer_ids: Sequence[Sequence[int]], target: str = "logit"
    ) -> list[torch.Tensor]:
        """GAE relevance of each sample's answer per image / video of an unreduced prompt splice."""
        return self.llm_input.answer_relevance(inputs, answer_ids, target)

    def greedy_answer_ids(self, inputs: SplicedInputs, max_new_tokens: int) -> list[list[int]]:
        """The model's greedy answer to each prompt: token ids up to and including EOS."""
        return self.llm_input.greedy_answer_ids(inputs, max_new_tokens)

    def llm_input_signals(
        self,
        full: SplicedInputs,
        prompt_inputs: Callable[[], SplicedInputs],
        answers: Sequence[str] | None,
    ) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
        """The LLM-input signals the reducer requires, per (modality, item) of the unreduced splice."""
        given = None if answers is None else [self.answer_ids(a) for a in answers]
        return self.llm_input.signals(self.reducer, full, prompt_inputs, given)

    # ------------------------------------------------------------------ running the LLM
    def loss(self, inputs: SplicedInputs) -> torch.Tensor:
        """The teacher-forced loss of labelled inputs (mean over labelled tokens), reducer in the loop."""
        if inputs.labels is None:
            raise ValueError("loss needs labelled inputs (prepare with answers, or prepare_conversations)")
        if (runner := self.layers) is not None:
            return runner.loss(self.reducer, inputs)
        return self.model(**inputs.as_kwargs(), use_cache=False).loss

    def logits(self, inputs: SplicedInputs) -> torch.Tensor:
        """[B, L', V] logits of every position the last layer holds (L' = L without an in-LLM reducer)."""
        if (runner := self.layers) is not None:
            return runner.forward(self.reducer, inputs).logits
        kwargs = inputs.as_kwargs()
        kwargs.pop("labels", None)
        return self.model(**kwargs, use_cache=False).logits

    def generate(
        self,
        questions: Sequence[str],
        images: Sequence[Sequence[Image.Image]],
        *,
        videos: Sequence[Sequence[Video]] | None = None,
        max_new_tokens: int = 16,
        timing: dict | None = None,
        **generate_kwargs: Any,
    ) -> tuple[list[str], list[int]]:
        """Batched generation; returns the decoded answers and each sample's visual token count.

        Args:
            questions: one per sample.
            images: per sample, its images (PIL).
            videos: per sample, its videos (families with `supports_video`); None: no videos.
            timing: if a dict is given, it is filled with the batch's stage times
                (`tokenprune.models.timing.StageClock.summary`: encode_ms, prefill_ms, decode_ms,
                decode_steps, total_ms, timer), per-sample `text_tokens` (prompt tokens other than
                visual ones) and `new_tokens` (generated, up to and including EOS), and, with a
                reducer inside the LLM, per-sample `layer_tokens` (the visual tokens after each cut).
        """
        if videos is not None and any(videos) and not self.capabilities.supports_video:
            raise ValueError(f"the {self.capabilities.family} adapter takes no videos (images only)")
        layers = self.layers
        runner = self.model if layers is None else layers.bound(self.reducer)
        with torch.inference_mode():
            out = generate_answers(
                runner,
                self.tokenizer,
                lambda: self.prepare(questions, images, videos=videos),
                SplicedInputs.generate_kwargs,
                max_new_tokens,
                timing,
                generate_kwargs,
            )
        if timing is not None and layers is not None:
            timing["layer_tokens"] = runner.layer_tokens
        return out

    # ------------------------------------------------------------------ optional capabilities
    def image_token_budget(self) -> int:
        """The most visual tokens one image gives the LLM (training data length budgets)."""
        raise ValueError(f"the {self.capabilities.family} adapter has no fixed image token count")

    def visual_view(self, image: Image.Image) -> tuple[Image.Image, VisualTokens]:
        raise ValueError(
            f"the {self.capabilities.family} adapter does not support visualize yet (it draws one "
            "patch grid per image); use a llava model"
        )

    def check_oracle(self) -> None:
        """Training refuses a reducer that reads `relevance` (it explains the model's own answers)."""
        if RELEVANCE in self.reducer.requires:
            raise ValueError("a reducer that reads `relevance` (explain_oracle) is for evaluation only")
