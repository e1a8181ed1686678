"""The one adapter contract: every family satisfies the `Adapter` protocol and declares its
capabilities; callers use only the protocol (no probing, no family names outside models/), and a
missing capability is a clear, immediate error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import random_images

from tokenprune.config import PROJECT_ROOT, compose
from tokenprune.models.base import REDUCTION_POINTS, Adapter, AdapterCore
from tokenprune.models.llava import LlavaAdapter
from tokenprune.models.llava_ov import LlavaOnevisionAdapter
from tokenprune.models.qwen2vl import Qwen2VLAdapter
from tokenprune.types import Video

FAMILIES = {
    "tiny_llava": LlavaAdapter,
    "tiny_qwen2vl": Qwen2VLAdapter,
    "tiny_llava_ov": LlavaOnevisionAdapter,
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from tokenprune.models.tiny import BUILDERS

    root = tmp_path_factory.mktemp("contract")
    return {
        name: cls.from_pretrained(str(BUILDERS[name](root / name)), dtype="float32", device="cpu")
        for name, cls in FAMILIES.items()
    }


def test_every_family_implements_the_protocol(adapters):
    families = set()
    for adapter in adapters.values():
        assert isinstance(adapter, Adapter) and isinstance(adapter, AdapterCore)
        capabilities = adapter.capabilities
        families.add(capabilities.family)
        assert set(capabilities.reduction_points) == set(REDUCTION_POINTS)
        assert adapter.projector() is not None and adapter.device == torch.device("cpu")
        # the same call signature everywhere: images positional, videos and answers keyword-only
        inputs = adapter.prepare(["What color?"], [random_images(1)], videos=None, answers=["red"])
        assert inputs.labels is not None and len(inputs.blocks) == 1
        assert inputs.labels[0][inputs.labels[0] != -100].tolist() == adapter.answer_ids("red")
        assert [v.numel() for v in adapter.text_attention(adapter.prepare(["Hi"], [random_images(1)]))] == [
            inputs.blocks[0].count
            if capabilities.family != "llava_onevision"
            else inputs.blocks[0].columns.numel()
        ]
    assert families == {"llava", "qwen2_vl", "llava_onevision"}


def test_missing_capabilities_are_clear_errors(adapters, tmp_path):
    llava = adapters["tiny_llava"]
    frames = [random_images(1)[0]] * 2
    with pytest.raises(ValueError, match="llava adapter takes no videos"):
        llava.generate(["Hi"], [[]], videos=[[Video(frames)]], max_new_tokens=2)
    with pytest.raises(ValueError, match="llava_onevision adapter does not support visualize"):
        adapters["tiny_llava_ov"].visual_view(random_images(1)[0])
    with pytest.raises(ValueError, match="qwen2_vl adapter does not support visualize"):
        adapters["tiny_qwen2vl"].visual_view(random_images(1)[0])
    from tokenprune.visualize import run

    image = tmp_path / "in.png"
    random_images(1)[0].save(image)
    cfg = compose(
        [f"image={image}", f"paths.outputs={tmp_path}", "model=tiny_qwen2vl", f"paths.models={tmp_path}"],
        config_name="visualize",
    )
    with pytest.raises(ValueError, match="qwen2_vl adapter has none yet"):
        run(cfg)


def test_callers_never_probe_adapters():
    """Outside tokenprune/models/, no getattr/hasattr on an adapter, no signature inspection, no
    family-name comparisons (the protocol and its capabilities say everything)."""
    probing = re.compile(
        r"(getattr|hasattr)\(\s*(self\.)?adapter\b|inspect\.signature\(|\.family\s*[=!]=|"
        r"multi_modal_projector|adapter\.grid\b"
    )
    offenders = []
    # the preflight binds each config node to its target's signature: the signature is the config's
    # schema (DESIGN §5), not a probe of a live adapter
    schema_binding = {Path("tokenprune/eval/preflight.py")}
    for path in (PROJECT_ROOT / "tokenprune").rglob("*.py"):
        relative = path.relative_to(PROJECT_ROOT)
        if Path("tokenprune/models") in relative.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if relative in schema_binding and "inspect.signature(" in line:
                continue
            if probing.search(line):
                offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{number}: {line.strip()}")
    assert offenders == []
