"""The column schemas of the Hugging Face datasets that lmms-eval's tasks read: the one place every
fixture writer takes them from.

`scripts/make_benchmark_fixtures.py` (a few items per benchmark task), `scripts/make_smoke.py` (the smoke
tasks of the random test models) and `tokenprune.data.shapes_export` (the shapes world's tables) all
write parquet files in these schemas, so lmms-eval's own prompt and metric code reads them as the real
datasets. Names and types follow the dataset cards (lmms-lab/VQAv2, lmms-lab/ScienceQA ScienceQA-IMG,
lmms-lab/textvqa, lmms-lab/POPE, lmms-lab/MME, lmms-lab/MMBench en, lmms-lab/GQA instructions and images,
lmms-lab/Video-MME, lmms-lab/egoschema Subset, lmms-lab/NExTQA MC).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenprune.atomic import atomic_file


@functools.cache
def schemas() -> dict[str, Any]:
    """name -> datasets.Features, for every dataset a fixture writer produces."""
    import datasets

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
    return SCHEMAS


def features(name: str) -> Any:
    """The datasets.Features of one dataset (`schemas()` lists the names)."""
    known = schemas()
    if name not in known:
        raise KeyError(f"no fixture schema {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def write_parquet(columns: Mapping[str, Sequence[Any]], name: str, path: str | Path) -> Path:
    """Write `columns` as a parquet file with dataset `name`'s schema embedded, atomically."""
    import datasets

    path = Path(path)
    with atomic_file(path) as tmp:
        datasets.Dataset.from_dict(dict(columns), features=features(name)).to_parquet(str(tmp))
    return path
