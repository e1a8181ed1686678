"""Shared loading helpers for adapters: dtype/device resolution and clear errors for bad paths."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_checkpoint(path: str, build: str | None) -> str:
    """A local checkpoint folder, a tiny model built on first use, or a hub id for the user's HF cache.

    Raises a FileNotFoundError naming the path and how to get the checkpoint when nothing is there.
    """
    if build is not None:
        from tokenprune.models.tiny import ensure_built

        return str(ensure_built(build, path))
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise FileNotFoundError(
                f"{local} exists but holds no config.json: not a Hugging Face checkpoint folder"
            )
        return str(local)
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise FileNotFoundError(
            f"model checkpoint {path!r} not found. Give model.path=<local checkpoint folder> or a hub id "
            "such as llava-hf/llava-1.5-7b-hf that is in your HF cache "
            "(fetch it once with `huggingface-cli download llava-hf/llava-1.5-7b-hf`)."
        )
    return path  # a hub id: from_pretrained reads the user's cache (or downloads when online)


def hub_error(path: str, error: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"could not load {path!r} from a local folder or the HF cache ({type(error).__name__}: {error}). "
        f"Download it once on a machine with network access: `huggingface-cli download {path}` "
        "(or set model.path to a local checkpoint folder)."
    )
