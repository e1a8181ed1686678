#!/usr/bin/env bash
# Set up the environment tokenprune runs in. Idempotent; `make install` calls it.
#   - uses the active virtual environment if one is active, else creates .venv in the checkout
#   - installs the CPU torch wheel 2.13.0 only where no torch is installed (a CUDA torch is kept);
#     override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
#   - installs the package with its dev extra, then lmms-eval with --no-deps
#   - never installs torchvision; removes one that cannot import (it breaks transformers' processors)
set -euo pipefail
VENV=${1:-${VIRTUAL_ENV:-.venv}}
PYTHON=${PYTHON:-python3}
LMMS_EVAL_SPEC=${LMMS_EVAL_SPEC:-lmms-eval==0.7.3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[install] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --no-input --progress-bar off "$@"; }

if "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "[install] installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  pip_install $TORCH_SPEC
fi
pip_install -e ".[dev]"
pip_install --no-deps "$LMMS_EVAL_SPEC"

if "$PY" -m pip show torchvision >/dev/null 2>&1 && ! "$PY" -c "import torchvision" 2>/dev/null; then
  echo "[install] removing a torchvision that cannot import with this torch (it breaks AutoProcessor)"
  "$PY" -m pip uninstall -y torchvision
fi
"$PY" -c "import tokenprune, torch, transformers, lmms_eval.evaluator; print('[install] ok: torch', torch.__version__, '| transformers', transformers.__version__)"
