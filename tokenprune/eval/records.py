"""Per-sample records, appended as each batch completes, so that a killed run resumes.

`SampleStore` appends one JSON line per answered (or failed) request to a JSONL file and flushes
and fsyncs after every batch: a run killed at any point loses at most the batch in flight (a
half-written last line is skipped when reading). A rerun of the same config opens the same file
(its name derives from the config hash), loads the answered records keyed by (task, doc_id) and
reuses their answers instead of generating them again. Failed samples are retried.

With several ranks, each appends to its own part file (``<stem>.rank<r>.jsonl``); loading reads
the main file and every part, so a resumed run may use a different number of ranks. When the run
completes, rank 0 writes the main file atomically, ordered by (task, doc_id), and removes the parts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenprune.atomic import atomic_write_text

Key = tuple[str, int]


def record_key(record: Mapping[str, Any]) -> Key:
    return (str(record["task"]), int(record["doc_id"]))


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of one JSONL file; lines that do not parse (a killed write) are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "task" in record and "doc_id" in record:
            records.append(record)
    return records


class SampleStore:
    """Append-only per-sample records of one run (one file, or one part file per rank)."""

    def __init__(self, path: str | os.PathLike, rank: int = 0, world_size: int = 1) -> None:
        self.path = Path(path)
        self.rank = rank
        self.world_size = world_size
        self.part = (
            self.path if world_size == 1 else self.path.with_name(f"{self.path.stem}.rank{rank}.jsonl")
        )

    def part_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}.rank*.jsonl"))

    def load(self) -> dict[Key, dict[str, Any]]:
        """Answered records from earlier (killed or finished) runs of the same config, by key."""
        done: dict[Key, dict[str, Any]] = {}
        for file in [self.path, *self.part_files()]:
            for record in read_records(file):
                if "failed" not in record:
                    done[record_key(record)] = record
        return done

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append and make durable (flush + fsync) before returning."""
        lines = "".join(json.dumps(r, default=str) + "\n" for r in records)
        if not lines:
            return
        self.part.parent.mkdir(parents=True, exist_ok=True)
        with open(self.part, "a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def finalize(self, records: Iterable[Mapping[str, Any]]) -> Path:
        """Rank 0: write every record once, ordered, atomically; drop the part files."""
        ordered = sorted(dedupe(records).values(), key=lambda r: record_key(r))
        atomic_write_text(self.path, "".join(json.dumps(r, default=str) + "\n" for r in ordered))
        for part in self.part_files():
            part.unlink(missing_ok=True)
        return self.path

    def clear(self) -> None:
        """Forget earlier records (a run with force=true)."""
        for file in [self.path, *self.part_files()]:
            file.unlink(missing_ok=True)


def dedupe(records: Iterable[Mapping[str, Any]]) -> dict[Key, dict[str, Any]]:
    """One record per key: an answered record wins over a failed one, else the later one."""
    out: dict[Key, dict[str, Any]] = {}
    for record in records:
        key = record_key(record)
        if key in out and "failed" not in out[key] and "failed" in record:
            continue
        out[key] = dict(record)
    return out
