"""The recipe of the embedded miniature's model, `mini_shapes`: a small LLaVA trained on the shapes world.

    python -m tokenprune.recipes.mini_shapes                     # the shipped build (make mini-model)
    python -m tokenprune.recipes.mini_shapes recipe.stage2_records=400 out=/tmp/mini   # a trial build

Its config is `configs/recipe/mini_shapes.yaml` (every knob of `Recipe`); design, costs and
measured properties: docs/miniature.md. The build is

1. a byte-level BPE tokenizer trained on `shapes_corpus()` (`tiny.train_tokenizer`'s code path);
2. a `LlavaForConditionalGeneration` (CLIP tower, mlp2x_gelu projector, Llama LM) built from config;
3. stage 0 (`mini_vision`): the CLIP tower alone with CLS heads and a per-patch head, on scenes
   streamed from the train split;
4. stage 1 (`mini_language`, the v1 recipe): the tower frozen, projector + LM for one epoch on the
   train split's instruction JSON; stage 2: further streamed records with visual-token drops and a
   grounding loss on the answer position's attention (`init_from` loads stages 0 + 1 instead);
5. a held-out check on the val split (`mini_checks.heldout_report`), then `save_pretrained`
   (safetensors) + processor + `BUILD.json` into a staging folder renamed over the target.

Everything is deterministic given the seed on one CPU thread count. Nothing in `tokenprune.models`
imports this package.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from tokenprune.atomic import atomic_folder
from tokenprune.config import CONFIG_DIR, UserError, register_resolvers
from tokenprune.data.shapes import IMAGE_SIZE
from tokenprune.models.llava import LLAVA15_PROMPT, LlavaAdapter
from tokenprune.models.tiny import IMAGE_TOKEN, LLAVA15_CHAT_TEMPLATE, train_tokenizer
from tokenprune.recipes.mini_vision import GRID, PATCH

Log = Callable[[str], None]
register_resolvers()


def log_line(message: str) -> None:
    print(message, flush=True)


INIT_STAGES = ("0+1", "0")


@dataclass(frozen=True)
class Recipe:
    """Every knob of the build (docs/miniature.md §2); configs/recipe/mini_shapes.yaml sets the shipped values."""

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
    # CLS calibration: KL from a target that puts `stage0_cls_core_mass` on the objects' core patches
    # (`mini_vision.core_patches`) and the rest on the background, to PruMerge's CLS attention (0: off)
    stage0_cls_weight: float = 0.0
    stage0_cls_core_mass: float = 0.5
    # stage 1 (the v1 recipe): projector + LM, one epoch over the train split's instruction JSON;
    # round r trains on fresh train items r*records .. (r+1)*records - 1 with its own warm-up + cosine
    stage1_records: int = 12_000
    stage1_rounds: int = 1
    stage1_epochs: int = 1
    stage1_batch: int = 8
    stage1_lr: float = 1e-3
    stage1_weight_decay: float = 0.0
    stage1_warmup: int = 100
    # stage 2: projector + LM on further streamed records with token drops and the grounding loss
    stage2_records: int = 2_000
    stage2_batch: int = 8
    stage2_lr: float = 1e-3
    stage2_warmup: int = 30
    drop_prob: float = 0.5  # share of batches whose images lose visual tokens
    drop_max: float = 0.8  # a dropping batch's images lose U(0, drop_max) of their tokens
    ground_weight: float = 1.0  # grounding loss weight (0: off)
    ground_fraction: float = 1.0  # the grounding loss runs for this share of stage 2's steps
    ground_layers: tuple[int, ...] = (1, 2)  # LM layers whose head 0 is grounded
    # the gather loss: head 0 of `gather_layer` attends from a grounded turn's answer position to
    # that turn's colour and shape words (what the grounded heads' queries need); 0: off
    gather_weight: float = 0.0
    gather_layer: int = 0
    # the first `short_fraction` of stage 2's steps show short visual contexts: every object patch
    # plus U(0, short_extra) random background patches (the lookup over few keys is learnt first)
    short_fraction: float = 0.0
    short_extra: int = 40
    # a checkpoint of this recipe's knobs (e.g. the v1 build) to start from: its stages 0 + 1
    # (init_stages "0+1": stage 2 only runs), or its vision tower only ("0": stage 1, if it has
    # records, and stage 2 run on a freshly initialised projector and LM)
    init_from: str | None = None
    init_stages: str = "0+1"
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    # held-out check on the val split
    heldout_items: int = 30
    heldout_batch: int = 16
    threads: int = 2
    log_every: int = 50

    @classmethod
    def from_config(cls, config: Any) -> Recipe:
        """The recipe from a mapping (the Hydra config's `recipe`), naming any unknown knob."""
        values = dict(config)
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(
                f"unknown recipe knobs {unknown}; the knobs are Recipe's fields (docs/miniature.md §2)"
            )
        for name in ("betas", "ground_layers"):
            if name in values:
                values[name] = tuple(values[name])
        if "init_stages" in values:  # Hydra reads init_stages=0 as a number
            values["init_stages"] = str(values["init_stages"])
        if values.get("init_stages", "0+1") not in INIT_STAGES:
            raise UserError(f"recipe.init_stages must be one of {INIT_STAGES}, got {values['init_stages']!r}")
        return cls(**values)


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


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Linear warm-up, then cosine to 0 (both stages)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=min(warmup, total), num_training_steps=total
    )


