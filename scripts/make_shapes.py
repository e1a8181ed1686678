"""Generate the shapes world's data: the bundled eval tables, and (on request) instruction data.

The eval tables (``pope.parquet``, ``vqav2.parquet``, ``scienceqa.parquet``) are the test split of
`tokenprune.data.shapes` in the column schemas of lmms-lab/POPE, lmms-lab/VQAv2 and
lmms-lab/ScienceQA (ScienceQA-IMG), read by the ``shapes_*`` tasks in
``tokenprune/eval/tasks/shapes``. The output is a pure function of the arguments (byte-stable for
fixed numpy / pillow / pyarrow / datasets versions).

Usage::

    python scripts/make_shapes.py                             # the bundled test tables
    python scripts/make_shapes.py --out DIR --split val        # val tables elsewhere
    python scripts/make_shapes.py --train 20000 --train-out outputs/shapes   # + LLaVA JSON + PNGs
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tokenprune" / "eval" / "tasks" / "shapes" / "data"
DEFAULT_TRAIN_OUT = ROOT / "outputs" / "shapes"  # git-ignored
# The bundled test split: 600 POPE + 1,000 VQAv2 + 200 multiple-choice questions over 250 images.
POPE_IMAGES, VQA_QUESTIONS, MC_QUESTIONS = 100, 1000, 200


def make_shapes(
    out: Path = DEFAULT_OUT,
    split: str = "test",
    seed: int = 0,
    pope_images: int = POPE_IMAGES,
    vqa_questions: int = VQA_QUESTIONS,
    mc_questions: int = MC_QUESTIONS,
) -> list[Path]:
    """Write the three eval tables of `split` into `out`; return their paths."""
    from tokenprune.data.shapes_export import write_eval_parquet

    return write_eval_parquet(out, split, seed, pope_images, vqa_questions, mc_questions)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    import datasets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"eval tables folder (default {DEFAULT_OUT})"
    )
    parser.add_argument("--split", default="test", choices=["val", "test"], help="eval split (default test)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument(
        "--pope-images", type=int, default=POPE_IMAGES, help="images in POPE (6 questions each)"
    )
    parser.add_argument("--vqa", type=int, default=VQA_QUESTIONS, help="VQAv2-style questions")
    parser.add_argument("--mc", type=int, default=MC_QUESTIONS, help="multiple-choice questions")
    parser.add_argument(
        "--train", type=int, default=0, help="also write this many train images as LLaVA JSON"
    )
    parser.add_argument("--train-out", type=Path, default=DEFAULT_TRAIN_OUT, help="instruction data folder")
    parser.add_argument("--max-turns", type=int, default=None, help="QA turns per train record (default all)")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    start = time.perf_counter()
    paths = make_shapes(args.out, args.split, args.seed, args.pope_images, args.vqa, args.mc)
    if args.train:
        from tokenprune.data.shapes_export import write_instruct

        paths.append(write_instruct(args.train_out, args.train, "train", args.seed, max_turns=args.max_turns))
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
