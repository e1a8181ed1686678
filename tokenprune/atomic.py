"""Atomic writes: a file or a folder is either the old one or the complete new one, never half-written.

The one place for it: result files, sample records, tables, label shards, trained stages and built
checkpoints all go through these. A run killed mid-write leaves the previous state, so it resumes.

* `atomic_write_bytes` / `atomic_write_text`: a temp file in the same folder, fsynced, then renamed.
* `atomic_file(path)`: a temp path beside `path` for writers that take a file name (safetensors, parquet).
* `atomic_folder(path)`: a staging folder beside `path`, renamed into place when the block succeeds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temp file in the same folder and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` to write by any means; it replaces `path` when the block succeeds
    and is removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; it becomes `path` when the block succeeds.

    replace=True: an existing `path` is replaced. replace=False: an existing `path` (another process built
    it first) is kept and the staging folder dropped. A failed block leaves `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield staging
        if replace:
            shutil.rmtree(path, ignore_errors=True)
        try:
            staging.rename(path)
        except OSError:  # not replacing, and another process made `path` first: keep theirs
            if replace or not path.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
