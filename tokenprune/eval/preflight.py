"""Checks of a composed config that run before any model loads: bad input fails fast, in one line.

`check(cfg)` runs them all; the entry points (`tokenprune.cli`) run it before Hydra creates a run
folder, and `tokenprune.eval.runner.run` / `tokenprune.train.pipeline.run` run it again for callers
that compose configs themselves. Each failure is a `UserError` whose message names the problem and
the fix; the entry points print it as one line and exit with status 2.

What is checked:

* **types**: every key of every `_target_` node (model, reducer, benchmark, train and their nested
  nodes) is a parameter of its target and has the annotated type (`reducer.keep=abc` is refused);
* **values**: `benchmark.limit` >= 1, `batch_size` >= 1, `reducer.keep` / `ratio` in range, the cut
  layers of a reducer inside the LLM within the model's depth (`check_cut_layers`), and
  `keep` (or PruMerge+'s fixed `budget`) below the model's visual tokens per image where the
  checkpoint's config says it (a fixed-grid LLaVA);
* **recipe**: `python -m tokenprune.train` without `train=` trains with the miniature's recipe
  (`lora_mini`) only on the miniature;
* **model**: the checkpoint is a local folder or in the Hugging Face cache (or built on first use);
* **environment**: the outputs folder is a writable folder (or can be created), and `launcher=slurm`
  finds SLURM's `srun`;
* **data**: every task exists and has its data (`tokenprune.eval.runner.resolve_tasks`); lmms-eval's
  datasets cache is put under `paths.cache`.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tokenprune.config import UserError, choices

# The miniature's training recipe and the only model it is for (train.yaml's default stage).
MINI_RECIPE, MINI_MODEL = "lora_mini", "mini_shapes"
_TYPED_GROUPS = ("model", "reducer", "benchmark", "train")


def check(cfg: DictConfig, overrides: Sequence[str] | None = None) -> Any:
    """Every check below; returns the lmms-eval TaskManager the data check built (or None).

    Args:
        cfg: the composed config (eval.yaml or train.yaml).
        overrides: the command line's overrides (None: Hydra's, when a job is running).

    Raises:
        UserError: the first problem found.
    """
    picked = choices()
    check_types(cfg)
    check_values(cfg)
    check_outputs(str(cfg.paths.outputs))
    check_recipe(cfg, picked, _overrides() if overrides is None else overrides)
    check_model(cfg)
    check_keep(cfg)
    check_cut_layers(cfg)
    return check_data(cfg)


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


# ---------------------------------------------------------------------------------------- types
def check_types(cfg: DictConfig) -> None:
    """Each `_target_` node's keys are parameters of the target, with values of the annotated type."""
    for group in _TYPED_GROUPS:
        node = cfg.get(group)
        if OmegaConf.is_dict(node) and "_target_" in node:
            _check_node(group, node)


def _check_node(where: str, node: DictConfig) -> None:
    from hydra.utils import get_method

    target_name = str(node._target_)
    try:
        target = get_method(target_name)
    except Exception as error:  # hydra raises several types for a bad path
        raise UserError(f"{where}._target_={target_name!r} cannot be imported ({error})") from error
    function = target.__init__ if inspect.isclass(target) else target
    signature = inspect.signature(function)
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # unresolvable annotations: check names only
        hints = {}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    label = target_name.rsplit(".", 1)[-1]
    for key in node:
        key = str(key)
        if key.startswith("_"):
            continue
        path = f"{where}.{key}"
        if key not in signature.parameters:
            if open_ended:
                continue
            fields = ", ".join(p for p in signature.parameters if p not in ("self", "cls"))
            raise UserError(f"{path}: {label} has no parameter {key!r} (its parameters: {fields})")
        value = node[key]
        if OmegaConf.is_dict(value) and "_target_" in value:
            _check_node(path, value)
            continue
        if key not in hints:
            continue
        plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if not conforms(plain, hints[key]):
            raise UserError(
                f"{path}={plain!r} is not a {type_name(hints[key])} ({label}); give e.g. "
                f"{path}={example(hints[key])}"
            )


def conforms(value: Any, hint: Any) -> bool:
    """True when `value` (plain Python from a config) fits the annotation `hint`.

    Annotations this cannot judge (classes, protocols, callables) accept any value.
    """
    origin = typing.get_origin(hint)
    if hint is Any or hint is object:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return len(args) != 1 or all(conforms(v, args[0]) for v in value)
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, dict)
    return True


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def example(hint: Any) -> str:
    """A value of the annotated type, for the fix in an error message."""
    args = typing.get_args(hint) or (hint,)
    if typing.get_origin(hint) is typing.Literal:
        return str(args[0])
    examples = {int: "64", float: "0.5", bool: "true", str: "name"}
    return next((examples[a] for a in args if a in examples), "null")


