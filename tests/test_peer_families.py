"""The feature-layer signals on the CLS-free families (VisionZip / VisPruner adaptation, docs/peers.md)
against the models' own eager attention: LLaVA-OneVision (SigLIP, `output_attentions=True`) and
Qwen2-VL / Qwen2.5-VL (the eager attention function, probabilities recorded per segment)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_images
from test_llava_ov import big_image
from test_llava_ov import load as load_ov
from test_qwen2vl import eager_probe
from test_qwen2vl import load as load_qwen
from transformers import (
    AttentionInterface,
    AutoModelForImageTextToText,
    LlavaOnevisionForConditionalGeneration,
)
from transformers.vision_utils import get_vision_window_index

from tokenprune.reducers.visionzip import VisionZip
from tokenprune.reducers.vispruner import VisPruner
from tokenprune.types import VIT_CLS_ATTN_HEADS, VIT_CLS_FEATURE, VIT_FEAT_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


@pytest.fixture(scope="module")
def ov_path(tmp_path_factory):
    from tokenprune.models.tiny import build_tiny_llava_ov

    return str(build_tiny_llava_ov(tmp_path_factory.mktemp("ov") / "tiny_llava_ov"))


@pytest.fixture(scope="module", params=["tiny_qwen2vl", "tiny_qwen25vl"])
def qwen_path(request, tmp_path_factory):
    from tokenprune.models.tiny import BUILDERS

    return str(BUILDERS[request.param](tmp_path_factory.mktemp("qwen") / request.param))


def test_onevision_feature_layer_signals_match_eager(ov_path):
    """Per head, the mean attention each patch receives in the feature layer; its keys; no CLS row."""
    adapter = load_ov(ov_path, VisionZip(dominant=4, contextual=2))
    crops = adapter.preprocess([[big_image()]])
    with torch.no_grad():
        tower = adapter.tower(crops.pixel_values)
        views = adapter.image_views(crops, tower, None)
    reference = LlavaOnevisionForConditionalGeneration.from_pretrained(
        ov_path, dtype=torch.float32, attn_implementation={"vision_config": "eager", "text_config": "sdpa"}
    )
    layer = reference.config.vision_feature_layer
    captured = {}
    reference.model.vision_tower.encoder.layers[layer].self_attn.k_proj.register_forward_hook(
        lambda m, i, o: captured.__setitem__("k", o)
    )
    with torch.no_grad():
        out = reference.model.vision_tower(crops.pixel_values, output_attentions=True)
    probs = out.attentions[layer]  # [B, H, N, N]
    torch.testing.assert_close(tower[VIT_CLS_ATTN_HEADS], probs.mean(2).transpose(1, 2))  # [B, N, H]
    torch.testing.assert_close(tower[VIT_FEAT_KEYS], captured["k"])
    for view in views[0]:
        heads = view.signals[VIT_CLS_ATTN_HEADS]  # [H, n]
        assert heads.shape == (probs.shape[1], view.features.shape[0])
        torch.testing.assert_close(heads.sum(-1), torch.ones(heads.shape[0]))
        assert view.signals[VIT_CLS_FEATURE].numel() == 0
    torch.testing.assert_close(views[0][0].signals[VIT_CLS_ATTN_HEADS].T, probs[0].mean(1).T)  # base view


def test_qwen_feature_layer_signals_match_eager(qwen_path):
    """The last block feeds the merger: per head, the attention each patch receives within its segment,
    summed per 2x2 group, a distribution per frame group; keys heads-major over the group's 4 patches."""
    AttentionInterface.register("tp_eager_probe", eager_probe)
    adapter = load_qwen(qwen_path, VisPruner(keep=4))
    pixel_values, grid = adapter.preprocess(random_images(3))
    with torch.no_grad():
        views = adapter.views(adapter.tower(pixel_values, grid), grid)
    reference = AutoModelForImageTextToText.from_pretrained(
        qwen_path,
        dtype=torch.float32,
        attn_implementation={"vision_config": "tp_eager_probe", "text_config": "sdpa"},
    )
    block = reference.model.visual.blocks[-1]
    captured = {}
    block.attn.qkv.register_forward_hook(lambda m, i, o: captured.__setitem__("qkv", o))
    with torch.no_grad():
        reference.model.visual(pixel_values, grid_thw=grid)
    received = torch.cat([p[0].sum(1) for p in block.attn.tp_probs], dim=1).T  # [L, H] block order
    heads = received.shape[1]
    c = block.attn.qkv.in_features
    keys = captured["qkv"][:, c : 2 * c]  # [L, C]
    if adapter.windowed:
        vision = reference.config.vision_config
        window, _ = get_vision_window_index(grid, 2, vision.window_size, vision.patch_size)
        order = torch.argsort(window)
    else:
        order = torch.arange(received.shape[0] // 4)
    received = received.view(-1, 4, heads).sum(1)[order]  # [U, H]
    keys = keys.view(-1, 4, heads, c // heads).transpose(1, 2).reshape(-1, 4 * c)[order]  # [U, H*4d]
    start = 0
    for view, (_, h, w) in zip(views, grid.tolist()):
        n = h * w // 4
        torch.testing.assert_close(
            view.signals[VIT_CLS_ATTN_HEADS], (received[start : start + n] / (h * w)).T
        )
        torch.testing.assert_close(view.signals[VIT_FEAT_KEYS], keys[start : start + n])
        torch.testing.assert_close(view.signals[VIT_CLS_ATTN_HEADS].sum(-1), torch.ones(heads))
        start += n
