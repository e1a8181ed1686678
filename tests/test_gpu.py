"""Numerics on the accelerator (marker `gpu`; `pytest -m gpu`, and section `parity` of scripts/gpu_check.py).

The same references as the CPU suite, on the device: each tiny family's unreduced logits against plain
Hugging Face in fp32 / fp16 / bf16, the signals computed under SDPA against an eager forward, batch 1 ==
batch N for every reducer config (indices exact in fp32), and the same logits under FlashAttention-2
where it is importable. Without CUDA these skip, unless TOKENPRUNE_GPU_TEST_DEVICE names a device:
`gpu_check.py --dry-run` sets `cpu`, so `make test` runs every one of them once on the CPU.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import random_images
from transformers import AutoModelForImageTextToText

from tokenprune.config import group_options

DEVICE = os.environ.get("TOKENPRUNE_GPU_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE is None, reason="needs CUDA (or TOKENPRUNE_GPU_TEST_DEVICE, see the docstring)"
    ),
]
FAMILIES = ["tiny_llava", "tiny_qwen2vl", "tiny_llava_ov"]
# Ours and plain HF run the same kernels in the same dtype; what differs is the order of a few
# reductions (the splice, SDPA with or without a mask), so the bounds are a few ulps of each dtype.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}
QUESTION = "What color is the square?"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tokenprune.models.tiny import BUILDERS

    root = tmp_path_factory.mktemp("gpu")
    return {name: str(BUILDERS[name](root / name)) for name in FAMILIES}


def adapter_and_reference(name: str, path: str, dtype: str, attn: str = "sdpa", reducer=None):
    """Our adapter and the plain HF model, both on DEVICE in `dtype`, and the plain HF inputs."""
    from tokenprune.models.llava import LlavaAdapter
    from tokenprune.models.llava_ov import LlavaOnevisionAdapter
    from tokenprune.models.qwen2vl import Qwen2VLAdapter

    kwargs = {"reducer": reducer, "dtype": dtype, "device": DEVICE, "attn_implementation": attn}
    image = random_images(1, seed=5)[0]
    if name == "tiny_llava":
        from test_llava_adapter import hf_inputs

        adapter = LlavaAdapter.from_pretrained(path, **kwargs)
        inputs = dict(hf_inputs(path, adapter, QUESTION, image))
    elif name == "tiny_qwen2vl":
        from test_qwen2vl import hf_inputs

        adapter = Qwen2VLAdapter.from_pretrained(path, video_max_pixels=1600, **kwargs)
        inputs = hf_inputs(adapter, QUESTION, [image])
    else:
        from test_llava_ov import hf_inputs

        adapter = LlavaOnevisionAdapter.from_pretrained(path, **kwargs)
        inputs = hf_inputs(adapter, QUESTION, [image])
    reference = AutoModelForImageTextToText.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=attn
    ).to(DEVICE)
    inputs = {
        k: v.to(DEVICE, getattr(torch, dtype) if v.is_floating_point() else v.dtype)
        for k, v in inputs.items()
    }
    return adapter, reference.eval(), inputs, image


def assert_logits_match(name: str, adapter, reference, inputs, image, dtype: str) -> None:
    ours = adapter.prepare([QUESTION], [[image]])
    assert torch.equal(ours.input_ids.cpu(), inputs["input_ids"].cpu())
    with torch.no_grad():
        want = reference(**inputs).logits.float()
        got = adapter.logits(ours).float()
    bound = TOLERANCE[dtype] * max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=TOLERANCE[dtype], atol=bound)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("name", FAMILIES)
def test_unreduced_logits_equal_plain_hf(built, name, dtype):
    assert_logits_match(name, *adapter_and_reference(name, built[name], dtype), dtype)


@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None or DEVICE is None or not DEVICE.startswith("cuda"),
    reason="FlashAttention-2 is not importable here (CUDA + flash-attn)",
)
@pytest.mark.parametrize("name", FAMILIES)
def test_unreduced_logits_equal_plain_hf_under_flash_attention(built, name):
    assert_logits_match(
        name, *adapter_and_reference(name, built[name], "float16", "flash_attention_2"), "float16"
    )


def test_vision_signals_equal_eager(built):
    """vit_cls_attn / vit_keys under SDPA on the device == the eager reference (test_signals)."""
    from test_signals import NeedsSignals, eager_reference

    from tokenprune.models.llava import LlavaAdapter
    from tokenprune.types import VIT_CLS_ATTN, VIT_KEYS

    path = built["tiny_llava"]
    adapter = LlavaAdapter.from_pretrained(path, reducer=NeedsSignals(keep=8), dtype="float32", device=DEVICE)
    pixel_values = adapter.preprocess(random_images(3))
    with torch.no_grad():
        tokens = adapter.visual_tokens(pixel_values.to(DEVICE))
    want_attn, want_keys, want_features = eager_reference(path, pixel_values)
    torch.testing.assert_close(tokens.signals[VIT_CLS_ATTN].cpu(), want_attn, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tokens.signals[VIT_KEYS].cpu(), want_keys, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tokens.features.cpu(), want_features, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_llm_layer_signals_equal_eager(built, name):
    """The in-LLM signals under SDPA on the device == the eager model's attentions (test_layered)."""
    from test_layered import QUESTIONS, Recorder, deepen, load, media, visual_columns

    from tokenprune.types import LLM_LAYER_LAST_ATTN

    recorder = Recorder([2])
    adapter = load(built[name], name, recorder)
    adapter.model.to(DEVICE)
    images, extra = media(name)
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS, images, **extra)
        adapter.logits(inputs)
    eager = AutoModelForImageTextToText.from_pretrained(
        built[name], dtype=torch.float32, attn_implementation="eager"
    )
    eager = deepen(eager).to(DEVICE).eval()
    with torch.no_grad():
        attentions = eager(**inputs.as_kwargs(), output_attentions=True, use_cache=False).attentions
    tokens = recorder.seen[0]
    for b in range(2):
        cols = visual_columns(adapter, inputs, b)
        want = attentions[1][b][:, -1, cols].mean(0)
        torch.testing.assert_close(
            tokens.signals[LLM_LAYER_LAST_ATTN][b, : cols.numel()], want, rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("name", group_options("reducer"))
def test_batch_equals_each_sample_alone(name):
    """Every reducer config on the device: batch of 4 == each sample alone (indices exact, fp32)."""
    from test_reducer_contract import BATCH_COUPLED, build, sample, tokens, valid

    from tokenprune.types import VisualTokens

    if name in BATCH_COUPLED:
        pytest.skip("a documented batch-coupled mode (the reference's batch IQR): batch != alone by design")
    reducer = build(name)
    if reducer.space == "llm_layer":
        pytest.skip("runs inside the LLM: checked on the device by test_llm_layer_signals_equal_eager")
    t = tokens(4, (24, 24), seed=3)
    t = VisualTokens(t.features.to(DEVICE), t.grid, {k: v.to(DEVICE) for k, v in t.signals.items()})
    with torch.no_grad():
        together = reducer(t)
        for i in range(4):
            alone = reducer(sample(t, i))
            got, want = valid(together, i), valid(alone, 0)
            assert torch.equal(got[1], want[1]), f"sample {i}: kept indices differ"
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