# ---------------------------------------------------------------------------------------- values
def check_values(cfg: DictConfig) -> None:
    """Ranges a signature cannot say: limit and batch size >= 1, keep >= 1, 0 < ratio <= 1."""
    benchmark = cfg.get("benchmark") or {}
    limit = benchmark.get("limit")
    if limit is not None and limit < 1:
        raise UserError(
            f"benchmark.limit={limit} evaluates nothing: give benchmark.limit=N with N >= 1, or null for every sample"
        )
    if benchmark.get("batch_size") is not None and benchmark.batch_size < 1:
        raise UserError(f"benchmark.batch_size={benchmark.batch_size}: give 1 or more")
    reducer = cfg.get("reducer") or {}
    keep = reducer.get("keep")
    for value in keep if isinstance(keep, list | tuple | ListConfig) else [keep]:
        # a count (>= 1), or for reducers that take one (inside the LLM) a fraction in (0, 1]
        if isinstance(value, bool) or value is None:
            continue
        if (isinstance(value, int) and value < 1) or (isinstance(value, float) and not 0 < value <= 1):
            raise UserError(
                f"reducer.keep={keep}: keep at least 1 token, or a fraction in (0, 1] (reducer=none for all)"
            )
    ratio = reducer.get("ratio")
    if ratio is not None and not 0 < ratio <= 1:
        raise UserError(f"reducer.ratio={ratio}: give a fraction in (0, 1] of the tokens to keep")


def _model_config_file(path: str) -> Path | None:
    """The checkpoint's config.json: in the local folder `path`, or in the HF cache for a hub id."""
    local = Path(path).expanduser() / "config.json"
    if local.is_file():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
    except Exception:  # not a valid repo id
        return None
    return Path(cached) if isinstance(cached, str) else None


def check_model(cfg: DictConfig) -> None:
    """The model's checkpoint is a local folder or in the Hugging Face cache (or built on first use)."""
    model = cfg.get("model") or {}
    path = model.get("path")
    if not path or model.get("build") or _model_config_file(str(path)) is not None:
        return
    if Path(str(path)).expanduser().is_absolute() or str(path).startswith((".", "~")):
        raise UserError(f"model.path={path}: no checkpoint there (no config.json); set model.path=FOLDER")
    raise UserError(
        f"model.path={path}: not a local checkpoint folder nor in the Hugging Face cache; download it "
        f"once on a machine with network access (`huggingface-cli download {path}`) or set model.path=FOLDER"
    )


def visual_tokens_per_image(model: DictConfig) -> int | None:
    """Visual tokens per image of a fixed-grid LLaVA checkpoint, read from its config.json (no weights).

    None when the config is not on disk yet (a tiny model built on first use) or the family has a
    variable count (Qwen2-VL, LLaVA-OneVision).
    """
    path = model.get("path")
    config_file = _model_config_file(str(path)) if path else None
    if config_file is None:
        return None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    vision = config.get("vision_config") or {}
    if config.get("model_type") != "llava" or "image_size" not in vision or "patch_size" not in vision:
        return None
    side = int(vision["image_size"]) // int(vision["patch_size"])
    return side * side


def check_keep(cfg: DictConfig) -> None:
    """A reducer asked to keep as many tokens as the image has (or more) would run the unreduced model
    under its own name: refused, naming the model's count."""
    reducer = cfg.get("reducer") or {}
    asked = {"reducer.keep": reducer.get("keep")}
    if reducer.get("grid") == "fixed":
        asked["reducer.budget"] = reducer.get("budget")
    asked = {k: v for k, v in asked.items() if isinstance(v, int) and not isinstance(v, bool)}
    if not asked or "model" not in cfg:
        return
    n = visual_tokens_per_image(cfg.model)
    for key, value in asked.items():
        if n is not None and value >= n:
            raise UserError(
                f"{key}={value} >= the {n} visual tokens per image of this model: nothing would be "
                f"reduced; give {key} < {n}, or reducer=none for the unreduced model"
            )


