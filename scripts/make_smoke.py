"""Generate the offline ``smoke`` benchmark data (and the corrupt-image test fixture).

The parquet files reproduce the column schema of the Hugging Face datasets that lmms-eval's
built-in tasks read, so the smoke tasks can reuse lmms-eval's own prompt and metric code:

* ``pope.parquet``: ``lmms-lab/POPE`` (split ``test``): id, question_id, question, answer,
  image_source, image, category.
* ``vqav2.parquet``: ``lmms-lab/VQAv2`` (split ``validation``): question_type,
  multiple_choice_answer, answers (10 x {answer, answer_confidence, answer_id}), image_id,
  answer_type, question_id, question, image.

Images are small PNGs of coloured shapes drawn with PIL; nothing is downloaded and the output
is a pure function of this file (byte-stable for fixed pillow / pyarrow / datasets versions).

Usage::

    python scripts/make_smoke.py                 # writes tokenprune/eval/tasks/smoke/data/
    python scripts/make_smoke.py --out DIR       # writes DIR/{pope,vqav2}.parquet
    python scripts/make_smoke.py --corrupt DIR   # writes DIR/pope_corrupt.parquet (test fixture)
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, ImageDraw

from tokenprune.data.schemas import features, write_parquet

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tokenprune" / "eval" / "tasks" / "smoke" / "data"
DEFAULT_CORRUPT_OUT = ROOT / "tests" / "fixtures" / "smoke_corrupt" / "data"

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
BACKGROUND = (245, 245, 245)
CORRUPT_BYTES = b"not a png"


@dataclass(frozen=True)
class Shape:
    """One filled shape: kind in {circle, square, triangle}, colour name, box (x0, y0, x1, y1)."""

    kind: str
    color: str
    box: tuple[int, int, int, int]


def draw_png(size: tuple[int, int], shapes: Sequence[Shape]) -> bytes:
    """Draw ``shapes`` on a light background of ``size`` (W, H) and return PNG bytes."""
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in shapes:
        fill = COLORS[s.color]
        x0, y0, x1, y1 = s.box
        if s.kind == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(s.box, fill=fill)
        elif s.kind == "triangle":
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape kind {s.kind!r}")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


# POPE scenes (size W x H, shapes); each is asked about once with "yes" and once with "no".
_RED_CIRCLE = ((64, 64), [Shape("circle", "red", (12, 12, 52, 52))])
_BLUE_SQUARE_GREEN_TRIANGLE = (
    (80, 80),
    [Shape("square", "blue", (8, 8, 36, 36)), Shape("triangle", "green", (42, 40, 74, 72))],
)
_YELLOW_TRIANGLE = ((96, 96), [Shape("triangle", "yellow", (20, 16, 76, 80))])
_GREEN_CIRCLE_RED_SQUARE = (
    (96, 72),
    [Shape("circle", "green", (6, 10, 46, 50)), Shape("square", "red", (56, 20, 88, 52))],
)

# (scene, question subject (colour, kind), ground truth, POPE category)
_POPE_ITEMS: list[tuple[tuple[tuple[int, int], list[Shape]], tuple[str, str], str, str]] = [
    (_RED_CIRCLE, ("red", "circle"), "yes", "random"),
    (_RED_CIRCLE, ("blue", "square"), "no", "random"),
    (_BLUE_SQUARE_GREEN_TRIANGLE, ("green", "triangle"), "yes", "popular"),
    (_BLUE_SQUARE_GREEN_TRIANGLE, ("blue", "triangle"), "no", "popular"),
    (_YELLOW_TRIANGLE, ("yellow", "triangle"), "yes", "adversarial"),
    (_YELLOW_TRIANGLE, ("yellow", "circle"), "no", "adversarial"),
    (_GREEN_CIRCLE_RED_SQUARE, ("red", "square"), "yes", "random"),
    (_GREEN_CIRCLE_RED_SQUARE, ("green", "square"), "no", "random"),
]


def pope_rows() -> dict[str, list[Any]]:
    """Eight POPE-schema rows, 4 "yes" / 4 "no", over three categories."""
    cols: dict[str, list[Any]] = {k: [] for k in features("pope")}
    for i, ((size, shapes), (color, kind), answer, category) in enumerate(_POPE_ITEMS):
        cols["id"].append(str(i))
        cols["question_id"].append(str(i + 1))
        cols["question"].append(f"Is there a {color} {kind} in the image?")
        cols["answer"].append(answer)
        cols["image_source"].append(f"smoke_pope_{i // 2:03d}")
        cols["image"].append({"bytes": draw_png(size, shapes), "path": None})
        cols["category"].append(category)
    return cols


def _answers(votes: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
    """Expand ``[(answer, count), ...]`` (counts summing to 10) into VQAv2 answer records."""
    flat = [a for a, n in votes for _ in range(n)]
    if len(flat) != 10:
        raise ValueError(f"VQAv2 has 10 answers per question, got {len(flat)}")
    return [
        {"answer": a, "answer_confidence": "yes" if j % 4 else "maybe", "answer_id": j + 1}
        for j, a in enumerate(flat)
    ]


# (size, shapes, question, question_type, answer_type, votes)
_VQA_ITEMS: list[tuple[tuple[int, int], list[Shape], str, str, str, list[tuple[str, int]]]] = [
    (
        (64, 64),
        [Shape("circle", "red", (12, 12, 52, 52))],
        "What color is the circle?",
        "what color is the",
        "other",
        [("red", 7), ("orange", 3)],
    ),
    (
        (80, 80),
        [Shape("square", "blue", (6, 6, 30, 30)), Shape("square", "blue", (46, 46, 72, 72))],
        "How many squares are there?",
        "how many",
        "number",
        [("2", 8), ("3", 2)],
    ),
    (
        (96, 96),
        [Shape("triangle", "green", (16, 16, 80, 80))],
        "What shape is shown?",
        "what",
        "other",
        [("triangle", 10)],
    ),
    (
        (96, 72),
        [Shape("circle", "yellow", (10, 10, 50, 50)), Shape("square", "red", (58, 22, 90, 54))],
        "Is there a square in the image?",
        "is there a",
        "yes/no",
        [("yes", 10)],
    ),
    (
        (64, 64),
        [Shape("triangle", "blue", (8, 8, 56, 56))],
        "Is the triangle red?",
        "is the",
        "yes/no",
        [("no", 9), ("yes", 1)],
    ),
    (
        (80, 80),
        [
            Shape("circle", "green", (4, 4, 36, 36)),
            Shape("circle", "green", (44, 4, 76, 36)),
            Shape("circle", "green", (24, 44, 56, 76)),
        ],
        "How many circles are there?",
        "how many",
        "number",
        [("3", 10)],
    ),
    (
        (96, 96),
        [Shape("square", "yellow", (20, 20, 76, 76))],
        "What color is the square?",
        "what color is the",
        "other",
        [("yellow", 6), ("gold", 4)],
    ),
    (
        (96, 72),
        [Shape("triangle", "red", (8, 8, 56, 64)), Shape("circle", "blue", (60, 20, 92, 52))],
        "What shape is blue?",
        "what",
        "other",
        [("circle", 8), ("ball", 2)],
    ),
]


def vqav2_rows() -> dict[str, list[Any]]:
    """Eight VQAv2-schema rows (split ``validation``) with 10 human-style answers each."""
    cols: dict[str, list[Any]] = {k: [] for k in features("vqav2")}
    for i, (size, shapes, question, qtype, atype, votes) in enumerate(_VQA_ITEMS):
        image_id = 900_000 + i
        cols["question_type"].append(qtype)
        cols["multiple_choice_answer"].append(votes[0][0])
        cols["answers"].append(_answers(votes))
        cols["image_id"].append(image_id)
        cols["answer_type"].append(atype)
        cols["question_id"].append(image_id * 1000)
        cols["question"].append(question)
        cols["image"].append({"bytes": draw_png(size, shapes), "path": None})
    return cols


def corrupt_pope_rows() -> dict[str, list[Any]]:
    """Three POPE-schema rows; the middle one's image bytes are not a decodable image."""
    cols = pope_rows()
    keep = [0, 2, 3]
    out = {k: [v[i] for i in keep] for k, v in cols.items()}
    out["image"][1] = {"bytes": CORRUPT_BYTES, "path": None}
    return out


def make_smoke(out: Path = DEFAULT_OUT) -> list[Path]:
    """Write ``pope.parquet`` and ``vqav2.parquet`` into ``out``; return their paths."""
    return [
        write_parquet(pope_rows(), "pope", out / "pope.parquet"),
        write_parquet(vqav2_rows(), "vqav2", out / "vqav2.parquet"),
    ]


def make_corrupt(out: Path = DEFAULT_CORRUPT_OUT) -> list[Path]:
    """Write the corrupt-image POPE fixture ``pope_corrupt.parquet`` into ``out``."""
    return [write_parquet(corrupt_pope_rows(), "pope", out / "pope_corrupt.parquet")]


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"smoke data folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--corrupt",
        type=Path,
        default=None,
        help=f"corrupt-fixture data folder (default {DEFAULT_CORRUPT_OUT})",
    )
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    paths: list[Path] = []
    if args.out is not None or args.corrupt is None:
        paths += make_smoke(args.out or DEFAULT_OUT)
    if args.corrupt is not None or args.out is None:
        paths += make_corrupt(args.corrupt or DEFAULT_CORRUPT_OUT)
    for p in paths:
        print(f"wrote {p} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
