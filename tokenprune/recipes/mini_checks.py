"""Measurements of a `mini_shapes` checkpoint on held-out scenes: the build's report and the property tests.

Every measurement answers the world's questions greedily through the adapter (the evaluation's
path) on items of a split the model never trained on (val for the build, test for the tests):

* accuracy per question kind and POPE F1, unreduced;
* the image-blind control: the same questions with every image swapped for the next item's;
* the reducers at equal token counts: per image, random / uniform keep exactly as many tokens as
  PruMerge (or PruMerge+) kept for that image (`MatchedBudget`);
* the CLS attention on object patches and PruMerge(+)'s kept counts.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from tokenprune.data.shapes import Item, all_questions, make_item
from tokenprune.recipes.mini_vision import object_patches
from tokenprune.reducers.baselines import NoReduction, RandomPrune, UniformSample
from tokenprune.reducers.prumerge import PruMerge, PruMergePlus
from tokenprune.types import Reduced, VisualTokens

Questions = list[tuple[Any, Any]]  # (Question, PIL image)


def answer_matches(answer: str, truth: str) -> bool:
    return answer.strip().rstrip(".").strip().lower() == truth.lower()


class MatchedBudget:
    """Random or uniform with a per-image budget: image i of the next batch keeps `budgets[i]` tokens."""

    space: ClassVar[str] = "vision"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, make: Callable[[int], Any]) -> None:
        self.make, self.budgets = make, []

    def __call__(self, tokens: VisualTokens) -> Reduced:
        rows = [
            self.make(k)(VisualTokens(tokens.features[i : i + 1], tokens.grid))
            for i, k in enumerate(self.budgets)
        ]
        width = max(int(r.lengths[0]) for r in rows)
        features = tokens.features.new_zeros(len(rows), width, tokens.features.shape[-1])
        index = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            n = int(r.lengths[0])
            features[i, :n], index[i, :n] = r.features[0, :n], r.index[0, :n]
        return Reduced(features, index, torch.tensor([int(r.lengths[0]) for r in rows]))


def matched(name: str) -> MatchedBudget:
    """`MatchedBudget` for "random" or "uniform"."""
    if name == "random":
        return MatchedBudget(lambda k: RandomPrune(keep=k))
    if name == "uniform":
        return MatchedBudget(lambda k: UniformSample(keep=k))
    raise ValueError(f"matched baselines are random and uniform, got {name!r}")


def questions_of(items: Sequence[Item], kinds: Sequence[str] | None = None, blind: bool = False) -> Questions:
    """The items' questions (of `kinds`) with their images; `blind`: each with the next item's image."""
    images = [item.image() for item in items]
    if blind:
        images = images[1:] + images[:1]
    return [
        (q, image)
        for item, image in zip(items, images)
        for q in item.questions
        if kinds is None or q.kind in kinds
    ]


def grounding_questions(items: Sequence[Item], blind: bool = False) -> dict[str, Questions]:
    """{"existence": the items' POPE questions (6 per image), "color": every well-posed colour
    question of each scene (`all_questions`)}; `blind`: each with the next item's image."""
    images = [item.image() for item in items]
    if blind:
        images = images[1:] + images[:1]
    existence = [(q, im) for item, im in zip(items, images) for q in item.questions if q.kind == "existence"]
    color = [
        (q, im) for item, im in zip(items, images) for q in all_questions(item.scene) if q.kind == "color"
    ]
    return {"existence": existence, "color": color}


@torch.no_grad()
def answer(adapter, reducer, questions: Questions, batch: int = 16, budgets: Sequence[int] | None = None):
    """Greedy answers and kept token counts under `reducer` (a `MatchedBudget` takes `budgets`, one per question)."""
    saved, adapter.reducer = adapter.reducer, reducer
    answers, kept = [], []
    try:
        for start in range(0, len(questions), batch):
            chunk = questions[start : start + batch]
            if budgets is not None:
                reducer.budgets = list(budgets[start : start + batch])
            texts, counts = adapter.generate(
                [q.prompt for q, _ in chunk], [[image] for _, image in chunk], max_new_tokens=4
            )
            answers += texts
            kept += counts
    finally:
        adapter.reducer = saved
    return answers, kept


@torch.no_grad()
def answer_nll(adapter, questions: Questions, batch: int = 16) -> np.ndarray:
    """[n] teacher-forced negative log-likelihood (nats) of each question's answer and its end token,
    single-turn with the vicuna_v1 template, under the adapter's reducer."""
    from tokenprune.data.instruct import render
    from tokenprune.templates import VICUNA_V1

    out: list[float] = []
    for start in range(0, len(questions), batch):
        chunk = questions[start : start + batch]
        conversations = [render([(q.prompt, q.answer)], 1, VICUNA_V1) for q, _ in chunk]
        inputs = adapter.prepare_conversations(conversations, [[image] for _, image in chunk])
        kwargs = inputs.as_kwargs()
        labels = kwargs.pop("labels")[:, 1:]
        logits = adapter.model(**kwargs, use_cache=False).logits[:, :-1].float()
        taken = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        out += (-(taken * (labels != -100)).sum(-1)).tolist()
    return np.array(out)


