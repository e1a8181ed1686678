"""Where each lmms-eval task reads its data, resolved before a run starts (fail fast, no downloads).

For every task the runner builds one lmms-eval config override, from (later wins):

1. the prompt set (`tokenprune.eval.prompts.PROMPTS[prompt]`),
2. the benchmark's `task_overrides`,
3. the data location (this module).

`lmms_eval_specific_kwargs` and `generation_kwargs` are deep-merged over the task's own YAML values,
so an override names only what it changes (`dataset_kwargs` and every other key are replaced);
string values "!function module.attr" are imported.

Data location, per task, for the dataset id ``D`` of its YAML (``dataset_path``):

* **local**: ``<data_root>/<D>`` (or ``<data_root>/lmms-lab/<name>`` for the pre-2026 id) — a copy
  of the Hugging Face dataset repository (``huggingface-cli download --repo-type dataset D
  --local-dir <data_root>/D``); video tasks keep their videos inside it where lmms-eval's cache
  keeps them (``data/`` for Video-MME, ``videos/`` for EgoSchema, ``NExTVideo/`` for NExT-QA, the
  source folders for MVBench);
* **HF cache** (offline): the user's Hugging Face cache holds ``D`` (hub cache or datasets cache)
  and, for video tasks, lmms-eval's unpacked ``$HF_HOME/<cache_dir>`` folder.

Anything else raises `DatasetNotFound` naming the task, the dataset id and how to fetch it, before
the model or lmms-eval starts.
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
from pathlib import Path
from typing import Any

# lmms-eval doc_to_visual function -> (our replacement, video folder inside the dataset / cache dir)
VIDEO_VISUALS = {
    "videomme_doc_to_visual": ("tokenprune.eval.video.videomme_doc_to_visual", "data"),
    "mvbench_doc_to_visual": ("tokenprune.eval.video.mvbench_doc_to_visual", ""),
    "egoschema_doc_to_visual": ("tokenprune.eval.video.egoschema_doc_to_visual", "videos"),
    "nextqa_doc_to_visual": ("tokenprune.eval.video.nextqa_doc_to_visual", "NExTVideo"),
    "activitynetqa_doc_to_visual": ("tokenprune.eval.video.activitynetqa_doc_to_visual", "all_test"),
}
# Tasks whose score needs a network service; allowed only with benchmark.api_judge=true.
API_TASKS = {
    "activitynetqa": "an OpenAI-compatible judge (OPENAI_API_KEY, OPENAI_API_URL; MODEL_VERSION)",
    "mmbench_en_dev": "an OpenAI-compatible judge for unparsed answers (use mmbench_en_dev_static offline)",
    "egoschema": "EgoSchema's validation server (use egoschema_subset offline)",
}
_MERGED_KEYS = ("lmms_eval_specific_kwargs", "generation_kwargs")  # dataset_kwargs is replaced whole


class DatasetNotFound(FileNotFoundError):
    """A task's dataset is neither under data_root nor in the Hugging Face cache."""


def hf_home() -> Path:
    return Path(os.path.expanduser(os.environ.get("HF_HOME", "~/.cache/huggingface")))


def in_hf_cache(dataset_id: str) -> bool:
    """True if the hub cache or the datasets cache holds `dataset_id` (no network)."""
    from datasets.naming import camelcase_to_snakecase
    from huggingface_hub import constants

    org, _, name = dataset_id.rpartition("/")
    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{dataset_id.replace('/', '--')}"
    roots = [os.environ.get("LMMS_EVAL_DATASETS_CACHE"), os.environ.get("HF_DATASETS_CACHE")]
    roots = [Path(os.path.expanduser(r)) for r in roots if r] + [hf_home() / "datasets"]
    cached = [root / f"{org}___{camelcase_to_snakecase(name)}" if org else root / name for root in roots]
    return (hub / "snapshots").is_dir() or any(p.is_dir() for p in cached)


def local_dataset_dir(data_root: str | os.PathLike | None, dataset_id: str) -> Path | None:
    """``<data_root>/<dataset_id>`` (or its pre-2026 ``lmms-lab/<name>`` id) if that folder exists."""
    if not data_root:
        return None
    name = dataset_id.rpartition("/")[2]
    for candidate in (dataset_id, f"lmms-lab/{name}"):
        folder = Path(data_root).expanduser() / candidate
        if folder.is_dir():
            return folder.resolve()
    return None


def fetch_hint(dataset_id: str, data_root: str | os.PathLike | None, cache_dir: str | None) -> str:
    lines = [
        f"fetch it on a machine with network access: `huggingface-cli download --repo-type dataset {dataset_id}`",
        f"(or `... --local-dir {Path(data_root or '<data_root>') / dataset_id}` for paths.data_root)",
    ]
    if cache_dir:
        lines.append(
            f"video tasks also need the videos unpacked where lmms-eval expects them: {hf_home() / cache_dir} "
            f"(one online lmms-eval run of the task unpacks them), or inside the local copy"
        )
    return "; ".join(lines)


