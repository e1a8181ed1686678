"""Generate the benchmark fixtures: a few items per lmms-eval task, in the real datasets' schemas.

Each dataset is written as a local copy of its Hugging Face repository under
``tests/fixtures/benchmarks/<dataset id>/`` (README.md with the repository's config/split layout,
data files, and for video sets the videos where lmms-eval's cache keeps them), which is exactly
what ``paths.data_root`` points at for real data. Column names and types follow the dataset cards
(see ``SCHEMAS``); images are small PNGs of coloured shapes and videos are tiny MPEG-4 clips of a
moving square (PyAV), all generated here, nothing downloaded.

``ORACLE`` maps every question text to the output a perfect model gives, so a test can check that
lmms-eval's scoring of our runs reaches each metric's maximum.

Usage::

    python scripts/make_benchmark_fixtures.py [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "benchmarks"
COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
# question text -> the answer a perfect model writes; " || " separates parts that must all appear
ORACLE: dict[str, str] = {}

S, I8, I32, I64, B = (datasets.Value(t) for t in ("string", "int8", "int32", "int64", "bool"))
IMG, STRS = datasets.Image(), datasets.List(datasets.Value("string"))
SCHEMAS: dict[str, datasets.Features] = {
    "vqav2": datasets.Features(
        {
            "question_type": S,
            "multiple_choice_answer": S,
            "answers": datasets.List({"answer": S, "answer_confidence": S, "answer_id": I64}),
            "image_id": I64,
            "answer_type": S,
            "question_id": I64,
            "question": S,
            "image": IMG,
        }
    ),
    "scienceqa": datasets.Features(
        {
            "image": IMG,
            "question": S,
            "choices": STRS,
            "answer": I8,
            "hint": S,
            "task": S,
            "grade": S,
            "subject": S,
            "topic": S,
            "category": S,
            "skill": S,
            "lecture": S,
            "solution": S,
        }
    ),
    "textvqa": datasets.Features(
        {
            "image_id": S,
            "question_id": I32,
            "question": S,
            "question_tokens": STRS,
            "image": IMG,
            "image_width": I32,
            "image_height": I32,
            "flickr_original_url": S,
            "flickr_300k_url": S,
            "answers": STRS,
            "image_classes": STRS,
            "set_name": S,
            "ocr_tokens": STRS,
        }
    ),
    "pope": datasets.Features(
        {
            "id": S,
            "question_id": S,
            "question": S,
            "answer": S,
            "image_source": S,
            "image": IMG,
            "category": S,
        }
    ),
    "mme": datasets.Features({"question_id": S, "image": IMG, "question": S, "answer": S, "category": S}),
    "mmbench": datasets.Features(
        {
            "index": I64,
            "question": S,
            "hint": S,
            "answer": S,
            "A": S,
            "B": S,
            "C": S,
            "D": S,
            "category": S,
            "image": IMG,
            "source": S,
            "L2-category": S,
            "comment": S,
            "split": S,
        }
    ),
    "gqa_instructions": datasets.Features(
        {
            "id": S,
            "imageId": S,
            "question": S,
            "answer": S,
            "fullAnswer": S,
            "isBalanced": B,
            "groups": {"global": S, "local": S},
            "entailed": S,
            "equivalent": S,
            "types": {"structural": S, "semantic": S, "detailed": S},
            "semanticStr": S,
        }
    ),
    "gqa_images": datasets.Features({"id": S, "image": IMG}),
    "videomme": datasets.Features(
        {
            "video_id": S,
            "duration": S,
            "domain": S,
            "sub_category": S,
            "url": S,
            "videoID": S,
            "question_id": S,
            "task_type": S,
            "question": S,
            "options": STRS,
            "answer": S,
        }
    ),
    "egoschema": datasets.Features(
        {"question_idx": S, "question": S, "video_idx": S, "option": STRS, "answer": S}
    ),
    "nextqa_mc": datasets.Features(
        {
            "video": S,
            "frame_count": I32,
            "width": I32,
            "height": I32,
            "question": S,
            "answer": I32,
            "qid": I32,
            "type": S,
            "a0": S,
            "a1": S,
            "a2": S,
            "a3": S,
            "a4": S,
        }
    ),
}


# ----------------------------------------------------------------------------- media
def png(color: str, kind: str = "square", size: tuple[int, int] = (64, 64), text: str | None = None) -> dict:
    """A coloured shape (and optional text) on a light background, as an HF Image value."""
    img = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
    if kind == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif kind == "triangle":
        draw.polygon(
            [((box[0] + box[2]) // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=COLORS[color]
        )
    else:
        draw.rectangle(box, fill=COLORS[color])
    if text:
        draw.text((2, 2), text, fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=9)
    return {"bytes": buf.getvalue(), "path": None}


def write_video(path: Path, color: str, frames: int = 8, size: tuple[int, int] = (64, 48)) -> Path:
    """A tiny MPEG-4 clip (4 fps) of a square of ``color`` moving left to right."""
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            pixels = np.full((h, w, 3), 240, dtype=np.uint8)
            x = 4 + i * (w - 20) // max(frames - 1, 1)
            pixels[h // 3 : h // 3 + 14, x : x + 14] = COLORS[color]
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ----------------------------------------------------------------------------- repos
def readme(configs: dict[str, dict[str, str]]) -> str:
    """A dataset-card header with the `configs` layout (config -> split -> file glob)."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, pattern in splits.items():
            lines += [f"  - split: {split}", f"    path: {pattern}"]
    lines += [
        "---",
        "",
        "Test fixture generated by scripts/make_benchmark_fixtures.py (a few synthetic items).",
        "",
    ]
    return "\n".join(lines)


