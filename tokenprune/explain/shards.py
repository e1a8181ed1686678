"""The relevance-label files: sharded safetensors, appendable, resumable, read back for training.

A label folder holds

    shard-00000.safetensors ...  one per `shard_size` records, written atomically (temp + rename):
        text_attn  [sum N] float32   the layer-0 text→visual attention vectors, concatenated
        relevance  [sum N] float32   the GAE relevance vectors, concatenated
        offsets    [S + 1] int64     record s is [offsets[s], offsets[s+1])
        grids      [S, 3]  int64     (frames, rows, cols) of each record's visual tokens
      metadata (strings): format, version, ids (JSON list: record ids), samples (JSON list: the
      sample id of each record), answers (JSON list: the explained answer text), modalities (JSON
      list: "image" | "video"; absent in older shards: all images)
    skipped.jsonl               one line per skipped sample: {"id", "reason", ...} (appended, fsynced)
    summary.json                counts and settings, rewritten at the end of every run

A record is one image or video of one sample (`<sample id>` for a sample with one, `<sample id>/<j>`
otherwise); a video's frames are one sequence, one record with frames > 1. The paper trains one
mapper per modality: train the video mapper on video label folders only.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenprune.atomic import atomic_file

FORMAT = "tokenprune-explain-labels"
SHARD_GLOB = "shard-*.safetensors"
SKIPPED_FILE = "skipped.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class LabelRecord:
    """One record: the mapper's input, its target, and where it came from."""

    id: str
    sample: str
    text_attn: torch.Tensor  # [N] float32
    relevance: torch.Tensor  # [N] float32
    grid: tuple[int, int, int]  # (frames, rows, cols)
    answer: str = ""
    modality: str = "image"  # image | video


class ShardWriter:
    """Buffers records and writes a shard every `shard_size` of them; remembers what is done.

    Args:
        folder: the label folder (created).
        shard_size: records per shard (a killed run loses at most the unwritten buffer).
        meta: extra metadata strings for every shard (e.g. the model).
    """

    def __init__(self, folder: str | Path, shard_size: int = 256, meta: dict[str, str] | None = None) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.meta = dict(meta or {})
        self.buffer: list[LabelRecord] = []
        shards = sorted(self.folder.glob(SHARD_GLOB))
        self.next_shard = 1 + max((int(p.stem.split("-")[1]) for p in shards), default=-1)

    def done_samples(self) -> set[str]:
        """Sample ids already labelled (in a shard) or skipped (in skipped.jsonl): a rerun skips them."""
        done = {record.sample for record in read_labels([self.folder], tensors=False)}
        return done | {entry["id"] for entry in read_skipped(self.folder)}

    def add(self, records: Iterable[LabelRecord]) -> None:
        self.buffer.extend(records)
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def skip(self, sample: str, reason: str, **extra: Any) -> None:
        line = json.dumps({"id": sample, "reason": reason, **extra}, default=str)
        with (self.folder / SKIPPED_FILE).open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def flush(self) -> None:
        """Write the buffered records as the next shard (atomic: a temp file renamed)."""
        from safetensors.torch import save_file

        if not self.buffer:
            return
        records, self.buffer = self.buffer, []
        lengths = [r.text_attn.numel() for r in records]
        offsets = torch.tensor([0, *lengths]).cumsum(0)
        tensors = {
            "text_attn": torch.cat([r.text_attn.detach().float().cpu().flatten() for r in records]),
            "relevance": torch.cat([r.relevance.detach().float().cpu().flatten() for r in records]),
            "offsets": offsets.long(),
            "grids": torch.tensor([list(r.grid) for r in records], dtype=torch.long),
        }
        meta = {
            **self.meta,
            "format": FORMAT,
            "version": "1",
            "ids": json.dumps([r.id for r in records]),
            "samples": json.dumps([r.sample for r in records]),
            "answers": json.dumps([r.answer for r in records]),
            "modalities": json.dumps([r.modality for r in records]),
        }
        path = self.folder / f"shard-{self.next_shard:05d}.safetensors"
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        self.next_shard += 1

    def close(self) -> None:
        self.flush()


def shard_files(folders: Sequence[str | Path]) -> list[Path]:
    """Every shard under the folders (recursively), in a stable order."""
    files: list[Path] = []
    for folder in folders:
        folder = Path(folder).expanduser()
        if folder.is_file():
            files.append(folder)
        elif folder.is_dir():
            files += sorted(folder.rglob(SHARD_GLOB))
    return files


def read_labels(folders: Sequence[str | Path], tensors: bool = True) -> list[LabelRecord]:
    """All records of the shards under `folders` (tensors=False: ids and grids only, empty vectors)."""
    from safetensors import safe_open

    records: list[LabelRecord] = []
    for path in shard_files(folders):
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a {FORMAT} shard")
            ids, samples = json.loads(meta["ids"]), json.loads(meta["samples"])
            answers = json.loads(meta.get("answers", "[]")) or [""] * len(ids)
            modalities = json.loads(meta.get("modalities", "[]")) or ["image"] * len(ids)
            grids = handle.get_tensor("grids").tolist()
            empty = torch.zeros(0)
            if tensors:
                offsets = handle.get_tensor("offsets").tolist()
                attn, rel = handle.get_tensor("text_attn"), handle.get_tensor("relevance")
            for s, (rid, sample) in enumerate(zip(ids, samples)):
                if tensors:
                    a, b = offsets[s], offsets[s + 1]
                    x, y = attn[a:b].clone(), rel[a:b].clone()
                else:
                    x = y = empty
                records.append(LabelRecord(rid, sample, x, y, tuple(grids[s]), answers[s], modalities[s]))
    return records


def read_skipped(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / SKIPPED_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return entries


def summarize(folder: str | Path) -> dict[str, Any]:
    """Counts of a label folder: samples labelled, records, skipped samples by reason."""
    records = read_labels([folder], tensors=False)
    skipped = read_skipped(folder)
    reasons = Counter(entry["reason"] for entry in skipped)
    return {
        "labelled_samples": len({r.sample for r in records}),
        "records": len(records),
        "skipped_samples": len({entry["id"] for entry in skipped}),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "shards": len(shard_files([folder])),
    }
