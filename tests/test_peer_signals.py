"""VisionZip's / VisPruner's feature-layer signals under SDPA equal an eager `output_attentions=True` forward."""

import pytest
import torch
from conftest import random_images
from transformers import LlavaForConditionalGeneration

from tokenprune.models.llava import LlavaAdapter
from tokenprune.reducers.baselines import UniformSample
from tokenprune.types import FEATURE_LAYER_SIGNALS, VIT_CLS_ATTN_HEADS, VIT_CLS_FEATURE, VIT_FEAT_KEYS


class NeedsFeatureLayer(UniformSample):
    requires = FEATURE_LAYER_SIGNALS


class NeedsHeads(UniformSample):
    requires = (VIT_CLS_ATTN_HEADS,)


def eager_reference(path, pixel_values):
    """The model's own eager attention maps and hidden states; keys from a hook on the layer's k_proj."""
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    layer_index = model.config.vision_feature_layer  # -2: the layer whose output LLaVA projects
    layers = model.model.vision_tower.encoder.layers
    captured = {}
    layers[layer_index].self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)
    attention = out.attentions[layer_index]  # [B, H, N+1, N+1] layer L's softmax
    hidden = out.hidden_states[layer_index]  # [B, N+1, C] layer L's output
    return attention[:, :, 0, 1:], captured["k"][:, 1:], hidden[:, 0], hidden[:, 1:]


def test_feature_layer_signals_match_eager_attentions(tiny_llava_path):
    adapter = LlavaAdapter.from_pretrained(
        tiny_llava_path, reducer=NeedsFeatureLayer(keep=8), dtype="float32", device="cpu"
    )
    assert adapter.model.config.vision_config._attn_implementation == "sdpa"
    pixel_values = adapter.preprocess(random_images(3))
    with torch.no_grad():
        tokens = adapter.visual_tokens(pixel_values)
    heads, keys, cls, features = eager_reference(tiny_llava_path, pixel_values)
    assert tokens.signals[VIT_CLS_ATTN_HEADS].shape == (3, 4, 576)
    torch.testing.assert_close(tokens.signals[VIT_CLS_ATTN_HEADS], heads, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tokens.signals[VIT_FEAT_KEYS], keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokens.signals[VIT_CLS_FEATURE], cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens.features, features, rtol=1e-5, atol=1e-5)
    # the CLS column is inside the softmax: the patch columns sum to less than 1 per head
    assert bool((tokens.signals[VIT_CLS_ATTN_HEADS].sum(-1) < 1).all())


def test_only_requested_signals(tiny_llava_path):
    adapter = LlavaAdapter.from_pretrained(
        tiny_llava_path, reducer=NeedsHeads(keep=8), dtype="float32", device="cpu"
    )
    with torch.no_grad():
        tokens = adapter.visual_tokens(adapter.preprocess(random_images(1)))
    assert set(tokens.signals) == {VIT_CLS_ATTN_HEADS}


@pytest.mark.parametrize("reducer", ["visionzip", "vispruner", "divprune", "downsample"])
def test_reduces_inside_llava_encode(tiny_llava_path, reducer):
    from hydra.utils import instantiate

    from tokenprune.config import compose

    overrides = {
        "visionzip": ["reducer.dominant=20", "reducer.contextual=4"],
        "downsample": ["reducer.keep=16"],
    }
    cfg = compose([f"reducer={reducer}", *overrides.get(reducer, [])])
    adapter = LlavaAdapter.from_pretrained(
        tiny_llava_path, reducer=instantiate(cfg.reducer), dtype="float32", device="cpu"
    )
    pixel_values = adapter.preprocess(random_images(2))
    with torch.no_grad():
        encoded = adapter.encode_images(pixel_values)
    expected = {"visionzip": 24, "vispruner": 64, "divprune": 56, "downsample": 16}[reducer]
    assert [f.shape[0] for f in encoded.features] == [expected, expected]
