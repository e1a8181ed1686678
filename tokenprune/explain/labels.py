"""Relevance labels for the explainability mapper: `python -m tokenprune.label model=... data=...`.

For every sample of a question-answer source (`configs/source/`), on the *unreduced* model:

1. the model answers greedily (`label.max_new_tokens`); with `label.only_correct` a sample whose
   answer does not match the reference (`label.match`) is skipped and counted (the paper keeps
   only correctly answered samples);
2. the mapper's input: `llm_text_attn` of the prompt, computed by the adapter exactly as at
   inference (layer-0 q/k under SDPA);
3. the target: the GAE relevance of the explained answer (`label.explain`: the model's own
   generated tokens, or the reference answer teacher-forced), EOS excluded unless
   `label.include_eos`, one backward per answer token (`tokenprune.models.gae`);
4. one record per image or video (input vector, relevance vector, grid, modality, sample id) into
   sharded files (`tokenprune.explain.shards`). A rerun skips every sample already labelled or
   skipped, so a killed run resumes (losing at most the unwritten shard buffer).

Any adapter with the LLM-input signals works: LLaVA (one record per image, its 24x24 grid),
Qwen2-VL / Qwen2.5-VL and LLaVA-OneVision (one record per image or video, the grid of the tokens
their LLM-input reducers see: a video's frames are one record with frames > 1).

Samples are processed one at a time (the relevance needs one backward per answer token per
sample anyway); the answer generation is the only step a batch would speed up.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tokenprune.explain.shards import SUMMARY_FILE, LabelRecord, ShardWriter, summarize
from tokenprune.models.base import Adapter

log = logging.getLogger(__name__)

MATCHES = ("exact", "contains")
EXPLAIN = ("generated", "reference")
WRONG_ANSWER = "wrong_answer"
EMPTY_ANSWER = "empty_answer"
NO_IMAGE = "no_image"


@dataclass
class LabelSample:
    """One question about images and/or videos, with its reference answer (or why it cannot be used).

    `videos` (each a `tokenprune.types.Video` or its frames) need an adapter with `supports_video`.
    """

    id: str
    question: str
    reference: str
    images: list[Image.Image]
    problem: str | None = None  # a skip reason (missing / corrupt image, no image, ...)
    videos: list[Any] = field(default_factory=list)


@dataclass
class InstructLabelData:
    """LLaVA-format instruction JSON (`tokenprune.data.instruct`) as question-answer samples.

    Attributes:
        json: the JSON list.
        image_root: the folder its image paths are relative to.
        turns: "first": the first (question, answer) turn of each record (later turns may depend on
            the conversation); "all": every turn as its own single-turn sample (`<id>#<k>`), for
            data whose turns are independent questions (the shapes world).
    """

    json: str
    image_root: str
    turns: str = "first"

    def __post_init__(self) -> None:
        if self.turns not in ("first", "all"):
            raise ValueError(f"turns must be first or all, got {self.turns!r}")

    def samples(self) -> Iterator[LabelSample]:
        from tokenprune.data.instruct import IMAGE, load_records, open_image, parse_record

        for position, record in enumerate(load_records(self.json)):
            sample = parse_record(record, position)
            if isinstance(sample, str):
                rid = str(record.get("id", position)) if isinstance(record, dict) else str(position)
                yield LabelSample(rid, "", "", [], problem=sample)
                continue
            images: list[Image.Image] = []
            problem = None if sample.images else NO_IMAGE
            for relative in sample.images:
                opened = open_image(Path(self.image_root) / relative)
                if isinstance(opened, str):
                    problem = opened
                    break
                images.append(opened)
            turns = sample.turns if self.turns == "all" else sample.turns[:1]
            for k, (question, answer) in enumerate(turns):
                sid = sample.id if self.turns == "first" else f"{sample.id}#{k}"
                text = question.replace(IMAGE, "").strip()
                yield LabelSample(sid, text, answer.strip(), images, problem=problem)


@dataclass
class ShapesLabelData:
    """Questions of the synthetic shapes world (`tokenprune.data.shapes`), generated on the fly.

    Attributes:
        split: train | val | test (labels for a mapper: train).
        n: images (each with all its questions, `<item id>#<k>`).
        seed: the world's seed.
        start: the first item index.
    """

    split: str = "train"
    n: int = 100
    seed: int = 0
    start: int = 0

    def samples(self) -> Iterator[LabelSample]:
        from tokenprune.data.shapes import make_item

        for index in range(self.start, self.start + self.n):
            item = make_item(index, self.split, self.seed)
            image = item.image()
            for k, question in enumerate(item.questions):
                yield LabelSample(f"{item.id}#{k}", question.prompt, question.answer, [image])


@dataclass
class LabelSettings:
    """`label.*`: what is explained and where the labels go.

    Attributes:
        output_dir: the label folder (shards, skipped.jsonl, summary.json).
        only_correct: skip samples whose greedy answer does not match the reference (the paper).
        match: exact (normalised strings equal) | contains (the normalised reference is a word
            sequence inside the answer). Normalisation: lower case, punctuation and articles
            removed, spaces collapsed.
        explain: generated (the model's own greedy answer, the paper) | reference (the reference
            answer, teacher-forced; with only_correct=false the only choice on a weak model).
        max_new_tokens: longest generated answer.
        include_eos: also explain the end-of-sequence token.
        target: the differentiated score: logit (GAE's convention) | logprob.
        shard_size: records per shard file.
        limit: consider only the first `limit` samples of the source (None: all).
        progress: show a progress bar.
    """

    output_dir: str
    only_correct: bool = True
    match: str = "exact"
    explain: str = "generated"
    max_new_tokens: int = 16
    include_eos: bool = False
    target: str = "logit"
    shard_size: int = 256
    limit: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.match not in MATCHES:
            raise ValueError(f"match must be one of {MATCHES}, got {self.match!r}")
        if self.explain not in EXPLAIN:
            raise ValueError(f"explain must be one of {EXPLAIN}, got {self.explain!r}")
        if self.target not in ("logit", "logprob"):
            raise ValueError(f"target must be logit or logprob, got {self.target!r}")


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def is_correct(answer: str, reference: str, match: str = "exact") -> bool:
    a, r = normalise(answer), normalise(reference)
    if match == "exact":
        return a == r
    return bool(r) and f" {r} " in f" {a} "


def label_sample(
    adapter: Adapter, sample: LabelSample, settings: LabelSettings
) -> tuple[list[LabelRecord], str | None, dict]:
    """Records of one sample, or the reason it is skipped; plus what was answered (for the log)."""
    media = {}
    if sample.videos:
        if not adapter.capabilities.supports_video:
            raise ValueError(
                f"sample {sample.id} has videos, which the {adapter.capabilities.family} adapter does not take"
            )
        media["videos"] = [sample.videos]
    with torch.no_grad():
        inputs = adapter.prepare([sample.question], [sample.images], **media)
        generated = adapter.greedy_answer_ids(inputs, settings.max_new_tokens)[0]
    answer = adapter.tokenizer.decode(generated, skip_special_tokens=True).strip()
    info = {"answer": answer, "reference": sample.reference}
    if settings.only_correct and not is_correct(answer, sample.reference, settings.match):
        return [], WRONG_ANSWER, info
    ids = generated if settings.explain == "generated" else adapter.answer_ids(sample.reference)
    eos = adapter.tokenizer.eos_token_id
    explained = ids if settings.include_eos else [t for t in ids if t != eos]
    if not explained:
        return [], EMPTY_ANSWER, info
    with torch.no_grad():
        text_attn = adapter.text_attention(inputs)  # per image / video: [N_i]
    relevance = adapter.answer_relevance(inputs, [explained], target=settings.target)  # the same
    grids, modalities = [b.grid for b in inputs.blocks], [b.modality for b in inputs.blocks]
    many = len(text_attn) > 1
    text = adapter.tokenizer.decode(explained, skip_special_tokens=True).strip()
    records = [
        LabelRecord(
            id=f"{sample.id}/{j}" if many else sample.id,
            sample=sample.id,
            text_attn=text_attn[j],
            relevance=relevance[j],
            grid=tuple(grids[j]),
            answer=text,
            modality=modalities[j],
        )
        for j in range(len(text_attn))
    ]
    return records, None, info


def label(
    adapter: Adapter, data: Any, settings: LabelSettings, meta: dict[str, str] | None = None
) -> dict[str, Any]:
    """Label every not-yet-done sample of `data` into `settings.output_dir`; returns the folder's summary."""
    from tqdm.auto import tqdm

    from tokenprune.atomic import atomic_write_text

    writer = ShardWriter(settings.output_dir, settings.shard_size, meta=meta)
    done = writer.done_samples()
    counts: Counter[str] = Counter()
    started = time.monotonic()
    bar = tqdm(total=settings.limit, desc="labels", unit="sample", disable=not settings.progress)
    try:
        for position, sample in enumerate(data.samples()):
            if settings.limit is not None and position >= settings.limit:
                break
            bar.update(1)
            if sample.id in done:
                counts["already_done"] += 1
                continue
            done.add(sample.id)
            if sample.problem is not None:
                writer.skip(sample.id, sample.problem)
                counts[sample.problem] += 1
                continue
            records, reason, info = label_sample(adapter, sample, settings)
            if reason is not None:
                writer.skip(sample.id, reason, **info)
                counts[reason] += 1
            else:
                writer.add(records)
                counts["labelled"] += 1
            bar.set_postfix(labelled=counts["labelled"], skipped=sum(counts.values()) - counts["labelled"])
    finally:
        bar.close()
        writer.close()
    summary = {
        **summarize(settings.output_dir),
        "this_run": dict(counts),
        "this_run_wall_s": round(time.monotonic() - started, 3),
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        **(meta or {}),
    }
    atomic_write_text(Path(settings.output_dir) / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
    log.info(
        "labels in %s: %d samples labelled (%d records), %d skipped %s",
        settings.output_dir,
        summary["labelled_samples"],
        summary["records"],
        summary["skipped_samples"],
        summary["skipped_by_reason"],
    )
    return summary


def run(cfg: Any) -> dict[str, Any]:
    """The entry point's job: load the unreduced model, label the data source, print the counts."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from tokenprune.reducers.baselines import NoReduction

    settings = instantiate(cfg.label)
    data = instantiate(cfg.source)
    adapter = instantiate(cfg.model, reducer=NoReduction())
    picked = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    meta = {"model": picked.get("model", str(cfg.model.get("path", ""))), "data": picked.get("data", "")}
    summary = label(adapter, data, settings, meta=meta)
    print(
        f"labels: {summary['labelled_samples']} samples labelled ({summary['records']} records), "
        f"{summary['skipped_samples']} skipped {summary['skipped_by_reason']} -> {settings.output_dir}"
    )
    return summary
