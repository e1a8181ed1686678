"""vit_cls_attn / vit_keys under SDPA equal the reference definition computed from an eager forward."""

import numpy as np
import pytest
import torch
from conftest import random_images
from transformers import CLIPVisionConfig, LlavaForConditionalGeneration
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from tokenprune.models.llava import LlavaAdapter
from tokenprune.models.signals import clip_cls_attention
from tokenprune.reducers.baselines import UniformSample
from tokenprune.reducers.prumerge import PruMerge
from tokenprune.types import VIT_CLS_ATTN, VIT_KEYS, VisualTokens


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


def _reference_fp16_order(layer, hidden):
    """The authors' arithmetic at B = 1 in the tower's dtype: the hooked q_proj / k_proj outputs, the
    full [N+1, N+1] logits scaled by C^-0.5 and softmaxed in fp16, the IQR count on the float32 copy
    (numpy percentiles), then `topk(attention, m)` on the fp16 row."""
    normed = layer.layer_norm1(hidden)
    q, k = layer.self_attn.q_proj(normed), layer.self_attn.k_proj(normed)
    attention = ((q @ k.transpose(1, 2)) * k.shape[-1] ** -0.5).softmax(-1)[:, 0, 1:]  # [1, N] fp16
    values = attention.float().numpy().ravel()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    m = int((values > q3 + 1.5 * (q3 - q1)).sum())
    return torch.topk(attention, m, dim=1).indices[0].tolist()


def test_signal_dtype_model_reproduces_the_reference_fp16_order():
    """signal_dtype="model" keeps the reference's kept patches *and their order* (their RoPE positions)
    on an fp16 tower; the float32 signal keeps the same patches but orders some differently."""
    config = CLIPVisionConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4)
    torch.manual_seed(0)
    layer = CLIPEncoderLayer(config).half().eval()
    reordered = 0
    with torch.no_grad():
        for seed in range(12):
            g = torch.Generator().manual_seed(seed)
            hidden = torch.randn(1, 577, 256, generator=g)
            hidden[0, 0] *= 3
            strong = torch.randperm(576, generator=g)[:30] + 1  # patches that resemble CLS: outliers
            hidden[0, strong] += hidden[0, 0] * (0.5 + torch.rand(30, 1, generator=g))
            hidden = hidden.half()
            want = _reference_fp16_order(layer, hidden)
            kept = {}
            for dtype in ("model", "float32"):
                attention, keys = clip_cls_attention(layer, hidden, dtype)
                tokens = VisualTokens(hidden[:, 1:], (24, 24), {VIT_CLS_ATTN: attention, VIT_KEYS: keys})
                order, count = PruMerge().select(tokens)
                kept[dtype] = order[0, : int(count[0])].tolist()
            assert attention.dtype == torch.float32
            assert kept["model"] == want, f"seed {seed}: kept order differs from the reference"
            assert sorted(kept["float32"]) == sorted(want)
            reordered += kept["float32"] != want
    assert reordered > 0, "the float32 signal reorders some fp16 cases (2 of these 12 when written)"
    with pytest.raises(ValueError, match="signal_dtype"):
        clip_cls_attention(layer, hidden, "float16")
