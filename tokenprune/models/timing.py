"""Stage timers for generation: synchronised CUDA events on a GPU, the wall clock on a CPU.

`StageClock` marks the start of a batch, the end of the visual encoding (preprocess, vision tower,
reducer, projector, splice) and, through a logits processor `generate` calls once per new token,
the end of the prefill and of every decode step. Events are recorded without synchronising in
the hot path; `summary()` synchronises once and converts them to milliseconds.
"""

from __future__ import annotations

import time
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