def write_repo(
    folder: Path, configs: dict[str, dict[str, tuple[str, dict[str, list], datasets.Features]]]
) -> Path:
    """Parquet files + README for {config: {split: (relative file, columns, features)}}."""
    layout = {}
    for config, splits in configs.items():
        layout[config] = {}
        for split, (relative, columns, features) in splits.items():
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(columns, features=features).to_parquet(str(target))
            layout[config][split] = relative
    (folder / "README.md").write_text(readme(layout))
    return folder


def columns(rows: Sequence[dict[str, Any]], features: datasets.Features) -> dict[str, list]:
    return {key: [row.get(key) for row in rows] for key in features}


def oracle(question: str, answer: str) -> str:
    if question in ORACLE and ORACLE[question] != answer:
        raise ValueError(f"question {question!r} is used twice with different answers")
    ORACLE[question] = answer
    return question


# ----------------------------------------------------------------------------- image sets
def vqav2(out: Path) -> Path:
    def answers(votes: list[tuple[str, int]]) -> list[dict]:
        flat = [a for a, n in votes for _ in range(n)]
        return [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(flat)]

    val = [
        (
            "What color is the square?",
            "red",
            "square",
            [("red", 9), ("orange", 1)],
            "what color is the",
            "other",
        ),
        ("Is there a circle?", "blue", "circle", [("yes", 10)], "is there a", "yes/no"),
        ("What shape is green?", "green", "triangle", [("triangle", 8), ("pyramid", 2)], "what", "other"),
        ("How many yellow squares are there?", "yellow", "square", [("1", 10)], "how many", "number"),
    ]
    rows = [
        {
            "question_type": qtype,
            "multiple_choice_answer": votes[0][0],
            "answers": answers(votes),
            "image_id": 700_000 + i,
            "answer_type": atype,
            "question_id": (700_000 + i) * 1000,
            "question": oracle(q, votes[0][0]),
            "image": png(color, kind),
        }
        for i, (q, color, kind, votes, qtype, atype) in enumerate(val)
    ]
    test = [  # test-dev: no answers (scored by EvalAI from the submission file)
        {
            "image_id": 800_000 + i,
            "question_id": (800_000 + i) * 1000,
            "question": oracle(q, a),
            "image": png(color, "circle"),
        }
        for i, (q, a, color) in enumerate(
            [("What color is the ball?", "green", "green"), ("Is the ball blue?", "yes", "blue")]
        )
    ]
    f = SCHEMAS["vqav2"]
    return write_repo(
        out / "lmms-lab-encoder" / "VQAv2",
        {
            "default": {
                "validation": ("data/validation-00000-of-00001.parquet", columns(rows, f), f),
                "test": ("data/test-00000-of-00001.parquet", columns(test, f), f),
            }
        },
    )