def task_yaml(task_manager: Any, task: str) -> dict[str, Any]:
    """The task's YAML config (includes merged), without importing its functions."""
    from lmms_eval.utils import load_yaml_config

    return load_yaml_config(task_manager._get_yaml_path(task), mode="simple")


def _function_name(node: Any) -> str | None:
    """The function name of a simple-mode `!function utils.x` node (or a plain string)."""
    value = getattr(node, "value", node)
    return value.rsplit(".", 1)[-1] if isinstance(value, str) else None


def locate(task: str, config: dict[str, Any], data_root: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The data-location override of one task, and a description of where its data is.

    Raises:
        DatasetNotFound: neither a local copy nor the HF cache has the task's dataset (or videos).
    """
    dataset_id = config.get("dataset_path")
    kwargs = dict(config.get("dataset_kwargs") or {})
    video = VIDEO_VISUALS.get(_function_name(config.get("doc_to_visual")) or "")
    if (
        not isinstance(dataset_id, str)
        or dataset_id in ("parquet", "json", "csv")
        or Path(dataset_id).is_absolute()
    ):
        return {}, {"source": "task", "dataset": dataset_id}  # a task with its own local files
    override: dict[str, Any] = {}
    local = local_dataset_dir(data_root, dataset_id)
    if local is not None:
        override["dataset_path"] = str(local)
        # the local copy is a plain dataset folder: no hub revision, no video download/unpack step
        override["dataset_kwargs"] = {k: v for k, v in kwargs.items() if k in ("token",)}
        if _function_name(config.get("process_docs")) == "gqa_process_docs":
            override["process_docs"] = functools.partial(gqa_process_docs, source=str(local))
        info = {"source": "local", "dataset": dataset_id, "path": str(local)}
        video_root = local
    else:
        if not in_hf_cache(dataset_id):
            raise DatasetNotFound(
                f"task {task!r}: dataset {dataset_id!r} is not under paths.data_root ({data_root}) nor in the "
                f"Hugging Face cache ({hf_home()}); {fetch_hint(dataset_id, data_root, kwargs.get('cache_dir'))}"
            )
        info = {"source": "hf_cache", "dataset": dataset_id}
        video_root = hf_home() / str(kwargs.get("cache_dir", "")) if video else None
        if video and (video_root is None or not video_root.is_dir()):
            raise DatasetNotFound(
                f"task {task!r}: the videos of {dataset_id!r} are not unpacked at {video_root}; "
                f"{fetch_hint(dataset_id, data_root, kwargs.get('cache_dir'))}"
            )
    if video:
        function, subdir = video
        override["doc_to_visual"] = "!function " + function
        video_dir = Path(video_root) / subdir if subdir else Path(video_root)
        override["lmms_eval_specific_kwargs"] = {"default": {"video_dir": str(video_dir)}}
        info["videos"] = str(video_dir)
    return override, info


def deep_merge(base: Any, update: Any) -> Any:
    """`update` over `base` for nested dicts (new objects; other values are replaced)."""
    if not isinstance(base, dict) or not isinstance(update, dict):
        return copy.deepcopy(update)
    merged = copy.deepcopy(base)
    for key, value in update.items():
        merged[key] = deep_merge(merged[key], value) if key in merged else copy.deepcopy(value)
    return merged


def resolve_functions(value: Any) -> Any:
    """Replace "!function module.attr" strings (at any depth) by the imported objects."""
    if isinstance(value, str) and value.startswith("!function "):
        module, _, attr = value[len("!function ") :].strip().rpartition(".")
        return getattr(importlib.import_module(module), attr)
    if isinstance(value, dict):
        return {k: resolve_functions(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_functions(v) for v in value]
    return value


def build_override(config: dict[str, Any], *layers: dict[str, Any]) -> dict[str, Any]:
    """Merge override layers; dict-valued keys of `_MERGED_KEYS` are merged over the YAML's values."""
    out: dict[str, Any] = {}
    for layer in layers:
        out = deep_merge(out, layer)
    for key in _MERGED_KEYS:
        if key in out and isinstance(config.get(key), dict):
            out[key] = deep_merge(_plain(config[key]), out[key])
    return out


def _plain(value: Any) -> Any:
    """YAML values with simple-mode `!function` nodes dropped (they cannot be deep-copied usefully)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not hasattr(v, "tag")}
    return value


def gqa_process_docs(dataset: Any, source: str) -> Any:
    """GQA questions + their images from the `testdev_balanced_images` config of the same `source`.

    lmms-eval's own `gqa_process_docs` always loads the images from the hub id; this reads them
    from the local copy, without decoding them.
    """
    import datasets

    images = datasets.load_dataset(source, "testdev_balanced_images", split="testdev")
    images = images.cast_column("image", datasets.Image(decode=False))
    row = {image_id: n for n, image_id in enumerate(images["id"])}
    column = images["image"]
    return dataset.add_column("image", [column[row[i]] for i in dataset["imageId"]], feature=datasets.Image())
