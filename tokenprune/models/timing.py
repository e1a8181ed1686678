"""Stage timers for generation: synchronised CUDA events on a GPU, the wall clock on a CPU.

`StageClock` marks the start of a batch, the end of the visual encoding (preprocess, vision tower,
reducer, projector, splice) and, through a logits processor `generate` calls once per new token,
the end of the prefill and of every decode step. Events are recorded without synchronising in
the hot path; `summary()` synchronises once and converts them to milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


class StageClock:
    """Marks on one device; `summary()` gives encode, prefill and decode times in milliseconds."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.device = torch.device(device)
        self.start: Any = None
        self.encoded: Any = None
        self.steps: list[Any] = []

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def begin(self) -> None:
        self.start, self.encoded, self.steps = self.mark(), None, []

    def end_encode(self) -> None:
        self.encoded = self.mark()

    def logits_processor(self) -> Any:
        """A transformers LogitsProcessor that marks each step (the first one ends the prefill)."""
        from transformers import LogitsProcessor

        clock = self

        class _StepMarker(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                clock.steps.append(clock.mark())
                return scores

        return _StepMarker()

    def _ms(self, a: Any, b: Any) -> float:
        if self.cuda:
            return float(a.elapsed_time(b))
        return (b - a) * 1000.0

    def summary(self) -> dict[str, float | int | str]:
        """encode_ms, prefill_ms (LLM prefill to the first logits), decode_ms (all decode steps),
        decode_steps, total_ms and the timer kind."""
        end = self.mark()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        first = self.steps[0] if self.steps else end
        last = self.steps[-1] if self.steps else end
        return {
            "encode_ms": self._ms(self.start, self.encoded),
            "prefill_ms": self._ms(self.encoded, first),
            "decode_ms": self._ms(first, last),
            "decode_steps": max(len(self.steps) - 1, 0),
            "total_ms": self._ms(self.start, end),
            "timer": "cuda_events" if self.cuda else "wall_clock",
        }


def generate_answers(
    model: Any,
    tokenizer: Any,
    prepare: Callable[[], Any],
    model_kwargs: Callable[[Any], dict[str, Any]],
    max_new_tokens: int,
    timing: dict | None,
    generate_kwargs: dict[str, Any],
) -> tuple[list[str], list[int]]:
    """The generation loop every adapter shares: prepare, generate, decode, and optionally time it.

    Args:
        model: the HF model (its `generate` and `device`).
        tokenizer: pads and decodes.
        prepare: builds the spliced inputs (`input_ids`, `attention_mask`, `visual_tokens`).
        model_kwargs: the inputs -> the keyword arguments of `model.generate` (the adapter decides
            which of its inputs generate receives, e.g. gathered position ids or none).
        timing: if a dict is given, it is filled with the batch's stage times (`StageClock.summary`)
            and per-sample `text_tokens` (prompt tokens other than visual ones) and `new_tokens`
            (generated, up to and including EOS).

    Returns:
        the stripped answers and each sample's visual token count.
    """
    clock = StageClock(model.device) if timing is not None else None
    if clock is not None:
        clock.begin()
    inputs = prepare()
    kwargs = model_kwargs(inputs)
    if clock is not None:
        from transformers import LogitsProcessorList

        clock.end_encode()
        kwargs["logits_processor"] = LogitsProcessorList([clock.logits_processor()])
    output = model.generate(
        **kwargs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **generate_kwargs
    )
    new_tokens = output[:, inputs.input_ids.shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    if clock is not None:
        timing.update(clock.summary())
        prompt_lengths = inputs.attention_mask.sum(-1).tolist()
        timing["text_tokens"] = [int(n) - v for n, v in zip(prompt_lengths, inputs.visual_tokens)]
        timing["new_tokens"] = generated_lengths(new_tokens, tokenizer.eos_token_id)
    return [t.strip() for t in texts], inputs.visual_tokens


def generated_lengths(new_tokens: torch.Tensor, eos_token_id: int | None) -> list[int]:
    """Per row, the generated tokens up to and including the first EOS (all of them without one)."""
    width = new_tokens.shape[1]
    if eos_token_id is None or width == 0:
        return [width] * new_tokens.shape[0]
    is_eos = new_tokens == eos_token_id  # [B, G]
    first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, width)  # [B]
    return first.tolist()
