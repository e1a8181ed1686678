"""Shared fixtures: offline environment, the tiny LLaVA checkpoint, composed configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np
import pytest
import torch
from PIL import Image

from tokenprune.config import PROJECT_ROOT

SHIPPED_MINI = PROJECT_ROOT / "models" / "mini_shapes"  # the shipped miniature (make mini-model)
needs_shipped_mini = pytest.mark.skipif(
    not (SHIPPED_MINI / "config.json").exists(),
    reason="models/mini_shapes is not built yet: run `make mini-model`",
)

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one thread per xdist worker: `make test` runs 2 workers on 2 cores


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: without it they are skipped, with the reason (pyproject.toml's markers),
    unless TOKENPRUNE_GPU_TEST_DEVICE names a device to run them on (`scripts/gpu_check.py --dry-run`
    runs them on the CPU)."""
    if torch.cuda.is_available() or os.environ.get("TOKENPRUNE_GPU_TEST_DEVICE"):
        return
    skip = pytest.mark.skip(reason="gpu: needs CUDA, and this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def one_thread():
    """Tiny models: one intra-op thread avoids oversubscription under pytest-xdist (same results)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llava_path(tmp_path_factory) -> str:
    """A tiny random LLaVA saved with save_pretrained (built once per test session)."""
    from tokenprune.models.tiny import build_tiny_llava

    return str(build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny_llava"))


@pytest.fixture()
def tiny_llava(tiny_llava_path):
    """The LLaVA adapter over the tiny checkpoint in float32 on CPU, no reducer."""
    from tokenprune.models.llava import LlavaAdapter

    return LlavaAdapter.from_pretrained(tiny_llava_path, dtype="float32", device="cpu")


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Different sizes and aspect ratios, so the processor's resize and crop matter."""
    rng = np.random.default_rng(seed)
    sizes = [(80, 70), (96, 96), (64, 120), (100, 90), (72, 72), (90, 64)]
    return [
        Image.fromarray((rng.random((*sizes[i % len(sizes)], 3)) * 255).astype("uint8")) for i in range(n)
    ]


def reducer_options(in_llm: bool = False) -> list[str]:
    """The configs/reducer options that run before the LLM (vision / llm / LLM input), or, with
    `in_llm`, those that run inside it (`space="llm_layer"`, tested in test_layered.py)."""
    from hydra.utils import get_class

    from tokenprune.config import compose, group_options

    names = group_options("reducer")
    inside = {n for n in names if get_class(compose([f"reducer={n}"]).reducer._target_).space == "llm_layer"}
    return sorted(inside) if in_llm else [n for n in names if n not in inside]
