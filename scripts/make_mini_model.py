"""Rebuild the shipped `mini_shapes` checkpoint (models/mini_shapes): tokenizer, stage 0, stage 1, check.

    python scripts/make_mini_model.py                 # the shipped recipe (make mini-model)
    python scripts/make_mini_model.py --help          # every knob of tokenprune.models.mini.Recipe

The recipe, its costs and the measured results are in docs/miniature.md; the build itself is
`tokenprune.models.mini.build`.
"""

from __future__ import annotations

from tokenprune.models.mini import main

if __name__ == "__main__":
    main()