def load_stages(model, path: str, stages: str = "0+1") -> dict[str, Any]:
    """Load stages 0 + 1 (`stages` "0+1") or the vision tower only ("0") from the checkpoint at
    `path` (the recipe's `init_from`); returns its BUILD.json.

    The checkpoint must come from this recipe with the same model knobs (its tokenizer is rebuilt
    identically from the corpus); its build record says what its stages cost.
    """
    from transformers import LlavaForConditionalGeneration

    record = Path(path) / "BUILD.json"
    if not record.is_file():
        raise UserError(f"init_from={path}: no BUILD.json there; give a folder written by this recipe")
    source = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    try:
        if stages == "0":
            model.model.vision_tower.load_state_dict(source.model.vision_tower.state_dict())
        else:
            model.load_state_dict(source.state_dict())
    except RuntimeError as error:  # shape mismatches: other model knobs
        raise UserError(f"init_from={path}: its weights do not fit the recipe's model: {error}") from error
    return json.loads(record.read_text())


# ------------------------------------------------------------------------------------- the build
def save_atomic(path: Path, parts: Sequence[Any], info: dict[str, Any]) -> Path:
    """save_pretrained every part + BUILD.json into a staging folder, then swap it in at `path`."""
    with atomic_folder(path) as staging:
        for part in parts:
            part.save_pretrained(staging)
        files = sorted(p for p in staging.iterdir() if p.is_file())
        for file in files:  # mkdtemp / safetensors make owner-only files; a shipped folder is readable
            file.chmod(0o644)
        staging.chmod(0o755)
        info["files"] = {p.name: p.stat().st_size for p in files}
        info["total_bytes"] = sum(info["files"].values()) + len(json.dumps(info, indent=1)) + 64
        (staging / "BUILD.json").write_text(json.dumps(info, indent=1) + "\n")
    return path


