"""Writers of the shapes world (`tokenprune.data.shapes`): eval tables and LLaVA instruction data.

* `write_eval_parquet`: the val or test split as three parquet tables in the exact column schemas
  of the datasets lmms-eval's built-in tasks read, so that the `shapes_*` tasks reuse lmms-eval's
  own prompt and metric code: ``pope.parquet`` = lmms-lab/POPE (existence, categories adversarial
  / popular / random), ``vqav2.parquet`` = lmms-lab/VQAv2 validation (colour, shape, size, count,
  position and "which" questions; the single synthetic answer repeated as the 10 human answers),
  ``scienceqa.parquet`` = lmms-lab/ScienceQA config ScienceQA-IMG (multiple choice, letter answers
  scored locally by ``scienceqa_img``'s ``sqa_process_results``; MMBench's static scorer needs
  circular-evaluation rows, ScienceQA's does not).
* `write_instruct`: the train split as LLaVA instruction JSON (one multi-turn record per image)
  plus one PNG per image, the format `tokenprune.data.instruct` loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenprune.data.schemas import features, write_parquet
from tokenprune.data.shapes import (
    POPE_CATEGORIES,
    SPLITS,
    VQA_KINDS,
    Item,
    Question,
    WorldConfig,
    item_rng,
    make_item,
    make_split,
)

MC_CATEGORIES = {
    "color": "Identify colors",
    "shape": "Identify shapes",
    "count": "Count objects",
    "present": "Identify objects",
    "position": "Compare positions",
}


def eval_rows(
    split: str = "test",
    seed: int = 0,
    pope_images: int = 100,
    vqa_questions: int = 1000,
    mc_questions: int = 200,
    vqa_per_image: int = 4,
    config: WorldConfig | None = None,
) -> dict[str, dict[str, list[Any]]]:
    """Columns of the three eval tables (pope, vqav2, scienceqa), all drawn from items 0, 1, ... of `split`.

    POPE: per image and category a "yes" and a "no" row (6 rows per image, interleaved so that
    `limit` keeps the categories balanced). VQAv2: up to `vqa_per_image` questions per image,
    cycling through VQA_KINDS. ScienceQA: one multiple-choice question per image.
    """
    cache: dict[int, tuple[Item, dict[str, Any]]] = {}

    def get(index: int) -> tuple[Item, dict[str, Any]]:
        if index not in cache:
            item = make_item(index, split, seed, config)
            cache[index] = (item, {"bytes": item.png(), "path": None})
        return cache[index]

    pope: dict[str, list[Any]] = {k: [] for k in features("pope")}
    for index in range(pope_images):
        item, image = get(index)
        for category in POPE_CATEGORIES:
            for question in (q for q in item.questions if q.kind == "existence" and q.category == category):
                row = len(pope["id"])
                pope["id"].append(str(row))
                pope["question_id"].append(str(row + 1))
                pope["question"].append(question.text)
                pope["answer"].append(question.answer)
                pope["image_source"].append(item.id)
                pope["image"].append(image)
                pope["category"].append(category)

    vqa: dict[str, list[Any]] = {k: [] for k in features("vqav2")}
    cursor, index = 0, 0
    while len(vqa["question"]) < vqa_questions:
        item, image = get(index)
        by_kind = {q.kind: q for q in item.questions}
        image_id = SPLITS[split] * 1_000_000 + index
        taken, next_cursor = 0, cursor
        for step in range(len(VQA_KINDS)):
            kind = VQA_KINDS[(cursor + step) % len(VQA_KINDS)]
            if kind not in by_kind or taken == vqa_per_image or len(vqa["question"]) == vqa_questions:
                continue
            question = by_kind[kind]
            vqa["question_type"].append(question.question_type)
            vqa["multiple_choice_answer"].append(question.answer)
            vqa["answers"].append(
                [
                    {"answer": question.answer, "answer_confidence": "yes", "answer_id": j + 1}
                    for j in range(10)
                ]
            )
            vqa["image_id"].append(image_id)
            vqa["answer_type"].append(question.answer_type)
            vqa["question_id"].append(image_id * 1000 + taken)
            vqa["question"].append(question.text)
            vqa["image"].append(image)
            taken += 1
            next_cursor = (cursor + step + 1) % len(VQA_KINDS)
        cursor = next_cursor
        index += 1

    sqa: dict[str, list[Any]] = {k: [] for k in features("scienceqa")}
    for index in range(mc_questions):
        item, image = get(index)
        (question,) = (q for q in item.questions if q.kind == "mc")
        correct = question.choices[question.answer_index]
        sqa["image"].append(image)
        sqa["question"].append(question.text)
        sqa["choices"].append(list(question.choices))
        sqa["answer"].append(question.answer_index)
        sqa["hint"].append("")
        sqa["task"].append("closed choice")
        sqa["grade"].append("grade1")
        sqa["subject"].append("shapes")
        sqa["topic"].append(question.topic)
        sqa["category"].append(MC_CATEGORIES[question.topic])
        sqa["skill"].append(MC_CATEGORIES[question.topic])
        sqa["lecture"].append("")
        sqa["solution"].append(f"The answer is {correct}.")
    return {"pope": pope, "vqav2": vqa, "scienceqa": sqa}


EVAL_FILES = {"pope": "pope.parquet", "vqav2": "vqav2.parquet", "scienceqa": "scienceqa.parquet"}


def write_eval_parquet(
    out: str | Path,
    split: str = "test",
    seed: int = 0,
    pope_images: int = 100,
    vqa_questions: int = 1000,
    mc_questions: int = 200,
    config: WorldConfig | None = None,
) -> list[Path]:
    """Write pope.parquet, vqav2.parquet, scienceqa.parquet (the real datasets' schemas) into `out`."""
    if split == "train":
        raise ValueError("the eval tables are written from the val or test split; train is write_instruct's")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = eval_rows(split, seed, pope_images, vqa_questions, mc_questions, config=config)
    return [write_parquet(columns, name, out / EVAL_FILES[name]) for name, columns in tables.items()]


def instruct_record(item: Item, image_path: str, max_turns: int | None = None) -> dict[str, Any]:
    """One LLaVA instruction record: the item's questions (deduplicated) as turns in a seeded order."""
    questions: list[Question] = []
    for question in item.questions:  # POPE positives repeat when a scene has < 3 object types
        if all(question.prompt != other.prompt for other in questions):
            questions.append(question)
    order = item_rng(item.seed, item.split, item.index, stream=1).permutation(len(questions))
    conversations: list[dict[str, str]] = []
    for k in order[:max_turns]:
        question = questions[int(k)]
        prefix = "<image>\n" if not conversations else ""
        conversations.append({"from": "human", "value": prefix + question.prompt})
        conversations.append({"from": "gpt", "value": question.answer})
    return {"id": item.id, "image": image_path, "conversations": conversations}


def write_instruct(
    out: str | Path,
    n: int,
    split: str = "train",
    seed: int = 0,
    config: WorldConfig | None = None,
    max_turns: int | None = None,
    start: int = 0,
) -> Path:
    """Write `n` items as `out/shapes_<split>.json` (LLaVA format) and `out/images/<id>.png`.

    Image paths in the JSON are relative to `out` (the loader's image root). Every human turn ends
    with the eval suffix (SHORT_ANSWER, or MC_ANSWER after the options), as in LLaVA-1.5's data.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for item in make_split(split, n, seed, config, start):
        relative = f"images/{item.id}.png"
        (out / relative).write_bytes(item.png())
        records.append(instruct_record(item, relative, max_turns))
    path = out / f"shapes_{split}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(path)
    return path


def shapes_instruct_data(out: str | Path, n: int, start: int = 0, seed: int = 0, **settings: Any):
    """`train.data` for the shapes world: items start .. start + n - 1 of the train split as LLaVA
    JSON + PNGs in `out` (written on first use, reused while n/start/seed match), as DataSettings.

    `settings` are the remaining DataSettings fields (template, batch_size, ...).
    """
    from tokenprune.data.instruct import DataSettings

    out = Path(out)
    stamp = out / "shapes_train.meta.json"
    wanted = {"split": "train", "n": n, "start": start, "seed": seed}
    if not (stamp.exists() and json.loads(stamp.read_text()) == wanted):
        write_instruct(out, n, split="train", seed=seed, start=start)
        tmp = stamp.with_suffix(".tmp")
        tmp.write_text(json.dumps(wanted) + "\n")
        tmp.replace(stamp)  # written last: a killed write is redone
    return DataSettings(json=str(out / "shapes_train.json"), image_root=str(out), **settings)
