#!/usr/bin/env bash
# Set up the environment tokenprune runs in: exactly the committed lock. Idempotent; `make install` calls it.
#   scripts/install.sh [VENV] [--no-editable]
#   - uses VENV, else the active virtual environment, else creates .venv in the checkout
#   - torch: an installed torch (e.g. your CUDA build) is kept; otherwise the lock's CPU wheel is installed,
#     from pip's configured sources or else the PyTorch CPU index (TORCH_INDEX_URL overrides it)
#   - every other package at the lock's exact version, then the package itself (editable by default);
#     the lock is the complete closure (uv pip compile), so it is installed as it is, without re-resolving
#   - `pip check` must then report nothing but requirements/excluded.txt (each left out with its reason)
#   - never installs torchvision; removes one that cannot import (it breaks transformers' processors)
set -euo pipefail
cd "$(dirname "$0")/.."
EDITABLE=-e
VENV=
for arg in "$@"; do
  case $arg in
    --no-editable) EDITABLE= ;;
    *) VENV=$arg ;;
  esac
done
VENV=${VENV:-${VIRTUAL_ENV:-.venv}}
PYTHON=${PYTHON:-python3}
LOCK=${TOKENPRUNE_LOCK:-requirements.lock}  # make test-latest installs another lock the same way
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[install] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --no-input --progress-bar off --disable-pip-version-check "$@"; }

want=$(grep -o -m1 'CPython [0-9.]*' "$LOCK" | cut -d' ' -f2) || {
  echo "[install] $LOCK does not say which Python it is for (its header): regenerate it with 'make lock'" >&2
  exit 2
}
have=$("$PY" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
if [[ "$want" != "$have" ]]; then
  echo "[install] $LOCK is for CPython $want, this environment has $have: use python$want" \
    "(PYTHON=python$want make install), or regenerate the lock for $have with 'make lock'" >&2
  exit 2
fi

torch_pin=$(grep -E '^torch==' "$LOCK")
if "$PY" -c "import torch" 2>/dev/null; then
  installed=$("$PY" -c 'import torch; print(torch.__version__)')
  [[ "torch==$installed" == "$torch_pin" ]] || echo "[install] keeping the installed torch $installed (the lock has $torch_pin)"
  "$PY" - <<'PY'
import sys, torch
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
if (major, minor) < (2, 6):
    sys.exit(f"[install] torch {torch.__version__} is too old: transformers 5 needs torch >= 2.6; upgrade it or use a fresh venv")
PY
else
  echo "[install] installing $torch_pin"
  pip_install --no-deps "$torch_pin" 2>/dev/null || pip_install --no-deps "$torch_pin" --index-url "$TORCH_INDEX_URL"
fi
grep -vE '^torch==' "$LOCK" > "$VENV/.tokenprune-lock.txt"
pip_install --no-deps -r "$VENV/.tokenprune-lock.txt"
pip_install --no-deps $EDITABLE .

if "$PY" -m pip show torchvision >/dev/null 2>&1 && ! "$PY" -c "import torchvision" 2>/dev/null; then
  echo "[install] removing a torchvision that cannot import with this torch (it breaks AutoProcessor)"
  "$PY" -m pip uninstall -y torchvision
fi
TOKENPRUNE_LOCK="$LOCK" "$PY" scripts/check_env.py
