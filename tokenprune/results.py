"""Result files: one self-describing JSON per run (+ per-sample JSONL), written atomically.

Schema (`SCHEMA`): name, config_hash (`config_hash` of the resolved config: a rerun with the same hash
is skipped unless `force=true`), run (times, git sha + dirty flag, package versions, host, device,
command), choices (config group options), config (fully resolved), metrics (`bench/<task>/<metric>`,
`train/...`; with compare_to_full also `full/...`, `pct_of_full/...`, `agreement/<task>`), efficiency
(every figure of the efficiency meter, tokenprune/eval/meter.py, named as there without its `eff/`
prefix: `visual_tokens_mean/min/max`, `samples`, `failed_samples`, FLOPs, times, memory; and the run's
`wall_time_s`; read it with `efficiency(result)`, which also reads files written before the block was
one: those have a short `efficiency` summary beside an `eff` block of `eff/<name>` keys), tasks (where each task's data came from),
coverage (per task: documents `evaluated` and the task's `size`) and partial (true when some task
was cut short by `benchmark.limit`; tables mark such results, `is_partial`), failures (per failed sample: task, doc_id, reason), samples_file (the sibling JSONL), bootstrap
(per `bench/<task>/<metric>` with per-document scores: the 95% bootstrap interval over the task's
documents, `low`, `high`, `n`), with compare_to_full paired_vs_full (the paired interval of reduced -
full on the same documents: `diff`, `low`, `high`, `n`; tokenprune/eval/bootstrap.py) and, when tasks
wrote submission files, artifacts (the sibling `<name>.files/` folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tokenprune.atomic import atomic_write_text
from tokenprune.config import UserError

SCHEMA = "tokenprune.result/1"
PACKAGES = ("tokenprune", "torch", "transformers", "lmms_eval", "peft", "lightning", "hydra-core", "datasets")
# Config keys that say where things are or how to run, not what was run: excluded from the name hash
# (`experiment` is the table a run belongs to, so a run shared by two experiments is done once).
_LOCATION_KEYS = ("paths", "run", "force", "experiment")


def location_free(cfg: DictConfig) -> dict[str, Any]:
    """`cfg` resolved with every `paths.<key>` standing as the placeholder `<paths.<key>>`.

    Values built from the paths (`${paths.shipped_models}/mini_shapes`, `${paths.outputs}/shapes/...`)
    then read the same under any checkout, install or outputs root: what a run is does not depend on
    where it lives, so its hash and result name survive a moved checkout or another cluster mount point.
    """
    container = OmegaConf.to_container(cfg, resolve=False)
    container["paths"] = {key: f"<paths.{key}>" for key in container.get("paths") or {}}
    return OmegaConf.to_container(OmegaConf.create(container), resolve=True)


def config_hash(config: DictConfig | Mapping[str, Any]) -> str:
    """8 hex digits identifying what a config runs (paths and run options excluded).

    A DictConfig is hashed location-free (`location_free`); a plain mapping as it is.
    """
    if isinstance(config, DictConfig):
        config = location_free(config)
    what = {k: v for k, v in config.items() if k not in _LOCATION_KEYS}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:8]


def result_name(config: DictConfig | Mapping[str, Any], choices: Mapping[str, str]) -> str:
    """Deterministic run name: <model>-<reducer>-<benchmark>-<train>-<hash>; same config, same name."""
    explicit = (config.get("run") or {}).get("name")
    if explicit:
        return str(explicit)
    parts = [choices.get(g, "custom") for g in ("model", "reducer", "benchmark", "train")]
    return "-".join([*parts, config_hash(config)])


def finished(path: str | os.PathLike, digest: str) -> dict[str, Any] | None:
    """The result at `path` if it exists and was run from the config with hash `digest`, else None.

    A result without a recorded hash (written before the hash was recorded) counts as a match: its
    name already carries the hash unless `run.name` was set.
    """
    path = Path(path)
    if not path.is_file():
        return None
    result = read_result(path)
    return result if result.get("config_hash", digest) == digest else None


@contextlib.contextmanager
def run_lock(result_path: str | os.PathLike) -> Iterator[None]:
    """Hold `<result>.lock` (holding `<host>:<pid>[:<SLURM job>]`) while a run computes that result.

    A second run of the same config (same result path) refuses to start while the first is alive,
    instead of doing all its work again. A lock is taken over when its process is gone (same host),
    or when it was left by an earlier attempt of the same SLURM job (a requeue, on any node).
    Re-entrant within one process (the train pipeline holds it across fit and evaluation), and taken
    by rank 0 only.

    Raises:
        UserError: another live process holds the lock.
    """
    lock = Path(result_path).with_suffix(".lock")
    job = _slurm_job()
    owner = f"{socket.gethostname()}:{os.getpid()}" + (f":{job}" if job else "")
    if not _rank_zero():
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock.read_text(encoding="utf-8").strip() if lock.exists() else ""
            if holder == owner:  # this process already holds it
                yield
                return
            host, pid, held_by_job = [*holder.split(":", 2), "", ""][:3]
            gone = host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))
            if gone or (job and held_by_job == job):  # stale: its owner is gone, or was requeued
                lock.unlink(missing_ok=True)
                continue
            raise UserError(
                f"another run (pid {pid or '?'} on {host or '?'}) is computing this result; wait for it "
                f"(a rerun then reuses its result), or delete {lock} if that process is gone"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(owner)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
        return
    raise UserError(f"could not take {lock}; delete it if no run is computing this result")


def _slurm_job() -> str:
    """This process's SLURM job (array jobs: `<array job>_<task>`), or '' outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rank_zero() -> bool:
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


