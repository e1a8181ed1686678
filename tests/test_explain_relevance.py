"""GAE relevance (hooks + single-row recursion, SDPA model) equals a brute-force autograd implementation
with full N×N relevance matrices on an all-eager model."""

import pytest
import torch
from conftest import random_images
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from tokenprune.models._views import block_rows
from tokenprune.models.gae import GAE_ATTENTION
from tokenprune.models.llava import LlavaAdapter


def image_blocks(inputs):
    """Per image (sample, first column, count) of a splice, and the text rows after each."""
    return [(b.sample, b.first, b.count) for b in inputs.blocks], block_rows(inputs)


QUESTIONS = ["What color is the circle?", "How many objects are there?"]


@pytest.fixture(scope="module")
def deep_path(tiny_llava_path, tmp_path_factory):
    """tiny_llava with 3 LLM layers (the recursion's order matters), saved and loaded like any checkpoint."""
    config = LlavaConfig.from_pretrained(tiny_llava_path)
    config.text_config.num_hidden_layers = 3
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("models") / "tiny_llava_3"
    model.save_pretrained(path)
    AutoProcessor.from_pretrained(tiny_llava_path).save_pretrained(path)
    return str(path)


def brute_force(model, ids, features, image_token_id, answer, target):
    """Per answer token: backward of its score, Ā^l = mean_h clamp(A ⊙ ∇A, 0) as full S×S matrices,
    R = I, R ← R + Ā^l R for l = 0 … L-1, row of the predicting position; mean over the answer."""
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == image_token_id)[..., None], features).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, output_attentions=True, use_cache=False)
    attentions = out.attentions
    for a in attentions:
        a.retain_grad()
    length = ids.shape[1]
    prompt = length - len(answer)
    total = torch.zeros(length, dtype=torch.float64)
    for t, token in enumerate(answer):
        p = prompt - 1 + t
        for a in attentions:
            a.grad = None
        score = out.logits[0, p, token]
        if target == "logprob":
            score = torch.log_softmax(out.logits[0, p], -1)[token]
        score.backward(retain_graph=True)
        relevance = torch.eye(length, dtype=torch.float64)
        for a in attentions:
            weighted = (a[0].detach().double() * a.grad[0].double()).clamp(min=0).mean(0)  # [S, S]
            relevance = relevance + weighted @ relevance
        total += relevance[p]
    return (total / len(answer)).float()


@pytest.mark.parametrize("target", ["logit", "logprob"])
def test_relevance_equals_brute_force(deep_path, target):
    adapter = LlavaAdapter.from_pretrained(deep_path, dtype="float32", device="cpu")
    eager = LlavaForConditionalGeneration.from_pretrained(
        deep_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    images = random_images(2)
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS, [[images[0]], [images[1]]])  # left-padded batch of 2
        answers = adapter.greedy_answer_ids(inputs, 3)
    answers = [[t for t in a if t != adapter.tokenizer.eos_token_id] or [7] for a in answers]
    got = torch.stack(adapter.answer_relevance(inputs, answers, target=target))  # [2, 576]
    blocks, _ = image_blocks(inputs)
    features = inputs.mm_encoder_outputs["image"].pooler_output
    for b, answer in enumerate(answers):
        valid = inputs.attention_mask[b].bool()
        ids = torch.cat([inputs.input_ids[b, valid], torch.tensor(answer)])[None]
        want = brute_force(eager, ids, features[b], adapter.image_token_id, answer, target)
        first = blocks[b][1] - int((~valid).sum())
        scale = float(want[first : first + 576].abs().max())
        assert scale > 0
        torch.testing.assert_close(got[b], want[first : first + 576], rtol=1e-4, atol=1e-6 * scale)


def test_relevance_leaves_the_model_as_it_was(tiny_llava_path):
    adapter = LlavaAdapter.from_pretrained(tiny_llava_path, dtype="float32", device="cpu")
    language = adapter.model.model.language_model
    language.layers[0].mlp.up_proj.weight.requires_grad_(True)  # a trainable weight stays trainable
    images = random_images(1)
    with torch.no_grad():
        before = adapter.generate(QUESTIONS[:1], [images], max_new_tokens=4)
        inputs = adapter.prepare(QUESTIONS[:1], [images])
    relevance = torch.stack(adapter.answer_relevance(inputs, [[5, 6]]))
    assert relevance.shape == (1, 576) and bool(torch.isfinite(relevance).all())
    assert language.config._attn_implementation == "sdpa" != GAE_ATTENTION
    assert adapter.model.config.vision_config._attn_implementation == "sdpa"
    assert (
        language.layers[0].mlp.up_proj.weight.requires_grad
        and language.layers[0].mlp.up_proj.weight.grad is None
    )
    assert adapter.generate(QUESTIONS[:1], [images], max_new_tokens=4) == before
