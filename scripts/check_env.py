"""Check that the environment is the committed lock (`scripts/install.sh` runs this last).

Fails, naming each problem, when an installed version differs from requirements.lock (torch excepted: an
installed torch such as a CUDA build is kept, with a notice), or when `pip check` reports anything but the
dependencies that requirements/excluded.txt leaves out on purpose. Exit 0 and one summary line otherwise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = Path(os.environ.get("TOKENPRUNE_LOCK", ROOT / "requirements.lock"))
EXCLUDED = ROOT / "requirements" / "excluded.txt"
_MISSING = re.compile(r"^(\S+) (\S+) requires (\S+), which is not installed\.$")


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of `-_.` as one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def excluded() -> set[str]:
    """The package names requirements/excluded.txt leaves out of the lock."""
    lines = (line.split("#")[0].strip() for line in EXCLUDED.read_text().splitlines())
    return {normalize(re.split(r"[\s;<>=!~\[]", line)[0]) for line in lines if line}


def locked(lock: Path = LOCK) -> dict[str, str]:
    """name -> exact version pinned in a lock (requirements.lock unless TOKENPRUNE_LOCK names another)."""
    pins = (re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line) for line in lock.read_text().splitlines())
    return {normalize(m[1]): m[2] for m in pins if m}


def pip_check_problems(output: str) -> tuple[list[str], set[str]]:
    """Split `pip check` output into unexpected lines and the excluded names it reports missing."""
    unexpected, missing = [], set()
    for line in filter(None, (raw.strip() for raw in output.splitlines())):
        if line.startswith("No broken requirements"):
            continue
        match = _MISSING.match(line)
        if match and normalize(match[3]) in excluded():
            missing.add(normalize(match[3]))
        else:
            unexpected.append(line)
    return unexpected, missing


def version_mismatches() -> list[str]:
    """Lock pins the environment does not have (torch is reported by install.sh, not here)."""
    problems = []
    for name, version in locked().items():
        if name == "torch":
            continue
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}=={version} is in the lock but not installed")
            continue
        if have != version:
            problems.append(f"{name} is {have}, the lock has {version}")
    return problems


def print_diff(other: Path) -> None:
    """What moving from the lock to `other` would change, one package a line."""
    old, new = locked(), locked(other)
    changes = [
        f"  {name}: {old.get(name, '-')} -> {new.get(name, '-')}"
        for name in sorted(old.keys() | new.keys())
        if old.get(name) != new.get(name)
    ]
    print(f"[lock] {LOCK.name} -> {other}: {len(changes)} change(s)", *changes, sep="\n")


def main() -> int:
    if sys.argv[1:2] == ["--diff"]:
        print_diff(Path(sys.argv[2]))
        return 0
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    unexpected, _ = pip_check_problems(check.stdout + check.stderr)
    problems = version_mismatches() + [f"pip check: {line}" for line in unexpected]
    if problems:
        print("[install] the environment does not match requirements.lock:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        print(
            "  fix: make install (or rm -rf .venv && make install); after a dependency change: make lock",
            file=sys.stderr,
        )
        return 1
    import lmms_eval.evaluator  # noqa: F401  (the evaluator imports what every evaluation needs)
    import torch
    import transformers

    import tokenprune

    print(
        f"[install] ok: {len(locked())} locked packages | torch {torch.__version__} | "
        f"transformers {transformers.__version__} | tokenprune {tokenprune.__version__} from "
        f"{Path(tokenprune.__file__).parent}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
