"""Stages 1 and 2 of the `mini_shapes` build: projector + LM on the shapes world's instruction records.

The vision tower is frozen in both. A record is one train image with about 12 QA turns (the
vicuna_v1 template, labels on the answers).

* Stage 1 (`train_stage1`, the v1 recipe): one epoch over `stage1_records` records written as
  LLaVA JSON + PNGs and read through the project's own pipeline (`tokenprune.data.instruct`).
* Stage 2 (`train_stage2`): `stage2_records` further records streamed from the train split (items
  after stage 1's), with two additions that make the LM ground objects and tolerate pruning
  (docs/miniature.md §2):

  * **Token drops.** With probability `drop_prob` a batch's images lose a fraction
  U(0, `drop_max`) of their 576 visual tokens before the projector, one pattern per image drawn
  in equal measure from random, grid (`uniform_indices`) and object (every object patch first,
  then random background; a random subset of object patches when the budget is smaller). The kept
  tokens are spliced at contiguous positions, as every reducer's are at evaluation.
  * **A grounding loss.** For a turn about named objects (existence with answer yes, colour, shape,
  size, and counts above zero) the attention of head 0 in `ground_layers` from the position that
  predicts the answer is pulled onto those objects' kept patches, and for an existence question
  whose answer is no onto the sequence's first token (the attention sink: nothing matches):
  -log(attention mass on them), weighted `ground_weight` for the first `ground_fraction` of the steps.
  * **A gather loss** (`gather_weight`): head 0 of `gather_layer` is pulled, from the same answer
  positions, onto the colour and shape words of that turn's question: what the grounded heads'
  queries must carry. Without it the grounded heads' queries cannot tell which object is named,
  and their attention stays at the level of uniform (docs/miniature.md §3).
  * **Short visual contexts** first (`short_fraction` of the steps): every object patch plus
  U(0, `short_extra`) random background patches, so the lookup is learnt over a few dozen keys
  before it has to work over 576.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenprune.data.instruct import render
from tokenprune.data.shapes import COLORS, PLURALS, SHAPES, Question, Scene, make_item
from tokenprune.data.shapes_export import instruct_record
from tokenprune.recipes.mini_vision import GRID, object_masks
from tokenprune.reducers.baselines import uniform_indices
from tokenprune.templates import VICUNA_V1

Log = Callable[[str], None]
DROP_PATTERNS = ("random", "grid", "object")
SINGULAR = {plural: shape for shape, plural in PLURALS.items()}


def write_train_data(out: Path, recipe: Any, round_: int = 0) -> Path:
    """Stage 1 round `round_`'s train items (`stage1_records` from round_ * stage1_records) as
    LLaVA JSON + PNGs in `out`."""
    from tokenprune.data.shapes_export import write_instruct

    n = recipe.stage1_records
    return write_instruct(out, n, split="train", seed=recipe.seed, start=round_ * n)


def train_stage1(adapter, json_path: Path, recipe: Any, log: Log, tag: str = "") -> dict[str, Any]:
    """Projector + LM on the instruction JSON, the vision tower frozen; one plain loop, one process."""
    from torch.utils.data import DataLoader

    from tokenprune.data.instruct import InstructDataset, LengthGroupedSampler, collate, load_records
    from tokenprune.recipes.mini_shapes import cosine_schedule

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
        trained, lr=recipe.stage1_lr, betas=tuple(recipe.betas), weight_decay=recipe.stage1_weight_decay
    )
    total = sampler.num_batches() * recipe.stage1_epochs
    scheduler = cosine_schedule(optimizer, recipe.stage1_warmup, total)
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
                    f"[stage1] {tag}step {step}/{total} (epoch {epoch + 1}) loss {mean:.4f} "
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


def named_objects(scene: Scene, question: Question) -> list[int]:
    """The scene indices of the objects a question is about, [] when it names none that is present.

    Existence (answer yes), colour ("the square"), shape ("the red object"), size ("the red circle")
    and count questions with a non-zero answer name a colour and/or a shape; position, "which" and
    multiple-choice questions are left out (they involve several objects in different roles).
    """
    if question.kind not in ("existence", "color", "shape", "size", "count"):
        return []
    if question.answer in ("no", "0"):
        return []
    words = re.findall(r"[a-z]+", question.text.lower())
    color = next((w for w in words if w in COLORS), None)
    shape = next((SINGULAR.get(w, w) for w in words if w in SHAPES or w in SINGULAR), None)
    return [
        k
        for k, obj in enumerate(scene.objects)
        if (color is None or obj.color == color) and (shape is None or obj.shape == shape)
    ]


@dataclass
class Record:
    """One training record: the image, its rendered conversation, per turn the named objects' patches."""

    image: Any
    segments: list[tuple[str, bool]]
    targets: list[torch.Tensor | None]  # per turn [576] bool (all False: none); None: the sink
    objects: torch.Tensor  # [576] bool, patches with an object pixel