def scienceqa(out: Path) -> Path:
    items = [
        ("Which color is the shape?", ["blue", "red", "green"], 1, "red", "The picture shows one shape."),
        ("Which shape is shown?", ["circle", "square"], 0, "blue", ""),
        (
            "Which animal is most like this shape's colour?",
            ["frog", "crow", "canary", "flamingo"],
            2,
            "yellow",
            "Look at the colour.",
        ),
    ]
    rows = []
    for question, choices, answer, color, hint in items:
        rows.append(
            {
                "image": png(color, "circle" if "shape is shown" in question else "square", (72, 56)),
                "question": oracle(question, "ABCD"[answer]),
                "choices": choices,
                "answer": answer,
                "hint": hint,
                "task": "closed choice",
                "grade": "grade3",
                "subject": "natural science",
                "topic": "colors",
                "category": "Identify colors",
                "skill": "Identify colors and shapes",
                "lecture": "Colours and shapes can describe objects.",
                "solution": f"The answer is {choices[answer]}.",
            }
        )
    f = SCHEMAS["scienceqa"]
    return write_repo(
        out / "lmms-lab-encoder" / "ScienceQA",
        {"ScienceQA-IMG": {"test": ("ScienceQA-IMG/test-00000-of-00001.parquet", columns(rows, f), f)}},
    )


def textvqa(out: Path) -> Path:
    items = [
        ("what word is written on the card?", "stop", ["stop", "sign"]),
        ("what number is shown?", "42", ["42"]),
        ("what brand is this?", "acme", ["acme", "co"]),
    ]
    for q, a, _ocr in items:
        oracle(q.capitalize(), a)
    rows = [
        {
            "image_id": f"tv{i:04d}",
            "question_id": 34_000 + i,
            "question": q,  # lmms-eval's prompt capitalises it (the oracle keys on the prompt text)
            "question_tokens": q.rstrip("?").split(),
            "image": png("yellow", "square", (80, 60), text=" ".join(ocr)),
            "image_width": 80,
            "image_height": 60,
            "flickr_original_url": f"https://example.invalid/tv{i}.jpg",
            "flickr_300k_url": f"https://example.invalid/tv{i}_300k.jpg",
            "answers": [a] * 8 + ["unanswerable"] * 2,
            "image_classes": ["Poster"],
            "set_name": "val",
            "ocr_tokens": ocr,
        }
        for i, (q, a, ocr) in enumerate(items)
    ]
    f = SCHEMAS["textvqa"]
    return write_repo(
        out / "lmms-lab-encoder" / "textvqa",
        {"default": {"validation": ("data/validation-00000-of-00001.parquet", columns(rows, f), f)}},
    )


def pope(out: Path) -> Path:
    f = SCHEMAS["pope"]
    splits = {}
    objects = {
        "adversarial": ("circle", "triangle"),
        "popular": ("square", "circle"),
        "random": ("triangle", "square"),
    }
    for s, (split, (present, absent)) in enumerate(objects.items()):
        rows = []
        for i, (color, obj, answer) in enumerate(
            [
                ("red", present, "yes"),
                ("red", absent, "no"),
                ("blue", present, "yes"),
                ("green", absent, "no"),
            ]
        ):
            question = f"Is there a {obj} in the {split} {color} image?"
            rows.append(
                {
                    "id": str(s * 10 + i),
                    "question_id": str(s * 10 + i + 1),
                    "question": oracle(question, answer),
                    "answer": answer,
                    "image_source": f"COCO_val2014_{s * 10 + i // 2:012d}",
                    "image": png(color, present),
                    "category": split,
                }
            )
        splits[split] = (f"Full/{split}-00000-of-00001.parquet", columns(rows, f), f)
    return write_repo(out / "lmms-lab-encoder" / "POPE", {"Full": splits})


def mme(out: Path) -> Path:
    items = [  # two questions per image (MME's pairs), one perception and one cognition category
        ("existence/000000000001.jpg", "existence", "red", "Is there a red square in this image?", "Yes"),
        ("existence/000000000001.jpg", "existence", "red", "Is there a blue square in this image?", "No"),
        (
            "commonsense_reasoning/0001.png",
            "commonsense_reasoning",
            "green",
            "Is the light green, meaning you may go?",
            "Yes",
        ),
        (
            "commonsense_reasoning/0001.png",
            "commonsense_reasoning",
            "green",
            "Is the light red, meaning you must stop?",
            "No",
        ),
    ]
    rows = [
        {
            "question_id": qid,
            "image": png(color),
            "question": oracle(q, a) + " Please answer yes or no.",
            "answer": a,
            "category": cat,
        }
        for qid, cat, color, q, a in items
    ]
    f = SCHEMAS["mme"]
    return write_repo(
        out / "lmms-lab-encoder" / "MME",
        {"default": {"test": ("data/test-00000-of-00001.parquet", columns(rows, f), f)}},
    )


