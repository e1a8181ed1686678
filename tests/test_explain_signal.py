"""`llm_text_attn` under SDPA equals layer-0 attention of an all-eager model; the LLM-input reduction
path of the LLaVA adapter splices, numbers positions and generates consistently."""

import pytest
import torch
from conftest import random_images
from transformers import LlavaForConditionalGeneration, LogitsProcessorList

from tokenprune.models._views import block_rows
from tokenprune.models.llava import LlavaAdapter
from tokenprune.reducers.explain_mapper import ExplainMapper, ExplainOracle
from tokenprune.types import LLM_TEXT_ATTN


def image_blocks(inputs):
    """Per image (sample, first column, count) of a splice, and the text rows after each."""
    return [(b.sample, b.first, b.count) for b in inputs.blocks], block_rows(inputs)


QUESTIONS = ["What color is the circle?", "Is there a red square in the image? Answer yes or no."]


@pytest.fixture(scope="module")
def eager_model(tiny_llava_path):
    return LlavaForConditionalGeneration.from_pretrained(
        tiny_llava_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def adapter_with(path, reducer=None):
    return LlavaAdapter.from_pretrained(path, reducer=reducer, dtype="float32", device="cpu")


def eager_text_attention(model, inputs, blocks, rows):
    """Layer 0's attention probabilities (output_attentions) of the all-eager model, sliced and averaged."""
    with torch.no_grad():
        out = model(**inputs.as_kwargs(), output_attentions=True, use_cache=False)
    probs = out.attentions[0]  # [B, H, L, L]
    return torch.stack(
        [
            probs[b][:, rows[i]][:, :, first : first + n].mean(dim=(0, 1))
            for i, (b, first, n) in enumerate(blocks)
        ]
    )


def test_signal_equals_eager_attention(tiny_llava_path, eager_model):
    """Two samples of different lengths (left padding), the second with two images (rows after each)."""
    adapter = adapter_with(tiny_llava_path)
    assert adapter.model.config.text_config._attn_implementation == "sdpa"
    images = random_images(3)
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS, [[images[0]], [images[1], images[2]]])
        signal = torch.stack(adapter.text_attention(inputs))
    blocks, rows = image_blocks(inputs)
    assert [b for b, _, _ in blocks] == [0, 1, 1] and signal.shape == (3, 576)
    assert rows[1].sum() > rows[2].sum()  # the first image of sample 1 also has the second's "\n" after it
    want = eager_text_attention(eager_model, inputs, blocks, rows)
    torch.testing.assert_close(signal, want, rtol=1e-5, atol=1e-8)
    assert bool((signal.sum(-1) < 1).all())  # the softmax also covers the text keys


def test_signal_rows_stop_before_the_answer(tiny_llava_path, eager_model):
    """With a teacher-forced answer appended, the rows are the prompt's: the signal does not change."""
    adapter = adapter_with(tiny_llava_path)
    images = random_images(1)
    with torch.no_grad():
        prompt_only = torch.stack(adapter.text_attention(adapter.prepare(QUESTIONS[:1], [images])))
        with_answer = adapter.prepare(QUESTIONS[:1], [images], answers=["red"])
        signal = torch.stack(adapter.text_attention(with_answer))
    torch.testing.assert_close(signal, prompt_only, rtol=1e-5, atol=1e-9)
    blocks, rows = image_blocks(with_answer)
    assert not bool((rows & (with_answer.labels != -100)[blocks[0][0]]).any())
    want = eager_text_attention(eager_model, with_answer, blocks, rows)
    torch.testing.assert_close(signal, want, rtol=1e-5, atol=1e-8)


def test_signal_is_batch_invariant(tiny_llava_path):
    adapter = adapter_with(tiny_llava_path)
    images = random_images(2)
    with torch.no_grad():
        batched = torch.stack(adapter.text_attention(adapter.prepare(QUESTIONS, [[images[0]], [images[1]]])))
        alone = [
            torch.stack(adapter.text_attention(adapter.prepare([q], [[i]])))
            for q, i in zip(QUESTIONS, images)
        ]
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-5, atol=1e-9)


