"""lmms-eval model class `tokenprune`: any adapter + reducer, batched generation, failure records.

Used two ways:
* programmatically: `TokenPruneLMM(adapter=...)` passed to `simple_evaluate` (tokenprune.eval);
* from lmms-eval's CLI: `python -m lmms_eval --model tokenprune --model_args model=tiny_llava,reducer=random,reducer.keep=64`
  where every model_arg is a Hydra override of configs/eval.yaml.

Requests are batched (`batch_size`, grouped by generation settings); every answered request
gets a record with its visual, text and generated token counts and its batch's stage timings
(`tokenprune.models.timing`; one untimed warm-up generation runs first). With a `SampleStore`,
records are appended to a JSONL after each batch and answers recorded by an earlier run of the
same config are reused (resume). A video (a file path from the task's doc_to_visual) is decoded
into `video_frames` uniformly sampled frames (`tokenprune.eval.video`); an adapter that supports
video (`capabilities.supports_video`: Qwen2-VL temporal M-RoPE, OneVision frame pooling) gets them
as one `types.Video` through its own video path, an image-only adapter (LLaVA-1.5) as that many images.
Under torchrun (WORLD_SIZE > 1) the process group is initialised (gloo on CPU, NCCL on GPU) and
`_rank` / `_world_size` are set; lmms-eval shards the documents over the ranks.
"""

from __future__ import annotations

import itertools
import os
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from tokenprune.data.images import strict_decoding
from tokenprune.models.base import Adapter
from tokenprune.types import NonFiniteSignal, Video

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# generation kwargs lmms-eval tasks set that map onto HF generate()
_GENERATE_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "num_beams")


class TokenPruneLMM(lmms):
    """An lmms-eval `lmms` wrapping a tokenprune model adapter (with its reducer)."""

    def __init__(
        self,
        adapter: Adapter | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        max_batch_size: int | None = None,
        video_frames: int = 8,
        store: Any = None,
        timing: bool = True,
        warmup: int = 1,
        **overrides: Any,
    ) -> None:
        super().__init__()
        setup_distributed(self)
        if adapter is None:
            if device is None and self._world_size > 1:
                import torch

                if torch.cuda.is_available():  # one GPU per rank (torchrun sets LOCAL_RANK)
                    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            adapter = _adapter_from_overrides(overrides, device)
        elif overrides:
            raise TypeError(f"unexpected arguments with an adapter: {sorted(overrides)}")
        self.adapter = adapter
        self.batch_size = int(batch_size)
        self.video_frames = int(video_frames)
        self.store = store  # tokenprune.eval.records.SampleStore or None
        self.done = store.load() if store is not None else {}
        self.timing = timing  # every adapter's generate() fills a `timing` dict (the Adapter protocol)
        self.warmup = int(warmup)
        self.records: list[dict[str, Any]] = []  # one per answered request, in completion order
        self._run = uuid.uuid4().hex[:8]
        self._batches = itertools.count()

    @property
    def device(self) -> Any:
        return self.adapter.device

    def clean(self) -> None:
        """Keep the model: the base class deletes nn.Module attributes after each evaluation."""

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str] = [""] * len(requests)
        todo = []
        for position, request in enumerate(requests):
            _c, _g, _v, doc_id, task, _s = request.args
            earlier = self.done.get((task, doc_id))
            if earlier is not None:  # answered by an earlier run of this config: reuse it
                answers[position] = earlier["answer"]
                self.records.append({**earlier, "resumed": True})
            else:
                todo.append((position, request))
        batches = _batches(todo, self.batch_size, key=lambda item: _gen_key(item[1].args[1]))
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="tokenprune generate")
        progress.update(len(requests) - len(todo))
        for batch in batches:
            finished = self._run_batch(batch, answers)
            self.records.extend(finished)
            if self.store is not None:
                self.store.append(finished)
            progress.update(len(batch))
        progress.close()
        return answers

    def _run_batch(self, batch: list[tuple[int, Instance]], answers: list[str]) -> list[dict[str, Any]]:
        """Generate one batch; fills `answers` and returns the batch's records (failures included)."""
        samples, records = [], []
        for position, request in batch:
            context, _gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            images, videos, failure = self._load_visuals(doc_to_visual, task, split, doc_id)
            if failure is not None:
                records.append({"task": task, "doc_id": doc_id, "failed": failure, "visual_tokens": 0})
                continue
            samples.append((position, context, images, videos, task, doc_id))
        if not samples:
            return records
        gen_kwargs = dict(batch[0][1].args[1])
        kwargs = _generate_kwargs(gen_kwargs)
        aspect = gen_kwargs.get("image_aspect")
        if aspect not in self.adapter.capabilities.image_aspects:
            aspect = None  # a family without aspect options uses its processor's own
        previous = self.adapter.image_aspect
        if aspect is not None:
            self.adapter.image_aspect = aspect
        media = {"videos": [s[3] for s in samples]} if self.adapter.capabilities.supports_video else {}
        try:
            if self.timing and self.warmup > 0:
                self.warmup -= 1  # untimed: first-call costs (allocations, kernels) stay out of the meter
                first = {k: v[:1] for k, v in media.items()}
                self.adapter.generate(
                    [samples[0][1]], [samples[0][2]], **first, **{**kwargs, "max_new_tokens": 2}
                )
            timing: dict | None = {} if self.timing else None
            texts, kept = self.adapter.generate(
                [s[1] for s in samples], [s[2] for s in samples], **media, timing=timing, **kwargs
            )
        except NonFiniteSignal as error:  # fail the affected sample(s) only: retry the batch one by one
            if len(samples) > 1:
                positions = {s[0] for s in samples}
                alone = [item for item in batch if item[0] in positions]
                return records + [r for item in alone for r in self._run_batch([item], answers)]
            _position, _c, _images, _videos, task, doc_id = samples[0]
            failed = {
                "task": task,
                "doc_id": doc_id,
                "failed": f"NonFiniteSignal: {error}",
                "visual_tokens": 0,
            }
            return [*records, failed]
        finally:
            if aspect is not None:
                self.adapter.image_aspect = previous
        batch_info = None
        if timing is not None:
            batch_info = {
                k: timing[k]
                for k in ("encode_ms", "prefill_ms", "decode_ms", "decode_steps", "total_ms", "timer")
            }
            batch_info.update(id=f"{self._run}-{self.rank}-{next(self._batches)}", size=len(samples))
        for i, ((position, _c, images, videos, task, doc_id), text, tokens) in enumerate(
            zip(samples, texts, kept)
        ):
            answers[position] = _truncate(text, gen_kwargs.get("until"))
            record = {
                "task": task,
                "doc_id": doc_id,
                "answer": answers[position],
                "visual_tokens": tokens,
                "images": len(images),
                "videos": len(videos),
            }
            if timing is not None:
                record.update(
                    text_tokens=timing["text_tokens"][i], new_tokens=timing["new_tokens"][i], batch=batch_info
                )
                if "layer_tokens" in timing:  # a reducer inside the LLM: visual tokens after each cut
                    record["layer_tokens"] = timing["layer_tokens"][i]
            records.append(record)
        return records

    def _load_visuals(
        self, doc_to_visual: Callable, task: str, split: str, doc_id: int
    ) -> tuple[list[Image.Image], list[Video], str | None]:
        """The request's images and videos (`video_frames` sampled frames each: one `Video` for a
        video-capable adapter, else that many images), fully decoded; or why they could not be read."""
        try:
            with strict_decoding():  # a truncated image fails; it is not decoded as black
                visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
                images: list[Image.Image] = []
                videos: list[Video] = []
                for visual in visuals:
                    if isinstance(visual, str | os.PathLike):
                        from tokenprune.eval.video import sample_frames

                        frames = sample_frames(visual, self.video_frames)
                        if self.adapter.capabilities.supports_video:
                            videos.append(Video(frames))
                        else:
                            images.extend(frames)
                        continue
                    if not isinstance(visual, Image.Image):
                        kind = type(visual).__name__
                        return (
                            [],
                            [],
                            f"unsupported visual of type {kind} (this adapter takes images and videos)",
                        )
                    visual.load()
                    images.append(visual.convert("RGB"))
            return images, videos, None
        except Exception as error:  # a corrupt, truncated or missing image or video fails this sample only
            return [], [], f"{type(error).__name__}: {error}"

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "tokenprune evaluates generation tasks; loglikelihood tasks are not supported yet"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("tokenprune does not support multi-round generation tasks yet")