def build(out: Path, recipe: Recipe, log: Log = log_line) -> dict[str, Any]:
    """Build `mini_shapes` into `out` (atomically); returns what BUILD.json records."""
    import transformers

    from tokenprune.recipes.mini_checks import heldout_report
    from tokenprune.recipes.mini_language import train_stage2

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
    adapter = LlavaAdapter(model, processor, prompt=LLAVA15_PROMPT, image_aspect="pad")
    if recipe.init_from:
        previous = load_stages(model, recipe.init_from, recipe.init_stages)
        stage0 = {"from": recipe.init_from, "history": previous["stage0"]["history"]}
        if recipe.init_stages == "0+1":
            stage1 = {"from": recipe.init_from, **previous["stage1"]}
            loaded = ("data", "stage0", "stage1")
        else:
            stage1, stage1_times = train_stage1_rounds(adapter, recipe, log)
            times.update(stage1_times)
            loaded = ("stage0",)
        earlier = {k: previous["seconds"][k] for k in loaded if k in previous["seconds"]}
        log(f"[build] stages {recipe.init_stages} from {recipe.init_from} (they took {earlier})")
    else:
        stage0, stage1, earlier = train_stages_0_1(model, processor, adapter, recipe, log)
    torch.manual_seed(recipe.seed + 2 + recipe.stage1_rounds)
    stage2 = train_stage2(adapter, recipe, log)
    times["stage2"] = stage2.pop("seconds")
    report = heldout_report(adapter, recipe.heldout_items, recipe.heldout_batch, recipe.seed)
    times["heldout"] = report.pop("seconds")
    log(f"[heldout] {json.dumps(report)}")
    times["total"] = time.perf_counter() - began
    times = {**earlier, **times}
    if recipe.init_from:  # this run's time plus what the loaded stages took in their own build
        times["total_with_init"] = times["total"] + sum(earlier.values())
    info = {
        "command": shlex.join(["python", "-m", __spec__.name if __spec__ else __name__, *sys.argv[1:]]),
        "recipe": asdict(recipe),
        "parameters": params,
        "tokenizer_size": len(tokenizer),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "host": {"cpus": os.cpu_count(), "threads": recipe.threads, "machine": platform.machine()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "stage0": stage0,
        "stage1": stage1,
        "stage2": stage2,
        "heldout": report,
    }
    save_atomic(Path(out), [model, processor], info)
    log(f"[build] wrote {out} ({info['total_bytes'] / 1e6:.1f} MB) in {times['total'] / 60:.1f} min")
    return info


def train_stages_0_1(model, processor, adapter, recipe: Recipe, log: Log) -> tuple[dict, dict, dict]:
    """Stage 0 (the tower) and stage 1 (the v1 LM training): their records and seconds."""
    from tokenprune.recipes.mini_vision import train_stage0

    torch.manual_seed(recipe.seed + 1)
    stage0 = train_stage0(model, adapter.preprocess, recipe, log)
    times = {"stage0": stage0.pop("seconds")}
    stage1, stage1_times = train_stage1_rounds(adapter, recipe, log)
    return stage0, stage1, {**stage1_times, **times}


def train_stage1_rounds(adapter, recipe: Recipe, log: Log) -> tuple[dict, dict]:
    """Stage 1's rounds, each on its own instruction JSON (none when `stage1_records` is 0)."""
    from tokenprune.recipes.mini_language import train_stage1, write_train_data

    times, rounds = {"data": 0.0}, []
    if recipe.stage1_records == 0:
        return {"steps": 0, "rounds": rounds}, {}
    with tempfile.TemporaryDirectory(prefix="mini_shapes_data-") as scratch:
        for round_ in range(recipe.stage1_rounds):
            tick = time.perf_counter()
            json_path = write_train_data(Path(scratch) / f"round{round_ + 1}", recipe, round_)
            times["data"] += time.perf_counter() - tick
            log(f"[data] {recipe.stage1_records} train records ({times['data']:.0f}s)")
            torch.manual_seed(recipe.seed + 2 + round_)
            tag = f"round {round_ + 1}/{recipe.stage1_rounds} "
            rounds.append(train_stage1(adapter, json_path, recipe, log, tag))
    times["stage1"] = sum(r.pop("seconds") for r in rounds)
    return {"steps": sum(r["steps"] for r in rounds), "rounds": rounds}, times


@hydra.main(config_path=str(CONFIG_DIR), config_name="recipe/mini_shapes", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    """`python -m tokenprune.recipes.mini_shapes [overrides]` (make mini-model)."""
    from tokenprune.cli import one_line_errors

    with one_line_errors():
        recipe = Recipe.from_config(OmegaConf.to_container(cfg.recipe, resolve=True))
        return build(Path(cfg.out), recipe)


if __name__ == "__main__":
    main()