def test_reduced_splice_gathers_positions(tiny_llava_path):
    """Kept visual tokens and the text keep their unreduced positions; renumber gives 0..L-1."""
    mapper = ExplainMapper(ratio=0.25)
    adapter = adapter_with(tiny_llava_path, mapper)
    images = random_images(2)
    with torch.no_grad():
        full = adapter_with(tiny_llava_path).prepare(QUESTIONS, [[images[0]], [images[1]]])
        reduced = adapter.prepare(QUESTIONS, [[images[0]], [images[1]]])
        tokens = adapter.visual_tokens(adapter.preprocess(images))
        projected = adapter.model.model.multi_modal_projector(tokens.features)
        kept = mapper(
            type(tokens)(projected, tokens.grid, {LLM_TEXT_ATTN: torch.stack(adapter.text_attention(full))})
        )
    assert reduced.visual_tokens == [144, 144] and reduced.gathered_positions
    blocks, _ = image_blocks(full)
    for b, (_, first, _) in enumerate(blocks):
        valid = full.attention_mask[b].bool()
        offset = int((~valid).sum())
        keep = valid.clone()
        keep[first : first + 576] = False
        keep[first + kept.index[b]] = True
        want = full.position_ids[b][keep]  # the unreduced positions of what is kept, in order
        got = reduced.position_ids[b][reduced.attention_mask[b].bool()]
        assert torch.equal(got, want)
        assert torch.equal(reduced.input_ids[b][reduced.attention_mask[b].bool()], full.input_ids[b][keep])
        assert int(got[-1]) == int(valid.sum()) - 1 and offset >= 0  # the last token keeps its position
    mapper.positions = "renumber"
    with torch.no_grad():
        renumbered = adapter.prepare(QUESTIONS, [[images[0]], [images[1]]])
    mask = renumbered.attention_mask
    assert not renumbered.gathered_positions
    assert torch.equal(renumbered.position_ids, (mask.cumsum(-1) - 1).clamp(min=0))


def greedy_by_hand(adapter, inputs, steps, gathered=True):
    """Greedy decoding with full forwards and explicit positions continuing from the last one;
    returns the last-position logits of every step [B, steps, V]."""
    kwargs = inputs.as_kwargs()
    ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
    positions = kwargs["position_ids"] if gathered else (mask.cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = adapter.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                mm_encoder_outputs=kwargs["mm_encoder_outputs"],
                use_cache=False,
            ).logits[:, -1]
            out.append(logits)
            allowed = logits.clone()
            allowed[:, adapter.tokenizer.eos_token_id] = float("-inf")  # as min_new_tokens does
            token = allowed.argmax(-1, keepdim=True)  # [B, 1]
            ids = torch.cat([ids, token], 1)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            positions = torch.cat([positions, positions[:, -1:] + 1], 1)
    return torch.stack(out, 1)


class RecordScores:
    """A logits processor that keeps the scores generate() sees at every step."""

    def __init__(self) -> None:
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


def test_generate_with_gathered_positions_matches_full_forwards(tiny_llava_path):
    """generate() (KV cache) continues the gathered numbering: its scores equal full forwards'."""
    adapter = adapter_with(tiny_llava_path, ExplainMapper(ratio=0.5))
    images = random_images(2)
    with torch.no_grad():
        inputs = adapter.prepare(QUESTIONS, [[images[0]], [images[1]]])
    want = greedy_by_hand(adapter, inputs, 3)
    assert not torch.allclose(want, greedy_by_hand(adapter, inputs, 3, gathered=False), atol=1e-3)
    recorder = RecordScores()
    _, kept = adapter.generate(
        QUESTIONS,
        [[images[0]], [images[1]]],
        max_new_tokens=3,
        min_new_tokens=3,
        logits_processor=LogitsProcessorList([recorder]),
    )
    assert kept == [288, 288] and len(recorder.scores) == 3
    eos = adapter.tokenizer.eos_token_id
    for step, scores in enumerate(recorder.scores):
        scores = scores.clone()
        scores[:, eos] = want[:, step, eos]  # min_new_tokens masks EOS; the rest is the model's
        torch.testing.assert_close(scores, want[:, step], rtol=1e-4, atol=1e-4)


def test_keep_all_at_llm_input_equals_the_unreduced_model(tiny_llava_path):
    images = random_images(2)
    plain = adapter_with(tiny_llava_path)
    want = plain.generate(QUESTIONS, [[images[0]], [images[1]]], max_new_tokens=5)
    for reducer in (ExplainMapper(keep=576), ExplainOracle(keep=576)):
        got = adapter_with(tiny_llava_path, reducer).generate(
            QUESTIONS, [[images[0]], [images[1]]], max_new_tokens=5
        )
        assert got == want


def test_oracle_keeps_the_most_relevant_tokens(tiny_llava_path):
    oracle = ExplainOracle(ratio=0.25, answer_tokens=3)
    adapter = adapter_with(tiny_llava_path, oracle)
    images = random_images(1)
    with torch.no_grad():
        full = adapter_with(tiny_llava_path).prepare(QUESTIONS[:1], [images])
        answer = adapter.greedy_answer_ids(full, 3)
    eos = adapter.tokenizer.eos_token_id
    relevance = torch.stack(adapter.answer_relevance(full, [[t for t in answer[0] if t != eos]]))  # [1, 576]
    want = torch.sort(relevance[0], descending=True, stable=True).indices[:144].sort().values
    with torch.no_grad():
        reduced = adapter.prepare(QUESTIONS[:1], [images])
    kept = reduced.position_ids[0][reduced.input_ids[0] == adapter.image_token_id]
    first = int((full.input_ids[0] == adapter.image_token_id).nonzero()[0])
    assert torch.equal(kept - full.position_ids[0, first], want)
    with pytest.raises(ValueError, match="evaluation only"):
        adapter.prepare_conversations([[("USER: <image>\nhi ASSISTANT:", False)]], [images])