def mmbench(out: Path) -> Path:
    base = {
        "category": "color_recognition",
        "source": "synthetic",
        "L2-category": "finegrained_perception (instance-level)",
        "comment": None,
        "split": "dev",
    }
    rows = [
        # question 1 and its circular rotation (index + 1e6): the group counts only if both are right
        {
            "index": 1,
            "question": "What color is the square?",
            "hint": None,
            "answer": "B",
            "A": "blue",
            "B": "red",
            "C": "green",
            "D": "yellow",
        },
        {
            "index": 1_000_001,
            "question": "What color is the square?",
            "hint": None,
            "answer": "A",
            "A": "red",
            "B": "green",
            "C": "yellow",
            "D": "blue",
        },
        {
            "index": 2,
            "question": "Which shape is it?",
            "hint": "The image shows one shape.",
            "answer": "C",
            "A": "square",
            "B": "triangle",
            "C": "circle",
            "D": None,
        },
    ]
    colors = {1: ("red", "square"), 1_000_001: ("red", "square"), 2: ("blue", "circle")}
    for row in rows:
        row.update(base)
        row["image"] = png(*colors[row["index"]])
        # the oracle keys on the question + each option line (rotations share the question text)
        oracle(" || ".join([row["question"]] + [f"{k}. {row[k]}" for k in "ABCD" if row[k]]), row["answer"])
    f = SCHEMAS["mmbench"]
    return write_repo(
        out / "lmms-lab-encoder" / "MMBench",
        {"en": {"dev": ("en/dev-00000-of-00001.parquet", columns(rows, f), f)}},
    )


def gqa(out: Path) -> Path:
    items = [
        ("n161313", "Is the square red?", "yes", "red", "square"),
        ("n161314", "What shape is the blue object?", "circle", "blue", "circle"),
        ("n161315", "Which color is the triangle?", "green", "green", "triangle"),
    ]
    questions = [
        {
            "id": f"20{i:06d}",
            "imageId": image_id,
            "question": oracle(q, a),
            "answer": a,
            "fullAnswer": f"The answer is {a}.",
            "isBalanced": True,
            "groups": {"global": None, "local": f"10c-{kind}_{a}"},
            "entailed": "",
            "equivalent": f"20{i:06d}",
            "types": {"structural": "query", "semantic": "attr", "detailed": "color"},
            "semanticStr": f"select: {kind} ({image_id})->query: color [0]",
        }
        for i, (image_id, q, a, _color, kind) in enumerate(items)
    ]
    images = [{"id": image_id, "image": png(color, kind)} for image_id, _q, _a, color, kind in items]
    images.append({"id": "n999999", "image": png("yellow")})  # an image no question uses
    fi, fm = SCHEMAS["gqa_instructions"], SCHEMAS["gqa_images"]
    return write_repo(
        out / "lmms-lab-encoder" / "GQA",
        {
            "testdev_balanced_instructions": {
                "testdev": (
                    "testdev_balanced_instructions/testdev-00000-of-00001.parquet",
                    columns(questions, fi),
                    fi,
                )
            },
            "testdev_balanced_images": {
                "testdev": ("testdev_balanced_images/testdev-00000-of-00001.parquet", columns(images, fm), fm)
            },
        },
    )


# ----------------------------------------------------------------------------- video sets
def videomme(out: Path) -> Path:
    folder = out / "lmms-eval" / "Video-MME"
    items = [
        ("001", "fFjv93ACGo8", "red", "A"),
        ("002", "Kx2aJdU8bfA", "blue", "C"),
        ("003", "Zq9mYtL1e0Q", "green", "B"),
    ]
    rows = []
    for n, (vid, youtube, color, answer) in enumerate(items):
        write_video(folder / "data" / f"{youtube}.mp4", color)
        options = ["A. A red square.", "B. A green square.", "C. A blue square.", "D. A yellow square."]
        rows.append(
            {
                "video_id": vid,
                "duration": "short",
                "domain": "Knowledge",
                "sub_category": "Humanity & History",
                "url": f"https://www.youtube.com/watch?v={youtube}",
                "videoID": youtube,
                "question_id": f"{vid}-{n + 1}",
                "task_type": "Object Recognition",
                "question": oracle(f"Which object moves across video {vid}?", answer),
                "options": options,
                "answer": answer,
            }
        )
    f = SCHEMAS["videomme"]
    return write_repo(
        folder, {"videomme": {"test": ("videomme/test-00000-of-00001.parquet", columns(rows, f), f)}}
    )


