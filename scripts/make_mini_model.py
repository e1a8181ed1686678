"""Rebuild the shipped `mini_shapes` checkpoint (models/mini_shapes): the same as `make mini-model`.

    python scripts/make_mini_model.py                               # the shipped recipe
    python scripts/make_mini_model.py recipe.stage2_records=400 out=/tmp/mini   # Hydra overrides

The recipe is `tokenprune.recipes.mini_shapes` with its config `configs/recipe/mini_shapes.yaml`;
design, costs and measured properties: docs/miniature.md.
"""

from __future__ import annotations

from tokenprune.recipes.mini_shapes import main

if __name__ == "__main__":
    main()
