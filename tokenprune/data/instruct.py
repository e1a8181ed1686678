"""LLaVA instruction data: the JSON format, rendering with a conversation template (tokenprune.templates), a fault-tolerant dataset, batching.

The format is LLaVA's (e.g. `llava_v1_5_mix665k.json`): a JSON list of

    {"id": "...", "image": "coco/train2017/000000033471.jpg",     # optional; a list for several images
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                       {"from": "gpt", "value": "The ..."}, ...]}

with image paths relative to an image root. As in LLaVA's preprocessing, every `<image>` is
moved to the start of the first human turn (one per image), leading non-human turns are dropped
and the labels are the assistant replies with their end token (`</s>` for vicuna_v1).

Broken samples never stop an epoch. Structural problems (no conversation, no assistant reply,
turns out of order, a bad image field) are found when the file is loaded; missing or corrupt
images and samples longer than `max_length` are found when a sample is read, and the next
loadable sample stands in for it. Every skip is logged as a warning with the sample id and
reason, and reported: `InstructDataset.skipped` (at load) and each item's `skipped` list.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from tokenprune.data.images import strict_decoding
from tokenprune.templates import IMAGE, ConversationTemplate

log = logging.getLogger(__name__)

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
# Skip reasons (counted and logged).
NO_CONVERSATIONS = "no_conversations"
BAD_TURNS = "bad_turns"
NO_ASSISTANT_TURN = "no_assistant_turn"
BAD_IMAGE_FIELD = "bad_image_field"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
TOO_LONG = "too_long"


@dataclass(frozen=True)
class Sample:
    """One parsed instruction sample: its images (relative paths) and (user, assistant) turns."""

    id: str
    images: tuple[str, ...]
    turns: tuple[tuple[str, str], ...]


def parse_record(record: Any, position: int = 0) -> Sample | str:
    """One JSON record -> a Sample, or the reason it cannot be trained on."""
    if not isinstance(record, Mapping):
        return NO_CONVERSATIONS
    sample_id = str(record.get("id", position))
    conversation = record.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        return NO_CONVERSATIONS
    roles = []
    for turn in conversation:
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            return BAD_TURNS
        role = turn.get("from")
        if role not in USER_ROLES + ASSISTANT_ROLES:
            return BAD_TURNS
        roles.append("user" if role in USER_ROLES else "assistant")
    start = roles.index("user") if "user" in roles else len(roles)  # LLaVA drops leading non-human turns
    turns, pending = [], None
    for role, turn in zip(roles[start:], conversation[start:]):
        if role == "user":
            if pending is not None:
                return BAD_TURNS  # two user turns in a row
            pending = turn["value"]
        else:
            if pending is None:
                return BAD_TURNS  # two assistant turns in a row
            turns.append((pending, turn["value"]))
            pending = None
    if not turns:
        return NO_ASSISTANT_TURN
    image = record.get("image")
    images = () if image is None else (image,) if isinstance(image, str) else image
    if not isinstance(images, list | tuple) or not all(isinstance(i, str) and i for i in images):
        return BAD_IMAGE_FIELD
    return Sample(id=sample_id, images=tuple(images), turns=tuple(turns))


def render(
    turns: Sequence[tuple[str, str]], n_images: int, template: ConversationTemplate
) -> list[tuple[str, bool]]:
    """A conversation -> (text, trained) segments: context segments, then each reply + end (trained).

    Every `<image>` in the text is removed and one `template.image` per image starts the first
    user message (LLaVA's preprocess_multimodal).
    """
    segments: list[tuple[str, bool]] = []
    prefix = template.system
    for k, (user, reply) in enumerate(turns):
        message = user.replace(IMAGE, "").strip()
        if k == 0:
            message = template.image * n_images + message
        segments.append((prefix + template.user.replace("{text}", message), False))
        segments.append((template.assistant.replace("{text}", reply.replace(IMAGE, "")) + template.end, True))
        prefix = ""
    return segments


def count_tokens(tokenizer: Any, segments: Sequence[tuple[str, bool]]) -> int:
    """Text tokens of rendered segments, tokenized as the adapter's splice does (specials on the first)."""
    return sum(
        len(tokenizer(text, add_special_tokens=i == 0)["input_ids"]) for i, (text, _) in enumerate(segments)
    )


def load_records(path: str | os.PathLike) -> list[Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"instruction data {path} not found; set train.data.json (and train.data.image_root) "
            "to a LLaVA-format JSON such as llava_v1_5_mix665k.json"
        )
    with path.open(encoding="utf-8") as handle:
        records = json.load(handle)
    if not isinstance(records, list):
        raise ValueError(f"{path} is not a JSON list of samples (LLaVA instruction format)")
    return records


def open_image(path: Path) -> Image.Image | str:
    """A decoded RGB image, or the reason it cannot be used."""
    if not path.is_file():
        return MISSING_IMAGE
    try:
        with strict_decoding(), Image.open(path) as image:
            return image.convert("RGB")  # decodes fully: truncated files fail here
    except (OSError, ValueError, Image.DecompressionBombError):
        return CORRUPT_IMAGE


class InstructDataset(Dataset):
    """LLaVA-format instruction samples rendered with a conversation template.

    An item is `{"id", "conversation": [(text, trained), ...], "images": [PIL], "skipped": [(id, reason)]}`:
    `skipped` lists the broken samples that were passed over to reach it (their reasons counted).

    Args:
        records: the JSON list (see `load_records`).
        image_root: folder the image paths are relative to.
        tokenizer: the model's tokenizer (for the exact length check).
        template: the conversation template.
        max_length: samples longer than this (text tokens + image_tokens per image) are skipped;
            None: no limit.
        image_tokens: visual tokens counted per image for max_length and length grouping (an
            upper bound: reducers keep at most this many).
    """

    def __init__(
        self,
        records: Sequence[Any],
        image_root: str | os.PathLike,
        tokenizer: Any,
        template: ConversationTemplate,
        max_length: int | None = None,
        image_tokens: int = 576,
    ) -> None:
        self.image_root = Path(image_root)
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.image_tokens = image_tokens
        self.samples: list[Sample] = []
        self.skipped: Counter[str] = Counter()  # reason -> count, found at load
        for position, record in enumerate(records):
            parsed = parse_record(record, position)
            if isinstance(parsed, str):
                self.skipped[parsed] += 1
                if self.skipped.total() <= 10:
                    sample_id = record.get("id", position) if isinstance(record, Mapping) else position
                    log.warning("skipping instruction sample %s: %s", sample_id, parsed)
            else:
                self.samples.append(parsed)
        if self.skipped:
            log.warning(
                "skipped %d of %d instruction samples at load: %s",
                self.skipped.total(),
                len(records),
                dict(self.skipped),
            )
        if not self.samples:
            raise ValueError(
                f"no usable instruction sample among {len(records)} records ({dict(self.skipped)})"
            )
        self._broken: set[int] = set()  # positions found broken in this process

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        """Cheap length estimates for grouping (words + image tokens), as LLaVA's `modality_lengths`."""
        return [
            sum(len(u.split()) + len(a.split()) for u, a in s.turns) + self.image_tokens * len(s.images)
            for s in self.samples
        ]

    @property
    def has_image(self) -> list[bool]:
        return [bool(s.images) for s in self.samples]

    def load(self, position: int) -> dict[str, Any] | str:
        """The item at `position`, or the reason it is broken."""
        sample = self.samples[position]
        conversation = render(sample.turns, len(sample.images), self.template)
        if self.max_length is not None:
            length = count_tokens(self.tokenizer, conversation) + len(sample.images) * (self.image_tokens - 1)
            if length > self.max_length:
                return TOO_LONG
        images = []
        for name in sample.images:
            image = open_image(self.image_root / name)
            if isinstance(image, str):
                return image
            images.append(image)
        return {"id": sample.id, "conversation": conversation, "images": images}

    def __getitem__(self, position: int) -> dict[str, Any]:
        skipped = []
        for step in range(len(self)):
            candidate = (position + step) % len(self)
            if candidate in self._broken:
                continue
            item = self.load(candidate)
            if not isinstance(item, str):
                return {**item, "skipped": skipped}
            self._broken.add(candidate)
            sample_id = self.samples[candidate].id
            skipped.append((sample_id, item))
            log.warning(
                "skipping instruction sample %s: %s (the next loadable sample stands in)", sample_id, item
            )
        raise RuntimeError(f"no loadable instruction sample in {len(self)} (all broken: {skipped[:10]} ...)")


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Items -> a batch of lists (the adapter tokenizes, reduces and splices in the forward)."""
    return {
        "ids": [item["id"] for item in items],
        "conversations": [item["conversation"] for item in items],
        "images": [item["images"] for item in items],
        "skipped": [entry for item in items for entry in item["skipped"]],
    }


class LengthGroupedSampler(Sampler[int]):
    """This rank's sample positions, in batches of similar length and one modality, reshuffled each epoch.

    Each global batch holds `batch_size * num_replicas` samples of one modality (with or without
    images, as LLaVA's `group_by_modality_length`), taken from a random megabatch of
    `megabatch` global batches sorted by length; rank r gets every num_replicas-th of them, so
    the ranks' batches have similar lengths. A modality's last global batch is filled by wrapping
    around, so every rank sees the same number of batches. The order depends only on (seed,
    epoch), so a resumed run can skip the batches it already trained on (`resume`).

    Args:
        lengths: per sample, a length estimate.
        batch_size: samples per batch on one rank.
        has_image: per sample, whether it has images (None: one group).
        num_replicas: data-parallel ranks.
        rank: this rank.
        seed: base seed of the shuffles.
        megabatch: global batches per sorted megabatch (1: group only within a global batch).
        group_by_length: False: random batches (still one modality each).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        has_image: Sequence[bool] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        megabatch: int = 1,
        group_by_length: bool = True,
    ) -> None:
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas or megabatch < 1:
            raise ValueError(
                f"bad sampler settings: batch_size={batch_size}, num_replicas={num_replicas}, rank={rank}, "
                f"megabatch={megabatch}"
            )
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.megabatch = megabatch
        self.group_by_length = group_by_length
        flags = [True] * len(self.lengths) if has_image is None else list(has_image)
        self.groups = [
            g for g in ([i for i, f in enumerate(flags) if f], [i for i, f in enumerate(flags) if not f]) if g
        ]
        self.epoch = 0
        self.skip = 0  # batches of `epoch` already trained on (set by resume)

    @property
    def global_size(self) -> int:
        return self.batch_size * self.num_replicas

    def num_batches(self) -> int:
        """Batches per epoch on each rank."""
        return sum(math.ceil(len(g) / self.global_size) for g in self.groups)

    def __len__(self) -> int:
        return self.num_batches() * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def resume(self, epoch: int, batches: int) -> None:
        """Continue `epoch` after its first `batches` batches (the next epoch when it was finished)."""
        if batches >= self.num_batches():
            epoch, batches = epoch + 1, 0
        self.epoch, self.skip = epoch, batches

    def global_batches(self) -> list[list[int]]:
        """The epoch's global batches (every rank computes the same list)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        size = self.global_size
        batches = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            step = size * self.megabatch if self.group_by_length else size
            for start in range(0, len(order), step):
                chunk = order[start : start + step]
                if self.group_by_length:
                    chunk = sorted(chunk, key=lambda i: -self.lengths[i])
                batches += [chunk[k : k + size] for k in range(0, len(chunk), size)]
            if len(batches[-1]) < size:  # wrap around to fill the group's last batch
                batches[-1] = batches[-1] + [order[i % len(order)] for i in range(size - len(batches[-1]))]
                if self.group_by_length:
                    batches[-1].sort(key=lambda i: -self.lengths[i])
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self) -> Iterator[int]:
        batches = self.global_batches()[self.skip :]
        self.skip = 0
        for batch in batches:
            yield from batch[self.rank :: self.num_replicas]


@dataclass
class DataSettings:
    """`train.data`: where the instruction data is and how it is batched.

    Attributes:
        json: a LLaVA-format JSON list (e.g. llava_v1_5_mix665k.json).
        image_root: the folder its image paths are relative to.
        template: conversation template name (tokenprune.templates.TEMPLATES).
        max_length: samples longer than this many tokens (text + image_tokens per image) are skipped.
        image_tokens: tokens counted per image for max_length and grouping (None: the vision
            tower's patch count + 1, an upper bound for every reducer).
        batch_size: samples per batch on each device.
        num_workers: DataLoader worker processes (image decoding).
        group_by_length: batches of similar length and one modality (LLaVA's group_by_modality_length).
        megabatch: global batches per length-sorted megabatch.
    """

    json: str
    image_root: str
    template: str = "vicuna_v1"
    max_length: int | None = 2048
    image_tokens: int | None = None
    batch_size: int = 1
    num_workers: int = 0
    group_by_length: bool = True
    megabatch: int = 1