def mvbench(out: Path) -> Path:
    """One item per MVBench subtask, in its source folder (lmms-eval's DATA_LIST); JSON like the real repo."""
    from lmms_eval.tasks.mvbench.utils import DATA_LIST

    folder = out / "OpenGVLab" / "MVBench"
    layout = {}
    for n, (sub, source) in enumerate(sorted(DATA_LIST.items())):
        color = list(COLORS)[n % 4]
        video = f"{sub}_{n:02d}.mp4"
        write_video(folder / source / video, color, frames=6)
        candidates = [f"It is {c}." for c in COLORS]
        answer = f"It is {color}."
        question = oracle(f"[{sub}] What color is the moving square?", "ABCD"[candidates.index(answer)])
        record = {"video": video, "question": question, "candidates": candidates, "answer": answer}
        (folder / "json").mkdir(parents=True, exist_ok=True)
        (folder / "json" / f"{sub}.json").write_text(json.dumps([record], indent=1))
        layout[sub] = {"train": f"json/{sub}.json"}
    (folder / "README.md").write_text(readme(layout))
    return folder


def egoschema(out: Path) -> Path:
    folder = out / "lmms-eval" / "egoschema"
    items = [
        ("0074f737-11cb-497d-8d07-77c3a8127391", "red", 1),
        ("00b9a0de-c59e-49cb-a127-6081e2fb8c8e", "yellow", 3),
    ]
    rows = []
    for n, (video, color, answer) in enumerate(items):
        write_video(folder / "videos" / f"{video}.mp4", color)
        options = [
            f"{'ABCDE'[i]}. c is handling a {c} object."
            for i, c in enumerate(["blue", "red", "green", "yellow", "white"])
        ]
        rows.append(
            {
                "question_idx": str(n),
                "question": oracle(
                    f"Taking into account the whole clip {n}, what is c handling?", "ABCDE"[answer]
                ),
                "video_idx": video,
                "option": options,
                "answer": str(answer),
            }
        )
    f = SCHEMAS["egoschema"]
    return write_repo(
        folder, {"Subset": {"test": ("Subset/test-00000-of-00001.parquet", columns(rows, f), f)}}
    )


def nextqa(out: Path) -> Path:
    folder = out / "lmms-eval" / "NExTQA"
    items = [("4010069381", "green", 2, "CW"), ("4882821564", "blue", 0, "TN")]
    rows = []
    for n, (video, color, answer, qtype) in enumerate(items):
        write_video(folder / "NExTVideo" / f"{video}.mp4", color)
        choices = [f"the {c} square moves right" for c in ["blue", "red", "green", "yellow", "white"]]
        choices[answer] = f"the {color} square moves right"
        rows.append(
            {
                "video": video,
                "frame_count": 8,
                "width": 64,
                "height": 48,
                "question": oracle(f"what happens in clip {n} of the video", "ABCDE"[answer]),
                "answer": answer,
                "qid": n,
                "type": qtype,
                **{f"a{i}": c for i, c in enumerate(choices)},
            }
        )
    f = SCHEMAS["nextqa_mc"]
    return write_repo(folder, {"MC": {"test": ("MC/test-00000-of-00001.parquet", columns(rows, f), f)}})


MAKERS = (vqav2, scienceqa, textvqa, pope, mme, mmbench, gqa, videomme, mvbench, egoschema, nextqa)


def build_oracle() -> dict[str, str]:
    """The question -> answer table, without writing anything."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        make_all(Path(tmp))
    return dict(ORACLE)


def make_all(out: Path = DEFAULT_OUT) -> list[Path]:
    return [make(out) for make in MAKERS]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    for org in ("lmms-lab-encoder", "lmms-eval", "OpenGVLab"):
        shutil.rmtree(args.out / org, ignore_errors=True)
    for folder in make_all(args.out):
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"wrote {folder} ({size} bytes)")


if __name__ == "__main__":
    main()