def check_cut_layers(cfg: DictConfig) -> None:
    """A reducer inside the LLM (`layer` or `layers`) cuts after decoder layers the model has: each
    K in 1 .. n_layers - 1 (read from the checkpoint's config.json when it is on disk)."""
    reducer = cfg.get("reducer") or {}
    asked = reducer.get("layers", reducer.get("layer"))
    if asked is None or "model" not in cfg or not (cfg.model.get("path")):
        return
    config_file = _model_config_file(str(cfg.model.path))
    if config_file is None:
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    depth = (config.get("text_config") or config).get("num_hidden_layers")
    layers = list(asked) if isinstance(asked, list | tuple | ListConfig) else [asked]
    if depth is None or not all(isinstance(k, int) and not isinstance(k, bool) for k in layers):
        return
    if any(not 1 <= k < depth for k in layers):
        key = "reducer.layers" if "layers" in reducer else "reducer.layer"
        scaled: list[int] = []
        for k in layers:  # the cuts at the same fractions of the depth, kept increasing
            scaled.append(min(max(1, round(k * depth / 32), scaled[-1] + 1 if scaled else 1), depth - 1))
        hint = (
            f"e.g. {key}={scaled} for cuts written for 32 layers"
            if len(set(scaled)) == len(scaled)
            else f"it fits at most {depth - 1} cut(s)"
        )
        raise UserError(
            f"{key}={layers}: this model's LLM has {depth} decoder layers, so a cut goes after layer K in "
            f"1..{depth - 1}; scale the cuts to its depth ({hint})"
        )


# ---------------------------------------------------------------------------------------- recipe
def check_recipe(cfg: DictConfig, picked: Mapping[str, str], overrides: Sequence[str]) -> None:
    """train.yaml's default stage (the miniature's 100 steps on synthetic scenes) is for the miniature
    only: another model must name its stage."""
    if picked.get("train") != MINI_RECIPE or picked.get("model") in (None, MINI_MODEL):
        return
    if any(o.split("=", 1)[0].lstrip("+~") in ("train", "experiment") for o in overrides):
        return  # asked for explicitly (or by an experiment, which pins its stage)
    raise UserError(
        f"model={picked['model']} with no train=: the default train={MINI_RECIPE} is the miniature's "
        f"recipe (100 steps on synthetic shapes scenes); give train=lora_paper (LLaVA-1.5's LoRA), "
        f"train=lora, train=none (evaluate only) or train={MINI_RECIPE} explicitly"
    )


# ---------------------------------------------------------------------------------------- environment
def check_outputs(outputs: str) -> None:
    """`paths.outputs` is a writable folder, or can be created (its nearest existing parent is)."""
    path = Path(outputs).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    fix = "set paths.outputs=DIR or TOKENPRUNE_OUTPUTS=DIR to a writable folder"
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == path else f"is under {probe}, which is a file"
        raise UserError(f"the outputs folder {path} {what}; {fix}")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is" if probe == path else f"would be created in {probe}, which is"
        raise UserError(f"the outputs folder {path} {where} not writable; {fix}")


def check_launcher(launcher: str | None) -> None:
    """`launcher=slurm` submits with sbatch and needs SLURM's commands on this machine."""
    if launcher == "submitit_slurm" and not (shutil.which("srun") and shutil.which("sbatch")):
        raise UserError(
            "launcher=slurm: SLURM's srun/sbatch are not on this machine's PATH; run the sweep on a "
            "SLURM login node, or use launcher=local (or submitit_local) here"
        )


# ---------------------------------------------------------------------------------------- data
def use_cache(cache: str | None) -> None:
    """lmms-eval prepares datasets (and takes their file locks) in `<paths.cache>/datasets`, not in the
    user's home, unless LMMS_EVAL_DATASETS_CACHE is set. The Hugging Face hub cache (HF_HOME), where
    downloaded benchmarks are looked up, is left alone. Set before lmms-eval's first dataset load
    (it reads the variable once per process)."""
    if cache:
        os.environ.setdefault("LMMS_EVAL_DATASETS_CACHE", str(Path(cache).expanduser() / "datasets"))


def check_data(cfg: DictConfig) -> Any:
    """The benchmark's tasks exist and have their data; returns the TaskManager (reused by the run)."""
    from hydra.utils import instantiate

    from tokenprune.eval.data import DatasetNotFound
    from tokenprune.eval.runner import resolve_tasks, task_manager_for

    if "benchmark" not in cfg or "_target_" not in cfg.benchmark:
        return None
    use_cache(cfg.paths.get("cache"))
    benchmark = instantiate(cfg.benchmark)
    try:
        task_manager = task_manager_for(benchmark)
        resolve_tasks(benchmark, task_manager)
    except (DatasetNotFound, FileNotFoundError, ValueError) as error:
        raise UserError(str(error).replace("\n", " ")) from error
    return task_manager
