#!/usr/bin/env bash
# Resolve the whole environment into a lock (`make lock`, `make test-latest`). Needs the package registry.
#   scripts/lock.sh PYTHON OUT [--upgrade]
# Inputs: pyproject.toml (extras eval + dev), requirements/torch.txt (the CPU torch the lock is resolved
# against), requirements/excluded.txt (declared dependencies left out, each with its reason).
# Without --upgrade, versions already pinned in OUT are kept where pyproject.toml still allows them.
# The torch CPU wheel comes from pip's configured find-links (or TORCH_FIND_LINKS=DIR, a folder holding it;
# elsewhere: pip download torch==<pin> --index-url https://download.pytorch.org/whl/cpu -d DIR).
set -euo pipefail
PY=$1 OUT=$2
shift 2
cd "$(dirname "$0")/.."
links=${TORCH_FIND_LINKS:-${PIP_FIND_LINKS:-$("$PY" -m pip config get global.find-links 2>/dev/null || true)}}
if [[ -z "$links" ]]; then
  echo "[lock] no folder holds the CPU torch wheel: set TORCH_FIND_LINKS=DIR after" \
    "pip download $(grep -v '^#' requirements/torch.txt) --no-deps --index-url https://download.pytorch.org/whl/cpu -d DIR" >&2
  exit 2
fi
version=$("$PY" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
args=()
for dir in $links; do args+=(--find-links "$dir"); done
UV_CUSTOM_COMPILE_COMMAND="make lock  # for CPython $version on Linux x86_64" "$PY" -m uv pip compile pyproject.toml \
  --extra eval --extra dev --python-version "$version" --python-platform x86_64-manylinux_2_28 \
  --constraint requirements/torch.txt --override requirements/excluded.txt \
  "${args[@]}" --no-emit-find-links --quiet --output-file "$OUT" "$@"
echo "[lock] wrote $OUT (CPython $version, Linux x86_64): $(grep -c '^[a-zA-Z]' "$OUT") packages"