def make_record(index: int, seed: int) -> Record:
    """Train item `index` as a `Record` (the same turns, order and text as `write_instruct`'s JSON)."""
    item = make_item(index, "train", seed)
    image = item.image()
    masks = object_masks(item.scene, image)  # [n_objects, 576]
    by_prompt = {q.prompt: q for q in item.questions}
    turns = instruct_record(item, "")["conversations"]
    pairs = [(turns[k]["value"], turns[k + 1]["value"]) for k in range(0, len(turns), 2)]
    targets = []
    for user, _ in pairs:
        question = by_prompt[user.replace("<image>\n", "")]
        named = named_objects(item.scene, question)
        if question.kind == "existence" and question.answer == "no":
            targets.append(None)  # nothing to find: the attention belongs on the sequence's first token
        else:
            targets.append(masks[named].any(0) if named else torch.zeros(GRID * GRID, dtype=torch.bool))
    return Record(image, render(pairs, 1, VICUNA_V1), targets, masks.any(0))


def drop_indices(pattern: str, keep: int, objects: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`keep` of the 576 patch indices, ascending, by a drop pattern (see the module docstring)."""
    n = objects.numel()
    if pattern == "random":
        return torch.randperm(n, generator=generator)[:keep].sort().values
    if pattern == "grid":
        return uniform_indices(keep, (GRID, GRID))
    if pattern != "object":
        raise ValueError(f"drop pattern must be one of {DROP_PATTERNS}, got {pattern!r}")
    on, off = objects.nonzero().squeeze(1), (~objects).nonzero().squeeze(1)
    on = on[torch.randperm(on.numel(), generator=generator)]
    off = off[torch.randperm(off.numel(), generator=generator)]
    return torch.cat([on, off])[:keep].sort().values


def grounding_loss(model, inputs: Any, hidden: torch.Tensor, layer: int, rows: list) -> torch.Tensor:
    """-log(attention mass on the rows' key positions) of head 0 of LM layer `layer`: the grounding
    loss (keys: the named objects' kept patches, or the sink) and the gather loss (keys: the turn's
    colour and shape words, `gather_rows`).

    `hidden` [B, L, D] enters that layer; `rows` holds (sample, query position, key positions [K]).
    The attention is recomputed for the query rows only, exactly as the layer does it (RMSNorm,
    q/k projections, RoPE at the inputs' position ids, causal and padding mask).
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    language_model = model.model.language_model
    block = language_model.layers[layer]
    attention = block.self_attn
    head_dim = attention.head_dim
    normed = block.input_layernorm(hidden)  # [B, L, D]
    cos, sin = language_model.rotary_emb(normed, inputs.position_ids)  # [B, L, head_dim]
    q = attention.q_proj(normed)[..., :head_dim].unsqueeze(1)  # head 0: [B, 1, L, hd]
    k = attention.k_proj(normed)[..., :head_dim].unsqueeze(1)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    losses = []
    for b, query, keys in rows:
        scores = (k[b, 0, : query + 1] @ q[b, 0, query]) * attention.scaling  # [query + 1]
        scores = scores.masked_fill(inputs.attention_mask[b, : query + 1] == 0, float("-inf"))
        log_probs = scores.log_softmax(-1)
        losses.append(-torch.logsumexp(log_probs[keys], 0))
    return torch.stack(losses).mean()


def query_rows(
    inputs: Any, kept: Sequence[torch.Tensor], targets: Sequence[list[torch.Tensor | None]]
) -> list:
    """(sample, query position, key positions) per turn with a grounding target.

    The query position is the one before each answer's first labelled token; the key positions are
    the spliced places of the kept patches that belong to the named objects, or for a question
    about an absent object (target None) the sequence's first token (`<s>`, the attention sink).
    """
    rows = []
    labels = inputs.labels
    starts = (labels[:, 1:] != -100) & (labels[:, :-1] == -100)  # [B, L-1]: answer begins at t + 1
    firsts = {block.sample: block.first for block in inputs.blocks}
    for b in range(labels.shape[0]):
        queries = starts[b].nonzero().squeeze(1).tolist()
        if len(queries) != len(targets[b]):
            raise RuntimeError(f"{len(queries)} answers but {len(targets[b])} turns in sample {b}")
        sink = int(inputs.attention_mask[b].nonzero()[0, 0])  # left padding: the first real token
        for query, target in zip(queries, targets[b]):
            if target is None:
                rows.append((b, query, torch.tensor([sink])))
                continue
            on = target[kept[b]].nonzero().squeeze(1)  # places among the kept tokens
            if on.numel():
                rows.append((b, query, firsts[b] + on))
    return rows


def attribute_word_ids(tokenizer) -> torch.Tensor:
    """The token ids of the world's colour and shape words (" red", " circles", ...), one token each."""
    words = [*COLORS, *SHAPES, *PLURALS.values()]
    ids = [tokenizer(" " + word, add_special_tokens=False).input_ids for word in words]
    split = [word for word, i in zip(words, ids) if len(i) != 1]
    if split:
        raise ValueError(
            f"the tokenizer splits the world's words {split}; the gather loss needs one token each"
        )
    return torch.tensor(sorted({i[0] for i in ids}))


def gather_rows(inputs: Any, rows: list, word_ids: torch.Tensor) -> list:
    """Per grounding row (sample, query position, ...): (sample, query position, the positions of
    the colour and shape words in the query's own turn, i.e. after the previous answer)."""
    labelled = inputs.labels != -100
    out = []
    for b, query, _ in rows:
        earlier = labelled[b, :query].nonzero()
        start = int(earlier[-1]) + 1 if earlier.numel() else 0
        words = torch.isin(inputs.input_ids[b, start : query + 1], word_ids).nonzero().squeeze(1)
        if words.numel():
            out.append((b, query, words + start))
    return out


def visual_budget(step: int, recipe: Any, objects: torch.Tensor, generator: torch.Generator, dropping: bool):
    """The kept patch indices of one image at stage-2 step `step` (short context, drop, or all 576)."""
    if step < int(recipe.short_fraction * recipe.stage2_records // recipe.stage2_batch):
        extra = int(torch.randint(recipe.short_extra + 1, (), generator=generator))
        return drop_indices("object", int(objects.sum()) + extra, objects, generator)
    if not dropping:
        return torch.arange(GRID * GRID)
    fraction = float(torch.rand((), generator=generator)) * recipe.drop_max
    keep = max(1, round(GRID * GRID * (1 - fraction)))
    if keep == GRID * GRID:
        return torch.arange(GRID * GRID)
    pattern = DROP_PATTERNS[int(torch.randint(len(DROP_PATTERNS), (), generator=generator))]
    return drop_indices(pattern, keep, objects, generator)


def train_stage2(adapter, recipe: Any, log: Log) -> dict[str, Any]:
    """Projector + LM on `stage2_records` streamed train records (after stage 1's), the tower frozen."""
    from tokenprune.recipes.mini_shapes import cosine_schedule

    model = adapter.model
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trained, lr=recipe.stage2_lr, betas=tuple(recipe.betas), weight_decay=recipe.stage1_weight_decay
    )
    total = recipe.stage2_records // recipe.stage2_batch
    scheduler = cosine_schedule(optimizer, recipe.stage2_warmup, total)
    generator = torch.Generator().manual_seed(recipe.seed + 7)
    ground_steps = int(recipe.ground_fraction * total)
    first = recipe.stage1_records * recipe.stage1_rounds  # train items stage 1 has not seen
    model.train()
    tower.eval()
    word_ids = attribute_word_ids(adapter.tokenizer)
    start, window, history = time.perf_counter(), {"loss": [], "ground": [], "gather": [], "tokens": []}, []
    for step in range(total):
        records = [
            make_record(first + step * recipe.stage2_batch + k, recipe.seed)
            for k in range(recipe.stage2_batch)
        ]
        with torch.no_grad():
            features = adapter.visual_tokens(adapter.preprocess([r.image for r in records])).features
        dropping = float(torch.rand((), generator=generator)) < recipe.drop_prob
        kept = [visual_budget(step, recipe, r.objects, generator, dropping) for r in records]
        projected = [adapter.projector()(f[k]) for f, k in zip(features, kept)]
        inputs = adapter.splice([r.segments for r in records], [[k.numel()] for k in kept], projected)
        grounding = step < ground_steps and recipe.ground_weight + recipe.gather_weight > 0
        output = model(**inputs.as_kwargs(), use_cache=False, output_hidden_states=grounding)
        loss = output.loss
        rows = query_rows(inputs, kept, [r.targets for r in records]) if grounding else []
        if rows and recipe.ground_weight > 0:
            ground = sum(
                grounding_loss(model, inputs, output.hidden_states[layer], layer, rows)
                for layer in recipe.ground_layers
            ) / len(recipe.ground_layers)
            loss = loss + recipe.ground_weight * ground
            window["ground"].append(float(ground.detach()))
        gathered = gather_rows(inputs, rows, word_ids) if rows and recipe.gather_weight > 0 else []
        if gathered:
            layer = recipe.gather_layer
            gather = grounding_loss(model, inputs, output.hidden_states[layer], layer, gathered)
            loss = loss + recipe.gather_weight * gather
            window["gather"].append(float(gather.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(trained, recipe.grad_clip)
        optimizer.step()
        scheduler.step()
        window["loss"].append(float(output.loss.detach()))
        window["tokens"].append(sum(k.numel() for k in kept) / len(kept))
        if (step + 1) % recipe.log_every == 0 or step + 1 == total:
            means = {k: sum(v) / len(v) for k, v in window.items() if v}
            history.append({"step": step + 1, **means})
            log(
                f"[stage2] step {step + 1}/{total} loss {means['loss']:.4f} "
                f"ground {means.get('ground', 0.0):.3f} gather {means.get('gather', 0.0):.3f} visual tokens {means['tokens']:.0f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} elapsed {time.perf_counter() - start:.0f}s"
            )
            window = {k: [] for k in window}
    model.eval()
    return {"seconds": time.perf_counter() - start, "steps": total, "history": history}
