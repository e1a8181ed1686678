"""Training on Qwen2-VL and LLaVA-OneVision with a reducer in the loop (LLaVA: test_train_lora.py):
conversation labels, per-sample loss parity (batch == each sample alone == HF's own loss), gradients
reach the projector / merger, the loss with a reducer inside the LLM, a LoRA fit through the stage."""

from __future__ import annotations

import pytest
import torch
from conftest import random_images
from hydra.utils import instantiate

from tokenprune.config import compose
from tokenprune.data.instruct import render
from tokenprune.models.llava_ov import LlavaOnevisionAdapter
from tokenprune.models.qwen2vl import Qwen2VLAdapter
from tokenprune.reducers.baselines import UniformSample
from tokenprune.reducers.keep_by_signal import KeepBySignal
from tokenprune.templates import ONEVISION_CHATML, QWEN_CHATML
from tokenprune.train.pipeline import stage_dir

FAMILIES = {
    "tiny_qwen2vl": (Qwen2VLAdapter, QWEN_CHATML),
    "tiny_llava_ov": (LlavaOnevisionAdapter, ONEVISION_CHATML),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tokenprune.models.tiny import BUILDERS

    root = tmp_path_factory.mktemp("train_families")
    return {name: str(BUILDERS[name](root / name)) for name in FAMILIES}


@pytest.fixture(scope="module")
def qwen_path(built):
    return built["tiny_qwen2vl"]


def load(built, name, reducer):
    return FAMILIES[name][0].from_pretrained(built[name], reducer=reducer, dtype="float32", device="cpu")


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each sample's labelled positions [B]."""
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        shifted.transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    return (losses * (targets != -100)).sum(-1) / (targets != -100).sum(-1)


def conversations(template=QWEN_CHATML):
    turns = [
        [("<image>\nWhat color is the square?", "red"), ("And the circle?", "blue")],
        [("Are they the same shape?", "no, one is a square")],
        [("Say yes.", "yes")],
    ]
    images = random_images(3, seed=4)
    samples = [[images[0]], [images[1], images[2]], []]
    return [render(t, len(s), template) for t, s in zip(turns, samples)], samples


@pytest.mark.parametrize("name", FAMILIES)
def test_conversation_labels_and_per_sample_loss_parity(built, name):
    adapter = load(built, name, UniformSample(keep=6))
    rendered, samples = conversations(FAMILIES[name][1])
    inputs = adapter.prepare_conversations(rendered, samples)
    # Qwen: 6 per image; OneVision: 6 per reduced view, then its newline (an anyres image: 2 views)
    assert inputs.visual_tokens == ([6, 12, 0] if name == "tiny_qwen2vl" else [6 + 7, 7 + 7, 0])
    for b, segments in enumerate(rendered):
        trained = [
            t for i, (text, on) in enumerate(segments) if on for t in adapter.tokenizer(text)["input_ids"]
        ]
        assert inputs.labels[b][inputs.labels[b] != -100].tolist() == trained
    with torch.no_grad():
        batched = per_sample_loss(adapter.model(**inputs.as_kwargs()).logits, inputs.labels)
        singles = []
        for segments, images in zip(rendered, samples):
            one = adapter.prepare_conversations([segments], [images])
            out = adapter.model(**one.as_kwargs())
            singles.append(per_sample_loss(out.logits, one.labels))
            torch.testing.assert_close(out.loss, singles[-1][0])  # HF's own loss agrees
            torch.testing.assert_close(adapter.loss(one), out.loss)
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-5, atol=1e-5)
    adapter.loss(adapter.prepare_conversations(rendered[:1], samples[:1])).backward()
    grads = [p.grad for p in adapter.projector().parameters()]  # through the reduced tokens
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_inside_the_llm_matches_per_sample(built, name):
    """A reducer inside the LLM in the loss: batch == each sample alone (mixed kept counts)."""
    adapter = load(built, name, KeepBySignal(layers=1, keep=0.5))
    rendered, samples = conversations(FAMILIES[name][1])
    with torch.no_grad():
        out = adapter.layers.forward(
            adapter.reducer, adapter.prepare_conversations(rendered[:2], samples[:2])
        )
        inputs = adapter.prepare_conversations(rendered[:2], samples[:2])
        labels = torch.where(out.source >= 0, inputs.labels.gather(1, out.source.clamp(min=0)), -100)
        batched = per_sample_loss(out.logits, labels)
        for b in range(2):
            single = adapter.loss(adapter.prepare_conversations([rendered[b]], [samples[b]]))
            torch.testing.assert_close(batched[b], single, rtol=1e-5, atol=1e-5)
    assert out.layer_tokens[0] != out.layer_tokens[1]


@pytest.mark.slow
@pytest.mark.integration
def test_lora_fit_on_qwen2vl_with_a_reducer(qwen_path, tmp_path):
    cfg = compose(
        [
            "model=tiny_qwen2vl",
            f"model.path={qwen_path}",
            "reducer=uniform",
            "reducer.keep=4",
            "train=lora",
            "train.data.template=qwen_chatml",
            "train.trainer.max_steps=2",
            "train.trainer.enable_progress_bar=false",
            "train.trainer.accelerator=cpu",
            f"paths.outputs={tmp_path}",
        ],
        "train",
    )
    stage = instantiate(cfg.train)
    before = instantiate(cfg.model).projector().mlp[0].weight.clone()

    def build(dtype):
        return instantiate(cfg.model, reducer=instantiate(cfg.reducer), **({"dtype": dtype} if dtype else {}))

    result = stage.fit(build, stage_dir(cfg), seed=cfg.seed)
    assert result.finished and result.metrics["train/steps"] == 2
    assert 0 < result.metrics["train/visual_tokens_mean"] <= 8  # 4 per image, at most 2 images
    adapter = stage.load_trained(instantiate(cfg.model), result.adapter_dir)
    assert not torch.equal(adapter.projector().mlp[0].weight, before)