EFFICIENCY_PREFIX = "eff/"  # the efficiency meter's names; the result's efficiency block drops it


def efficiency_block(meter: Mapping[str, Any]) -> dict[str, Any]:
    """The result's efficiency block from the meter's `eff/<name>` figures: `<name>` keys."""
    return {key.removeprefix(EFFICIENCY_PREFIX): value for key, value in meter.items()}


def efficiency(result: Mapping[str, Any]) -> dict[str, Any]:
    """A result's efficiency figures by name (`visual_tokens_mean`, `prefill_flops_ratio`, ...), from either
    format: one `efficiency` block, or (files written before it) a short `efficiency` summary beside the
    meter's `eff` block of `eff/<name>` keys, merged here."""
    return {**efficiency_block(result.get("eff") or {}), **(result.get("efficiency") or {})}


def write_result(path: str | os.PathLike, result: Mapping[str, Any]) -> Path:
    return atomic_write_text(
        path, json.dumps({"schema": SCHEMA, **result}, indent=2, sort_keys=False, default=str)
    )


def write_samples(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in records))


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    result = json.loads(Path(path).read_text(encoding="utf-8"))
    if result.get("schema") != SCHEMA:
        raise ValueError(
            f"{path} is not a tokenprune result file (schema {result.get('schema')!r}, want {SCHEMA!r})"
        )
    return result


def is_partial(result: Mapping[str, Any]) -> bool:
    """True for a result that did not evaluate every document of its tasks.

    Results written before `coverage` was recorded count as partial when their config set a limit.
    """
    if "partial" in result:
        return bool(result["partial"])
    benchmark = (result.get("config") or {}).get("benchmark") or {}
    return benchmark.get("limit") is not None


def coverage_text(result: Mapping[str, Any]) -> str:
    """'120 of 300 documents' (summed over tasks), or 'limit=N' for an older result without coverage."""
    tasks = (result.get("coverage") or {}).values()
    if tasks:
        return f"{sum(t['evaluated'] for t in tasks)} of {sum(t['size'] for t in tasks)} documents"
    limit = ((result.get("config") or {}).get("benchmark") or {}).get("limit")
    return f"benchmark.limit={limit} per task"


def collect(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every result file in a folder, sorted by name."""
    return [read_result(p) for p in sorted(Path(results_dir).glob("*.json"))]


def run_info(started: datetime, device: str) -> dict[str, Any]:
    """Where, when and with what a run ran."""
    finished = datetime.now(timezone.utc)
    return {
        "started": started.isoformat(),
        "finished": finished.isoformat(),
        "wall_time_s": round((finished - started).total_seconds(), 3),
        "git": git_state(),
        "versions": package_versions(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "device": device,
        "command": " ".join(sys.argv),
    }


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state() -> dict[str, Any]:
    """The checkout's commit and whether it had uncommitted changes (None outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": None if status is None else bool(status)}
