"""vit_cls_attn / vit_keys under SDPA equal the reference definition computed from an eager forward."""

import torch
from conftest import random_images
from transformers import LlavaForConditionalGeneration

from tokenprune.models.llava import LlavaAdapter
from tokenprune.reducers.baselines import UniformSample
from tokenprune.types import VIT_CLS_ATTN, VIT_KEYS


class NeedsSignals(UniformSample):
    requires = (VIT_CLS_ATTN, VIT_KEYS)


def eager_reference(path, pixel_values):
    """Hooks on the last CLIP layer's q/k projections in an all-eager model; full 577x577 softmax."""
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    attn = model.model.vision_tower.encoder.layers[-1].self_attn
    captured = {}
    attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o))
    attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    q, k = captured["q"], captured["k"]  # [B, N+1, C]
    full = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)  # [B, N+1, N+1]
    return full[:, 0, 1:], k[:, 1:], out.hidden_states[-2][:, 1:]


def test_signals_match_eager_reference(tiny_llava_path):
    adapter = LlavaAdapter.from_pretrained(
        tiny_llava_path, reducer=NeedsSignals(keep=8), dtype="float32", device="cpu"
    )
    assert adapter.model.config.vision_config._attn_implementation == "sdpa"
    pixel_values = adapter.preprocess(random_images(3))
    with torch.no_grad():
        tokens = adapter.visual_tokens(pixel_values)
    want_attn, want_keys, want_features = eager_reference(tiny_llava_path, pixel_values)
    assert tokens.signals[VIT_CLS_ATTN].shape == (3, 576)
    torch.testing.assert_close(tokens.signals[VIT_CLS_ATTN], want_attn, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tokens.signals[VIT_KEYS], want_keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokens.features, want_features, rtol=1e-5, atol=1e-5)
    assert bool((tokens.signals[VIT_CLS_ATTN].sum(-1) < 1).all())  # CLS->CLS takes a share


def test_signals_only_when_required(tiny_llava):
    with torch.no_grad():
        tokens = tiny_llava.visual_tokens(tiny_llava.preprocess(random_images(1)))
    assert tokens.signals == {}
