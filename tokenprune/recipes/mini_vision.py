"""Stage 0 of the `mini_shapes` build: the CLIP tower alone, on scenes streamed from the train split.

Heads on the pooled CLS output (multi-label presence of the 30 (colour, shape) types + the object
count) and an auxiliary per-patch object label on the last layer's patch tokens, so that the last
layer's CLS attention falls on the objects, as PruMerge expects of CLIP; optionally a calibration
loss that puts PruMerge's CLS attention on each object's core patches only, so that its outliers
are as few as CLIP's in LLaVA-1.5 (~5.5% of the patches; docs/miniature.md §2).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from tokenprune.data.shapes import IMAGE_SIZE, PAIRS, Scene, item_rng, render, sample_scene
from tokenprune.models.signals import clip_cls_attention

PATCH = 4
GRID = IMAGE_SIZE // PATCH  # 24 x 24 patches
MAX_OBJECTS = 8
Log = Callable[[str], None]


def object_patches(image: Any) -> torch.Tensor:
    """[576] bool: the patches holding at least one object pixel (coloured; background and clutter are grey)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)  # [S, S, 3]
    coloured = (pixels.max(-1) - pixels.min(-1)) > 0  # [S, S]
    return torch.from_numpy(coloured.reshape(GRID, PATCH, GRID, PATCH).any(axis=(1, 3)).reshape(-1))


def object_coverage(scene: Scene, image: Any) -> torch.Tensor:
    """[n_objects, 576] int: per object (scene order), how many of each patch's 16 pixels are its own.

    Object boxes never overlap (objects keep GAP px apart), so a coloured pixel inside a box is
    that object's.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    coloured = (pixels.max(-1) - pixels.min(-1)) > 0  # [S, S]
    masks = np.zeros((len(scene.objects), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for k, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = obj.box
        masks[k, y0 : y1 + 1, x0 : x1 + 1] = coloured[y0 : y1 + 1, x0 : x1 + 1]
    coverage = masks.reshape(-1, GRID, PATCH, GRID, PATCH).sum(axis=(2, 4)).reshape(len(scene.objects), -1)
    return torch.from_numpy(coverage)


def object_masks(scene: Scene, image: Any) -> torch.Tensor:
    """[n_objects, 576] bool: per object (scene order), the patches holding one of its pixels."""
    return object_coverage(scene, image) > 0


def core_patches(coverage: torch.Tensor) -> torch.Tensor:
    """[576] bool: every object's core, the patches wholly inside it (all PATCH² pixels its own), or,
    for an object too small or thin to fill one, its most covered patch. On the train split the
    cores are 5.5% of the patches, CLIP's outlier share in LLaVA-1.5 (docs/miniature.md §2).

    Args:
        coverage: [n_objects, 576] `object_coverage(scene, image)`.
    """
    cores = (coverage == PATCH * PATCH).any(0)  # [576]
    for row in coverage:
        if not (row == PATCH * PATCH).any():
            cores[row.argmax()] = True
    return cores


def scene_batch(
    seed: int, start: int, n: int
) -> tuple[list[Any], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train scenes start .. start + n - 1 and their stage-0 targets.

    Returns:
        images (PIL), presence [n, 30] (multi-hot over PAIRS), count classes [n] (0 = one object),
        patch labels [n, 576] (0 = no object pixel, 1 + the PAIRS index of the object otherwise),
        core patches [n, 576] bool (`core_patches`).
    """
    images, presence = [], torch.zeros(n, len(PAIRS))
    counts, patches = torch.zeros(n, dtype=torch.long), torch.zeros(n, GRID * GRID, dtype=torch.long)
    cores = torch.zeros(n, GRID * GRID, dtype=torch.bool)
    for k in range(n):
        scene = sample_scene(item_rng(seed, "train", start + k))  # the same scene as make_item's
        image = render(scene)
        images.append(image)
        for color, shape in scene.present():
            presence[k, PAIRS.index((color, shape))] = 1.0
        counts[k] = len(scene.objects) - 1
        coverage = object_coverage(scene, image)
        for obj, mask in zip(scene.objects, coverage > 0):  # the higher label wins a shared patch
            patches[k][mask] = torch.clamp(patches[k][mask], min=1 + PAIRS.index((obj.color, obj.shape)))
        cores[k] = core_patches(coverage)
    return images, presence, counts, patches, cores


def cls_target(cores: torch.Tensor, objects: torch.Tensor, core_mass: float) -> torch.Tensor:
    """[B, 576] the calibration target: `core_mass` spread evenly over each image's core patches, the
    rest evenly over its background patches, none on the object patches around the cores (so they
    fall below the background and PruMerge's IQR test does not count them). Without cores or
    background, that share goes to the other set.

    Args:
        cores: [B, 576] bool, `core_patches` per image; objects: [B, 576] bool, the object patches.
    """
    core, background = cores.float(), (~objects & ~cores).float()
    n_core, n_background = core.sum(1, keepdim=True), background.sum(1, keepdim=True)
    mass = torch.where(n_core == 0, 0.0, torch.where(n_background == 0, 1.0, core_mass))  # [B, 1]
    return core * mass / n_core.clamp(min=1) + background * (1 - mass) / n_background.clamp(min=1)


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


def train_stage0(model, pixels: Callable, recipe: Any, log: Log) -> dict[str, Any]:
    """Train the vision tower with the CLS objective on freshly rendered train scenes.

    `pixels` maps a list of PIL images to pixel values [B, 3, S, S] (the processor's).
    """
    from tokenprune.recipes.mini_shapes import cosine_schedule

    tower = model.model.vision_tower
    heads = Stage0Heads(recipe.vision_width)
    params = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(
        params, lr=recipe.stage0_lr, betas=tuple(recipe.betas), weight_decay=recipe.stage0_weight_decay
    )
    scheduler = cosine_schedule(optimizer, recipe.stage0_warmup, recipe.stage0_steps)
    patch_class_weight = torch.ones(1 + len(PAIRS))
    patch_class_weight[0] = recipe.stage0_background_weight
    tower.train()
    start, window = time.perf_counter(), defaultdict(list)
    history = []
    for step in range(recipe.stage0_steps):
        images, presence, counts, patches, cores = scene_batch(
            recipe.seed, step * recipe.stage0_batch, recipe.stage0_batch
        )
        output = tower(pixel_values=pixels(images), output_hidden_states=bool(recipe.stage0_cls_weight))
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
        if recipe.stage0_cls_weight:
            # PruMerge's own CLS attention (one full-width head), renormalised over the patches
            attention, _ = clip_cls_attention(tower.encoder.layers[-1], output.hidden_states[-2])
            log_attention = (attention / attention.sum(1, keepdim=True)).clamp(min=1e-12).log()
            target = cls_target(cores, patches > 0, recipe.stage0_cls_core_mass)
            cls_loss = nn.functional.kl_div(log_attention, target, reduction="batchmean")
            loss = loss + recipe.stage0_cls_weight * cls_loss
            window["cls_kl"].append(float(cls_loss.detach()))
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
                + (f"cls KL {means['cls_kl']:.3f} " if "cls_kl" in means else "")
                + f"lr {scheduler.get_last_lr()[0]:.2e} elapsed {time.perf_counter() - start:.0f}s"
            )
            window.clear()
    tower.eval()
    return {"seconds": time.perf_counter() - start, "history": history}
