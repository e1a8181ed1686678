"""How many visual tokens PruMerge / PruMerge+ keep on the miniature, and why: per object count.

    python scripts/mini_tokens.py                    # 600 val scenes -> outputs/tables/mini_shapes_tokens.{json,md}
    python scripts/mini_tokens.py --items 200 --split test
    python scripts/mini_tokens.py --model /tmp/mini --items 200    # another build of the recipe

For each scene of the shapes world's `split` (never trained on for val/test), the shipped
mini_shapes model's vision tower gives PruMerge's signals; the script records the tokens each
reducer keeps, the number of objects, the share of patches holding object pixels, and the CLS
attention mass on those patches. It reports the mean kept (and % of 576), the Pearson correlation
of kept tokens with the object count and with the object area, the mean kept per object count,
and the CLS-attention concentration (mean attention on object patches / mean on the others).
The result file is written atomically; the Markdown table is what README / docs/benchmarks.md show.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from tokenprune.config import PROJECT_ROOT, compose
from tokenprune.data.shapes import make_item
from tokenprune.recipes.mini_vision import GRID, object_patches
from tokenprune.results import atomic_write_text

REDUCERS = ("prumerge", "prumerge_plus")


@torch.no_grad()
def measure(items: int, split: str, seed: int, batch: int = 32, model: Path | None = None) -> dict:
    from hydra.utils import instantiate

    reducers = {name: instantiate(compose([f"reducer={name}"]).reducer) for name in REDUCERS}
    # the adapter computes the signals its reducer asks for (both reducers ask for the same ones)
    overrides = ["model=mini_shapes"] + ([f"model.path={model}"] if model else [])
    adapter = instantiate(compose(overrides).model, reducer=reducers["prumerge"])
    scenes = [make_item(i, split, seed) for i in range(items)]
    kept: dict[str, list[int]] = defaultdict(list)
    objects, area, ratio = [], [], []
    for begin in range(0, items, batch):
        chunk = scenes[begin : begin + batch]
        images = [item.image() for item in chunk]
        tokens = adapter.visual_tokens(adapter.preprocess(images))
        for name, reducer in reducers.items():
            kept[name] += reducer(tokens).lengths.tolist()
        for row, image, item in zip(tokens.signals["vit_cls_attn"], images, chunk):
            on = object_patches(image)
            objects.append(len(item.scene.objects))
            area.append(float(on.float().mean()))
            ratio.append(float(row[on].mean() / row[~on].mean()))
    total = GRID * GRID
    report = {
        "model": str(model or "models/mini_shapes"),
        "split": split,
        "items": items,
        "seed": seed,
        "tokens": total,
        "reducers": {},
    }
    for name, values in kept.items():
        by_count = defaultdict(list)
        for n, k in zip(objects, values):
            by_count[n].append(k)
        report["reducers"][name] = {
            "kept_mean": float(np.mean(values)),
            "kept_pct": 100.0 * float(np.mean(values)) / total,
            "kept_min": int(min(values)),
            "kept_max": int(max(values)),
            "corr_objects": float(np.corrcoef(values, objects)[0, 1]),
            "corr_object_area": float(np.corrcoef(values, area)[0, 1]),
            "kept_by_objects": {n: float(np.mean(v)) for n, v in sorted(by_count.items())},
        }
    report["object_area_pct"] = 100.0 * float(np.mean(area))
    report["cls_attention_object_ratio"] = float(np.mean(ratio))
    return report


def markdown(report: dict) -> str:
    counts = sorted({n for r in report["reducers"].values() for n in r["kept_by_objects"]})
    head = "| reducer | kept (mean) | % of 576 | min–max | r(kept, objects) | r(kept, area) | " + " | ".join(
        f"{n} obj" for n in counts
    )
    lines = [head + " |", "|" + "---|" * (6 + len(counts))]
    for name, r in report["reducers"].items():
        per = " | ".join(f"{r['kept_by_objects'].get(n, float('nan')):.1f}" for n in counts)
        lines.append(
            f"| {name} | {r['kept_mean']:.1f} | {r['kept_pct']:.1f}% | {r['kept_min']}–{r['kept_max']} | "
            f"{r['corr_objects']:.2f} | {r['corr_object_area']:.2f} | {per} |"
        )
    lines.append("")
    lines.append(
        f"{report['items']} {report['split']} scenes; objects cover {report['object_area_pct']:.1f}% of the "
        f"patches; CLS attention per object patch / per other patch = "
        f"{report['cls_attention_object_ratio']:.1f}."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model", type=Path, help="a checkpoint folder (default: the shipped models/mini_shapes)"
    )
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "outputs" / "tables")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    report = measure(args.items, args.split, args.seed, model=args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "mini_shapes_tokens.json", json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    atomic_write_text(args.out / "mini_shapes_tokens.md", table)
    print(table, end="")
    return report


if __name__ == "__main__":
    main()
