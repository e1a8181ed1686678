"""The LLaVA adapter against plain Hugging Face: logits, greedy generation, batching, splice."""

import pytest
import torch
from conftest import random_images
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tokenprune.models.llava import LlavaAdapter
from tokenprune.reducers.baselines import NoReduction, UniformSample

QUESTIONS = [
    "Is there a red circle in the image?",
    "What color is the square?",
    "How many objects are there?",
    "Which shape is left of the triangle? Answer with one word.",
]


def hf_inputs(path, adapter, question, image):
    processor = AutoProcessor.from_pretrained(path)
    return processor(images=[image], text=[adapter.format_prompt(question, 1)], return_tensors="pt")


def test_no_reduction_logits_equal_plain_hf_forward(tiny_llava_path, tiny_llava):
    image = random_images(1)[0]
    reference = LlavaForConditionalGeneration.from_pretrained(tiny_llava_path, dtype=torch.float32)
    inputs = hf_inputs(tiny_llava_path, tiny_llava, QUESTIONS[0], image)
    ours = tiny_llava.prepare([QUESTIONS[0]], [[image]])
    assert torch.equal(ours.input_ids, inputs["input_ids"])
    with torch.no_grad():
        want = reference(**inputs).logits
        got = tiny_llava.model(**ours.as_kwargs()).logits
    torch.testing.assert_close(got, want)


def test_no_reduction_greedy_generate_equals_plain_hf(tiny_llava_path, tiny_llava):
    reference = LlavaForConditionalGeneration.from_pretrained(tiny_llava_path, dtype=torch.float32)
    for question, image in zip(QUESTIONS[:2], random_images(2)):
        inputs = hf_inputs(tiny_llava_path, tiny_llava, question, image)
        with torch.no_grad():
            want = reference.generate(**inputs, max_new_tokens=10, do_sample=False)[
                :, inputs["input_ids"].shape[1] :
            ]
        texts, kept = tiny_llava.generate([question], [[image]], max_new_tokens=10)
        assert texts == [tiny_llava.tokenizer.decode(want[0], skip_special_tokens=True).strip()]
        assert kept == [576]


@pytest.mark.parametrize("reducer", [NoReduction(), UniformSample(keep=64)], ids=["none", "uniform64"])
def test_batch_of_four_answers_like_four_singles(tiny_llava, reducer):
    tiny_llava.reducer = reducer
    images = random_images(4, seed=1)
    singles = [tiny_llava.generate([q], [[im]], max_new_tokens=12) for q, im in zip(QUESTIONS, images)]
    texts, kept = tiny_llava.generate(QUESTIONS, [[im] for im in images], max_new_tokens=12)
    assert texts == [s[0][0] for s in singles]
    assert (
        kept
        == [s[1][0] for s in singles]
        == [reducer(tiny_llava.visual_tokens(tiny_llava.preprocess(images[:1]))).lengths.item()] * 4
    )


def test_batch_with_different_token_counts(tiny_llava):
    """Two images, one, none: each sample has its own placeholder count and its own answer."""
    tiny_llava.reducer = UniformSample(keep=40)
    images = random_images(3, seed=2)
    samples = [[images[0], images[1]], [images[2]], []]
    questions = ["Compare the two images.", QUESTIONS[0], "Say something."]
    singles = [tiny_llava.generate([q], [s], max_new_tokens=8) for q, s in zip(questions, samples)]
    inputs = tiny_llava.prepare(questions, samples)
    image_id = tiny_llava.image_token_id
    assert (inputs.input_ids == image_id).sum(-1).tolist() == [80, 40, 0] == inputs.visual_tokens
    texts, kept = tiny_llava.generate(questions, samples, max_new_tokens=8)
    assert texts == [s[0][0] for s in singles] and kept == [80, 40, 0]


def test_reduced_tokens_are_the_projected_kept_patches(tiny_llava):
    """The spliced features are exactly projector(kept vision features), in the reducer's order."""
    tiny_llava.reducer = UniformSample(keep=16)
    pixel_values = tiny_llava.preprocess(random_images(2))
    with torch.no_grad():
        encoded = tiny_llava.encode_images(pixel_values)
        tokens = tiny_llava.visual_tokens(pixel_values)
        for i in range(2):
            want = tiny_llava.model.model.multi_modal_projector(tokens.features[i, encoded.index[i]])
            torch.testing.assert_close(encoded.features[i], want)


def test_prompt_image_count_mismatch_is_an_error(tiny_llava):
    with pytest.raises(ValueError, match="<image>"):
        tiny_llava.splice(["USER: <image>\n<image>\nhi ASSISTANT:"], [[4]], [torch.zeros(4, 64)])


def test_missing_checkpoint_says_what_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found.*huggingface-cli download"):
        LlavaAdapter.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        LlavaAdapter.from_pretrained(str(tmp_path / "empty"))