def correct(answers: Sequence[str], questions: Questions) -> np.ndarray:
    """[n] 0/1 per question."""
    return np.array([answer_matches(a, q.answer) for a, (q, _) in zip(answers, questions)], dtype=np.float64)


def pope_f1(answers: Sequence[str], questions: Questions) -> float:
    """F1 of "yes" (POPE's positive class) over existence questions."""
    said = np.array([a.strip().lower().startswith("yes") for a in answers])
    truth = np.array([q.answer == "yes" for q, _ in questions])
    tp = float((said & truth).sum())
    return 2 * tp / max(1.0, float(said.sum() + truth.sum()))


def by_kind(scores: np.ndarray, questions: Questions) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for score, (q, _) in zip(scores, questions):
        groups[q.kind].append(score)
    return {kind: float(np.mean(v)) for kind, v in sorted(groups.items())}


@torch.no_grad()
def heldout_report(
    adapter, n_items: int = 60, batch: int = 16, seed: int = 0, split: str = "val"
) -> dict[str, Any]:
    """The build's check on items 0 .. n_items - 1 of `split`: accuracy per kind (unreduced); on the
    grounding questions (`grounding_questions`) accuracy, POPE F1, the image-blind control and
    PruMerge(+) vs random / uniform at equal counts; CLS attention; PruMerge(+)'s kept counts."""
    start = time.perf_counter()
    items = [make_item(i, split, seed) for i in range(n_items)]
    questions = questions_of(items)
    full = correct(answer(adapter, NoReduction(), questions, batch)[0], questions)
    grounded, blind = grounding_questions(items), grounding_questions(items, blind=True)
    unreduced: dict[str, float] = {}
    reduced: dict[str, dict[str, float]] = {}
    for kind, kind_questions in grounded.items():
        answers = answer(adapter, NoReduction(), kind_questions, batch)[0]
        unreduced[kind] = float(correct(answers, kind_questions).mean())
        if kind == "existence":
            unreduced["pope_f1"] = pope_f1(answers, kind_questions)
        unreduced[f"{kind}_image_blind"] = float(
            correct(answer(adapter, NoReduction(), blind[kind], batch)[0], blind[kind]).mean()
        )
        for name, reducer in (("prumerge", PruMerge()), ("prumerge_plus", PruMergePlus())):
            answers, kept = answer(adapter, reducer, kind_questions, batch)
            row = reduced.setdefault(name, {"kept_mean": float(np.mean(kept))})
            row[kind] = float(correct(answers, kind_questions).mean())
            for baseline in ("random", "uniform"):
                base_answers, _ = answer(adapter, matched(baseline), kind_questions, batch, budgets=kept)
                reduced.setdefault(f"{baseline}@{name}", {})[kind] = float(
                    correct(base_answers, kind_questions).mean()
                )
    ratios, mass, area, kept_counts = [], [], [], {"prumerge": [], "prumerge_plus": []}
    images = [item.image() for item in items]
    for name, reducer in (("prumerge", PruMerge()), ("prumerge_plus", PruMergePlus())):
        saved, adapter.reducer = adapter.reducer, reducer
        try:
            for begin in range(0, len(images), batch):
                chunk = images[begin : begin + batch]
                tokens = adapter.visual_tokens(adapter.preprocess(chunk))
                kept_counts[name] += reducer(tokens).lengths.tolist()
                if name == "prumerge":
                    for row, image in zip(tokens.signals["vit_cls_attn"], chunk):
                        on = object_patches(image)
                        ratios.append(float(row[on].mean() / row[~on].mean()))
                        mass.append(float(row[on].sum() / row.sum()))
                        area.append(float(on.float().mean()))
        finally:
            adapter.reducer = saved
    n_objects = [len(item.scene.objects) for item in items]
    return {
        "split": split,
        "items": n_items,
        "questions": len(questions),
        "accuracy": {**by_kind(full, questions), "all": float(full.mean())},
        "grounding": unreduced,
        "reduced": reduced,
        "cls_attention": {
            "object_to_background_ratio": float(np.mean(ratios)),
            "object_mass": float(np.mean(mass)),
            "object_area": float(np.mean(area)),
        },
        "kept_tokens_mean": {name: float(np.mean(v)) for name, v in kept_counts.items()},
        "prumerge_kept_vs_objects_corr": float(np.corrcoef(kept_counts["prumerge"], n_objects)[0, 1]),
        "seconds": time.perf_counter() - start,
    }
