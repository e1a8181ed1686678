"""The embedded miniature's model, `mini_shapes`: a small LLaVA trained on the shapes world.

Design, costs and measured results: docs/miniature.md. The build (`make mini-model`, i.e.
`python scripts/make_mini_model.py`) is

1. a byte-level BPE tokenizer trained on `shapes_corpus()` (`tiny.train_tokenizer`'s code path);
2. a `LlavaForConditionalGeneration` (CLIP tower, mlp2x_gelu projector, Llama LM) built from config;
3. stage 0: the CLIP tower alone, with two heads on its pooled CLS output (multi-label presence
   of the 30 (colour, shape) types + the object count), on scenes streamed from the train split,
   so that its last-layer CLS attention falls on the objects, as PruMerge expects of CLIP;
4. stage 1: the tower frozen, projector + LM trained on the train split's LLaVA instruction
   JSON through the project's own pipeline (`tokenprune.data.instruct` dataset, sampler and
   collate, `LlavaAdapter.prepare_conversations` with the vicuna_v1 template, labels on the answers);
5. a held-out check on the val split (greedy answers per question kind, CLS-attention
   concentration on object patches, PruMerge / PruMerge+ kept tokens), then `save_pretrained`
   (safetensors) + processor + `BUILD.json` into a staging folder renamed over the target.

Everything is deterministic given the seed on one CPU thread count: the scene stream, the
sampler's order (single process) and torch's initialisation and dropout all derive from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tokenprune.config import PROJECT_ROOT
from tokenprune.data.shapes import IMAGE_SIZE, PAIRS, item_rng, make_item, render, sample_scene
from tokenprune.models.llava import LLAVA15_PROMPT, LlavaAdapter
from tokenprune.models.tiny import IMAGE_TOKEN, LLAVA15_CHAT_TEMPLATE, train_tokenizer

PATCH = 4
GRID = IMAGE_SIZE // PATCH  # 24 x 24 patches
MAX_OBJECTS = 8
Log = Callable[[str], None]


def log_line(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class Recipe:
    """Every knob of the build (docs/miniature.md §2); the defaults are the shipped model's."""

    seed: int = 0
    vocab_size: int = 1024
    vision_width: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 384
    lm_width: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_mlp: int = 512
    max_positions: int = 1024
    # stage 0: the tower with CLS heads on streamed train scenes
    stage0_steps: int = 800
    stage0_batch: int = 16
    stage0_lr: float = 2e-3
    stage0_weight_decay: float = 0.05
    stage0_warmup: int = 50
    stage0_patch_weight: float = 1.0  # auxiliary per-patch object-label loss (0: CLS objective only)
    stage0_background_weight: float = 1.0  # weight of the "no object" class in the per-patch loss
    # stage 1: projector + LM on the train split's instruction JSON
    # round r trains on fresh train items r*records .. (r+1)*records - 1 with its own warm-up + cosine
    stage1_records: int = 12_000
    stage1_rounds: int = 1
    stage1_epochs: int = 1
    stage1_batch: int = 8
    stage1_lr: float = 1e-3
    stage1_weight_decay: float = 0.0
    stage1_warmup: int = 100
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    # held-out check on the val split
    heldout_items: int = 60
    heldout_batch: int = 16
    threads: int = 2
    log_every: int = 50


# ------------------------------------------------------------------------------------- building
def build_tokenizer(recipe: Recipe):
    """Byte-level BPE on the shapes world's corpus with <unk> <s> </s> <pad> <image>."""
    from tokenprune.data.shapes import shapes_corpus

    return train_tokenizer(recipe.vocab_size, corpus=shapes_corpus())


def build_processor(tokenizer):
    """`LlavaProcessor` with `CLIPImageProcessorPil` at the world's resolution (identity resize)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA15_CHAT_TEMPLATE,
    )


def build_model(recipe: Recipe, tokenizer):
    """A freshly initialised `LlavaForConditionalGeneration` (seeded by the caller), SDPA, fp32."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=recipe.vision_width,
            intermediate_size=recipe.vision_mlp,
            num_hidden_layers=recipe.vision_layers,
            num_attention_heads=recipe.vision_heads,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            projection_dim=recipe.vision_width,
            hidden_act="quick_gelu",
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=recipe.lm_width,
            intermediate_size=recipe.lm_mlp,
            num_hidden_layers=recipe.lm_layers,
            num_attention_heads=recipe.lm_heads,
            num_key_value_heads=recipe.lm_heads,
            max_position_embeddings=recipe.max_positions,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=GRID * GRID,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=min(warmup, total), num_training_steps=total
    )