def setup_distributed(lm: lmms) -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group and set the model's rank and world size."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    lm._rank, lm._world_size = dist.get_rank(), dist.get_world_size()


def _adapter_from_overrides(overrides: dict[str, Any], device: str | None) -> Adapter:
    from hydra.utils import instantiate

    from tokenprune.config import compose

    args = [f"{key}={value}" for key, value in overrides.items()]
    if device is not None:
        args.append(f"model.device={device}")
    cfg = compose(args)
    return instantiate(cfg.model, reducer=instantiate(cfg.reducer))


def _gen_key(gen_kwargs: dict) -> str:
    return repr(sorted((k, repr(v)) for k, v in gen_kwargs.items()))


def _batches(items: list, size: int, key: Callable) -> list[list]:
    """Consecutive chunks of at most `size` items sharing the same key (generation settings)."""
    batches: list[list] = []
    for item in items:
        if batches and len(batches[-1]) < size and key(batches[-1][0]) == key(item):
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def _generate_kwargs(gen_kwargs: dict) -> dict[str, Any]:
    kwargs = {k: gen_kwargs[k] for k in _GENERATE_KEYS if k in gen_kwargs}
    kwargs.setdefault("max_new_tokens", 32)
    if not kwargs.get("do_sample") or not kwargs.get("temperature"):
        kwargs["do_sample"] = False
        kwargs.pop("temperature", None)
        kwargs.pop("top_p", None)
    return kwargs


def _truncate(text: str, until: str | Sequence[str] | None) -> str:
    """Cut the answer at the first stop string lmms-eval asked for; drop control characters (they
    break lmms-eval's Excel submission writers, e.g. MMBench's)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return _CONTROL.sub("", text)
