"""lmms-eval model class `tokenprune`: any adapter + reducer, batched generation, failure records.

Used two ways:
* programmatically: `TokenPruneLMM(adapter=...)` passed to `simple_evaluate` (tokenprune.eval);
* from lmms-eval's CLI: `python -m lmms_eval --model tokenprune --model_args model=tiny_llava,reducer=random,reducer.keep=64`
  where every model_arg is a Hydra override of configs/eval.yaml.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

# generation kwargs lmms-eval tasks set that map onto HF generate()
_GENERATE_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "num_beams")


class TokenPruneLMM(lmms):
    """An lmms-eval `lmms` wrapping a tokenprune model adapter (with its reducer)."""

    def __init__(
        self,
        adapter: Any = None,
        batch_size: int | str = 1,
        device: str | None = None,
        max_batch_size: int | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if adapter is None:
            adapter = _adapter_from_overrides(overrides, device)
        elif overrides:
            raise TypeError(f"unexpected arguments with an adapter: {sorted(overrides)}")
        self.adapter = adapter
        self.batch_size = int(batch_size)
        self.records: list[dict[str, Any]] = []  # one per answered request, in completion order

    def clean(self) -> None:
        """Keep the model: the base class deletes nn.Module attributes after each evaluation."""

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str] = [""] * len(requests)
        batches = _batches(
            list(enumerate(requests)), self.batch_size, key=lambda item: _gen_key(item[1].args[1])
        )
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="tokenprune generate")
        for batch in batches:
            samples, loaded = [], []
            for position, request in batch:
                context, _gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                images, failure = self._load_visuals(doc_to_visual, task, split, doc_id)
                if failure is not None:
                    self.records.append(
                        {"task": task, "doc_id": doc_id, "failed": failure, "visual_tokens": 0}
                    )
                    continue
                samples.append((position, context, images, task, doc_id))
            if samples:
                gen_kwargs = dict(batch[0][1].args[1])
                texts, kept = self.adapter.generate(
                    [s[1] for s in samples], [s[2] for s in samples], **_generate_kwargs(gen_kwargs)
                )
                for (position, _c, _i, task, doc_id), text, tokens in zip(samples, texts, kept):
                    answers[position] = _truncate(text, gen_kwargs.get("until"))
                    loaded.append(
                        {"task": task, "doc_id": doc_id, "visual_tokens": tokens, "answer": answers[position]}
                    )
            self.records.extend(loaded)
            progress.update(len(batch))
        progress.close()
        return answers

    def _load_visuals(
        self, doc_to_visual: Callable, task: str, split: str, doc_id: int
    ) -> tuple[list, str | None]:
        """The request's images, fully decoded; or the reason they could not be read."""
        try:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            images = []
            for visual in visuals:
                if not isinstance(visual, Image.Image):
                    return (
                        [],
                        f"unsupported visual of type {type(visual).__name__} (this adapter takes images)",
                    )
                visual.load()
                images.append(visual.convert("RGB"))
            return images, None
        except Exception as error:  # a corrupt or missing image fails this sample only
            return [], f"{type(error).__name__}: {error}"

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "tokenprune evaluates generation tasks; loglikelihood tasks are not supported yet"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("tokenprune does not support multi-round generation tasks yet")


def _adapter_from_overrides(overrides: dict[str, Any], device: str | None) -> Any:
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
    """Cut the answer at the first stop string lmms-eval asked for."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text