def _pixels(processor, images: Sequence[Any]) -> torch.Tensor:
    return processor.image_processor(list(images), return_tensors="pt")["pixel_values"]  # [B, 3, S, S]


# -------------------------------------------------------------------------------------- stage 0
def scene_batch(seed: int, start: int, n: int) -> tuple[list[Any], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train scenes start .. start + n - 1 and their stage-0 targets.

    Returns:
        images (PIL), presence [n, 30] (multi-hot over PAIRS), count classes [n] (0 = one object),
        patch labels [n, 576] (0 = no object pixel, 1 + the PAIRS index of the object otherwise).
    """
    images, presence = [], torch.zeros(n, len(PAIRS))
    counts, patches = torch.zeros(n, dtype=torch.long), torch.zeros(n, GRID * GRID, dtype=torch.long)
    for k in range(n):
        scene = sample_scene(item_rng(seed, "train", start + k))  # the same scene as make_item's
        image = render(scene)
        images.append(image)
        for color, shape in scene.present():
            presence[k, PAIRS.index((color, shape))] = 1.0
        counts[k] = len(scene.objects) - 1
        patches[k] = patch_labels(scene, image)
    return images, presence, counts, patches


def patch_labels(scene: Any, image: Any) -> torch.Tensor:
    """[576] per patch: 1 + the PAIRS index of the object with pixels in it, 0 for none.

    Object boxes never overlap (objects keep GAP px apart), so a coloured pixel inside a box is
    that object's; in the rare patch two objects share, the higher label wins.
    """
    pixels = np.asarray(image, dtype=np.int16)  # [S, S, 3]
    coloured = (pixels.max(-1) - pixels.min(-1)) > 0  # [S, S] (background and clutter are grey)
    labels = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.int64)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        box = coloured[y0 : y1 + 1, x0 : x1 + 1]
        labels[y0 : y1 + 1, x0 : x1 + 1][box] = 1 + PAIRS.index((obj.color, obj.shape))
    return torch.from_numpy(labels.reshape(GRID, PATCH, GRID, PATCH).max(axis=(1, 3)).reshape(-1))


class Stage0Heads(nn.Module):
    """Stage 0's heads (discarded afterwards): presence and count on the pooled CLS output, and
    an auxiliary per-patch object label on the last layer's patch tokens."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.presence = nn.Linear(width, len(PAIRS))
        self.count = nn.Linear(width, MAX_OBJECTS)
        self.patch = nn.Linear(width, 1 + len(PAIRS))

    def forward(
        self, pooled: torch.Tensor, patches: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.presence(pooled), self.count(pooled), self.patch(patches)  # [B, 30], [B, 8], [B, N, 31]


def train_stage0(model, processor, recipe: Recipe, log: Log) -> dict[str, Any]:
    """Train the vision tower with the CLS objective on freshly rendered train scenes."""
    tower = model.model.vision_tower
    heads = Stage0Heads(recipe.vision_width)
    params = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(
        params, lr=recipe.stage0_lr, betas=recipe.betas, weight_decay=recipe.stage0_weight_decay
    )
    scheduler = _schedule(optimizer, recipe.stage0_warmup, recipe.stage0_steps)
    patch_class_weight = torch.ones(1 + len(PAIRS))
    patch_class_weight[0] = recipe.stage0_background_weight
    tower.train()
    start, window = time.perf_counter(), defaultdict(list)
    history = []
    for step in range(recipe.stage0_steps):
        images, presence, counts, patches = scene_batch(
            recipe.seed, step * recipe.stage0_batch, recipe.stage0_batch
        )
        output = tower(pixel_values=_pixels(processor, images))
        patch_tokens = tower.post_layernorm(output.last_hidden_state[:, 1:])  # [B, N, C]
        presence_logits, count_logits, patch_logits = heads(output.pooler_output, patch_tokens)
        presence_loss = nn.functional.binary_cross_entropy_with_logits(presence_logits, presence)
        count_loss = nn.functional.cross_entropy(count_logits, counts)
        loss = presence_loss * len(PAIRS) / 4 + count_loss  # per-type BCE summed over a few types
        if recipe.stage0_patch_weight:
            patch_loss = nn.functional.cross_entropy(
                patch_logits.flatten(0, 1), patches.flatten(), weight=patch_class_weight
            )
            loss = loss + recipe.stage0_patch_weight * patch_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            window["loss"].append(float(loss))
            predicted = (presence_logits > 0).float()
            hits = float((predicted * presence).sum())
            window["presence_f1"].append(2 * hits / max(1.0, float(predicted.sum() + presence.sum())))
            on = patches > 0
            window["patch_acc"].append(float((patch_logits.argmax(-1)[on] == patches[on]).float().mean()))
            window["count_acc"].append(float((count_logits.argmax(-1) == counts).float().mean()))
        if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.stage0_steps:
            means = {k: sum(v) / len(v) for k, v in window.items()}
            history.append({"step": step + 1, **means})
            log(
                f"[stage0] step {step + 1}/{recipe.stage0_steps} loss {means['loss']:.4f} "
                f"presence F1 {means['presence_f1']:.3f} count {means['count_acc']:.3f} "
                f"object-patch {means['patch_acc']:.3f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} elapsed {time.perf_counter() - start:.0f}s"
            )
            window.clear()
    tower.eval()
    return {"seconds": time.perf_counter() - start, "history": history}


# -------------------------------------------------------------------------------------- stage 1
def write_train_data(out: Path, recipe: Recipe, round_: int = 0) -> Path:
    """Stage 1 round `round_`'s train items (`stage1_records` from round_ * stage1_records) as
    LLaVA JSON + PNGs in `out`."""
    from tokenprune.data.shapes_export import write_instruct

    n = recipe.stage1_records
    return write_instruct(out, n, split="train", seed=recipe.seed, start=round_ * n)


def train_stage1(
    adapter: LlavaAdapter, json_path: Path, recipe: Recipe, log: Log, tag: str = ""
) -> dict[str, Any]:
    """Projector + LM on the instruction JSON, the vision tower frozen; one plain loop, one process."""
    from torch.utils.data import DataLoader

    from tokenprune.data.instruct import (
        VICUNA_V1,
        InstructDataset,
        LengthGroupedSampler,
        collate,
        load_records,
    )

    model = adapter.model
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    dataset = InstructDataset(
        load_records(json_path),
        image_root=json_path.parent,
        tokenizer=adapter.tokenizer,
        template=VICUNA_V1,
        max_length=recipe.max_positions,
        image_tokens=GRID * GRID + 1,
    )
    sampler = LengthGroupedSampler(
        dataset.lengths, batch_size=recipe.stage1_batch, has_image=dataset.has_image, seed=recipe.seed
    )
    loader = DataLoader(dataset, batch_size=recipe.stage1_batch, sampler=sampler, collate_fn=collate)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trained, lr=recipe.stage1_lr, betas=recipe.betas, weight_decay=recipe.stage1_weight_decay
    )
    total = sampler.num_batches() * recipe.stage1_epochs
    scheduler = _schedule(optimizer, recipe.stage1_warmup, total)
    model.train()
    tower.eval()
    start, window, history, step, skipped = time.perf_counter(), [], [], 0, {}
    for epoch in range(recipe.stage1_epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            skipped.update(dict(batch["skipped"]))
            inputs = adapter.prepare_conversations(batch["conversations"], batch["images"])
            loss = model(**inputs.as_kwargs(), use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(trained, recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            window.append(float(loss.detach()))
            if step % recipe.log_every == 0 or step == total:
                mean = sum(window) / len(window)
                history.append({"step": step, "loss": mean})
                log(
                    f"[stage1] {tag} step {step}/{total} (epoch {epoch + 1}) loss {mean:.4f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} elapsed {time.perf_counter() - start:.0f}s"
                )
                window.clear()
    model.eval()
    return {
        "seconds": time.perf_counter() - start,
        "steps": step,
        "records": len(dataset),
        "skipped": len(skipped) + dataset.skipped.total(),
        "history": history,
    }


# ------------------------------------------------------------------------------ held-out checks
def object_patches(image: Any) -> torch.Tensor:
    """[576] bool: the patches holding at least one object pixel (coloured; background and clutter are grey)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)  # [S, S, 3]
    coloured = (pixels.max(-1) - pixels.min(-1)) > 0  # [S, S]
    return torch.from_numpy(coloured.reshape(GRID, PATCH, GRID, PATCH).any(axis=(1, 3)).reshape(-1))


def answer_matches(answer: str, truth: str) -> bool:
    return answer.strip().rstrip(".").strip().lower() == truth.lower()


@torch.no_grad()
def heldout_report(adapter: LlavaAdapter, recipe: Recipe, split: str = "val") -> dict[str, Any]:
    """Greedy accuracy per question kind, CLS-attention concentration and PruMerge(+) kept tokens.

    On items 0 .. heldout_items - 1 of `split` (never trained on). Concentration: per image, the
    mean CLS attention (PruMerge's `vit_cls_attn`) on patches with object pixels over the mean on
    the other patches, averaged over images.
    """
    from tokenprune.reducers.baselines import NoReduction
    from tokenprune.reducers.prumerge import PruMerge, PruMergePlus

    start = time.perf_counter()
    items = [make_item(i, split, recipe.seed) for i in range(recipe.heldout_items)]
    images = [item.image() for item in items]
    questions = [(q, image) for item, image in zip(items, images) for q in item.questions]
    saved = adapter.reducer
    adapter.reducer = NoReduction()
    right: dict[str, list[bool]] = defaultdict(list)
    for begin in range(0, len(questions), recipe.heldout_batch):
        chunk = questions[begin : begin + recipe.heldout_batch]
        texts, _ = adapter.generate([q.prompt for q, _ in chunk], [[im] for _, im in chunk], max_new_tokens=8)
        for (question, _), text in zip(chunk, texts):
            right[question.kind].append(answer_matches(text, question.answer))
    accuracy = {kind: sum(v) / len(v) for kind, v in sorted(right.items())}
    accuracy["all"] = sum(sum(v) for v in right.values()) / len(questions)
    ratios, mass, area, kept = [], [], [], {"prumerge": [], "prumerge_plus": []}
    for name, reducer in (("prumerge", PruMerge()), ("prumerge_plus", PruMergePlus())):
        adapter.reducer = reducer
        for begin in range(0, len(images), recipe.heldout_batch):
            chunk = images[begin : begin + recipe.heldout_batch]
            tokens = adapter.visual_tokens(adapter.preprocess(chunk))
            kept[name] += reducer(tokens).lengths.tolist()
            if name != "prumerge":
                continue
            attention = tokens.signals["vit_cls_attn"]  # [B, N]
            for row, image in zip(attention, chunk):
                on = object_patches(image)
                ratios.append(float(row[on].mean() / row[~on].mean()))
                mass.append(float(row[on].sum() / row.sum()))
                area.append(float(on.float().mean()))
    adapter.reducer = saved
    n_objects = [len(item.scene.objects) for item in items]
    return {
        "split": split,
        "items": len(items),
        "questions": len(questions),
        "accuracy": accuracy,
        "questions_per_kind": {kind: len(v) for kind, v in sorted(right.items())},
        "cls_attention": {
            "object_to_background_ratio": sum(ratios) / len(ratios),
            "object_mass": sum(mass) / len(mass),
            "object_area": sum(area) / len(area),
        },
        "kept_tokens_mean": {name: sum(v) / len(v) for name, v in kept.items()},
        "prumerge_kept_vs_objects_corr": _correlation(kept["prumerge"], n_objects),
        "seconds": time.perf_counter() - start,
    }


def _correlation(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


# ------------------------------------------------------------------------------------- the build
def save_atomic(path: Path, parts: Sequence[Any], info: dict[str, Any]) -> Path:
    """save_pretrained every part + BUILD.json into a staging folder, then swap it in at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-new-", dir=path.parent))
    old = None
    try:
        for part in parts:
            part.save_pretrained(staging)
        files = sorted(p for p in staging.iterdir() if p.is_file())
        for file in files:  # mkdtemp / safetensors make owner-only files; a shipped folder is readable
            file.chmod(0o644)
        staging.chmod(0o755)
        info["files"] = {p.name: p.stat().st_size for p in files}
        info["total_bytes"] = sum(info["files"].values()) + len(json.dumps(info, indent=1)) + 64
        (staging / "BUILD.json").write_text(json.dumps(info, indent=1) + "\n")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}-old-", dir=path.parent))
            path.rename(old / path.name)
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def build(out: Path, recipe: Recipe, data_dir: Path | None = None, log: Log = log_line) -> dict[str, Any]:
    """Build `mini_shapes` into `out` (atomically); returns what BUILD.json records."""
    import transformers

    torch.set_num_threads(recipe.threads)
    began, load_start = time.perf_counter(), os.getloadavg()
    times: dict[str, float] = {}
    log(f"[build] recipe {asdict(recipe)}; load average {load_start}")
    tokenizer = build_tokenizer(recipe)
    processor = build_processor(tokenizer)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    log(f"[build] tokenizer {len(tokenizer)} tokens; model {params / 1e6:.2f} M parameters")

    with tempfile.TemporaryDirectory(prefix="mini_shapes_data-") as scratch:
        data = Path(data_dir) if data_dir is not None else Path(scratch)
        tick = time.perf_counter()
        json_path = write_train_data(data / "round1", recipe, 0)
        times["data"] = time.perf_counter() - tick
        log(f"[data] {recipe.stage1_records} train records in {data / 'round1'} ({times['data']:.0f}s)")
        torch.manual_seed(recipe.seed + 1)
        stage0 = train_stage0(model, processor, recipe, log)
        times["stage0"] = stage0["seconds"]
        adapter = LlavaAdapter(model, processor, prompt=LLAVA15_PROMPT, image_aspect="pad")
        rounds = []
        for round_ in range(recipe.stage1_rounds):
            if round_:
                tick = time.perf_counter()
                json_path = write_train_data(data / f"round{round_ + 1}", recipe, round_)
                times["data"] += time.perf_counter() - tick
            torch.manual_seed(recipe.seed + 2 + round_)
            rounds.append(
                train_stage1(adapter, json_path, recipe, log, f"round {round_ + 1}/{recipe.stage1_rounds}")
            )
        times["stage1"] = sum(r.pop("seconds") for r in rounds)
        stage1 = {"steps": sum(r["steps"] for r in rounds), "rounds": rounds}
    report = heldout_report(adapter, recipe)
    times["heldout"] = report["seconds"]
    log(f"[heldout] {json.dumps({k: report[k] for k in ('accuracy', 'cls_attention', 'kept_tokens_mean')})}")
    times["total"] = time.perf_counter() - began
    info = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "recipe": asdict(recipe),
        "parameters": params,
        "tokenizer_size": len(tokenizer),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "host": {"cpus": os.cpu_count(), "threads": recipe.threads, "machine": platform.machine()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "stage0": {k: v for k, v in stage0.items() if k != "seconds"},
        "stage1": stage1,
        "heldout": {k: v for k, v in report.items() if k != "seconds"},
    }
    save_atomic(Path(out), [model, processor], info)
    log(f"[build] wrote {out} ({info['total_bytes'] / 1e6:.1f} MB) in {times['total'] / 60:.1f} min")
    return info


def parse_args(argv: Sequence[str] | None = None) -> tuple[Path, Recipe, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "models" / "mini_shapes", help="checkpoint folder"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where to write the train JSON + PNGs (default: a temp dir)",
    )
    for field in fields(Recipe):
        if field.name == "betas":
            continue
        default = getattr(Recipe, field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    out, data_dir = args.pop("out"), args.pop("data_dir")
    return out, replace(Recipe(), **args), data_dir


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    out, recipe, data_dir = parse_args(argv)
    return build(out, recipe, data_dir)


if __name__ == "__main__":
    main()
