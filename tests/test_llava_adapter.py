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


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each sample's labelled positions [B]."""
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        shifted.transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    return (losses * (targets != -100)).sum(-1) / (targets != -100).sum(-1)


def test_labels_cover_only_answers_and_batch_losses_match_singles(tiny_llava):
    """Teacher-forced forward with different visual counts per sample: per-sample losses as alone."""
    tiny_llava.reducer = UniformSample(keep=30)
    images = random_images(3, seed=4)
    samples = [[images[0]], [images[1], images[2]], []]
    questions, answers = ["What color?", "Same shape?", "Say yes."], ["red", "no, one is a square", "yes"]
    inputs = tiny_llava.prepare(questions, samples, answers=answers)
    assert inputs.visual_tokens == [30, 60, 0]
    for b, answer in enumerate(answers):
        labelled = inputs.labels[b][inputs.labels[b] != -100].tolist()
        assert labelled == tiny_llava.answer_ids(answer)
        assert labelled[-1] == tiny_llava.tokenizer.eos_token_id
        assert torch.equal(inputs.input_ids[b, -len(labelled) :], torch.tensor(labelled))
    with torch.no_grad():
        batched = per_sample_loss(tiny_llava.model(**inputs.as_kwargs()).logits, inputs.labels)
        singles = []
        for q, s, a in zip(questions, samples, answers):
            one = tiny_llava.prepare([q], [s], answers=[a])
            out = tiny_llava.model(**one.as_kwargs())
            singles.append(per_sample_loss(out.logits, one.labels))
            torch.testing.assert_close(out.loss, singles[-1][0])  # HF's own loss agrees
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-5, atol=1e-5)


def test_gradients_reach_projector_through_reduced_tokens(tiny_llava):
    tiny_llava.reducer = UniformSample(keep=20)
    inputs = tiny_llava.prepare(["What color?"], [random_images(1)], answers=["red"])
    tiny_llava.model(**inputs.as_kwargs()).loss.backward()
    grad = tiny_llava.model.model.multi_modal_projector.linear_1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_hub_id_missing_from_cache_says_how_to_fetch():
    with pytest.raises(FileNotFoundError, match=r"huggingface-cli download llava-hf/llava-1\.5-7b-hf"):
        LlavaAdapter.from_pretrained("llava-hf/llava-1.5-7b-hf", device="cpu")


def test_pad_aspect_pads_to_square_with_mean_colour(tiny_llava_path):
    """image_aspect=pad equals the HF processor on the image centred on a mean-colour square."""
    from PIL import Image

    adapter = LlavaAdapter.from_pretrained(tiny_llava_path, dtype="float32", device="cpu", image_aspect="pad")
    image = random_images(3)[2]  # 120 x 64
    processor = AutoProcessor.from_pretrained(tiny_llava_path).image_processor
    mean = tuple(round(c * 255) for c in processor.image_mean)
    square = Image.new("RGB", (120, 120), mean)
    square.paste(image, (0, 28))
    want = processor([square], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(adapter.preprocess([image]), want)
    crop = LlavaAdapter.from_pretrained(tiny_llava_path, dtype="float32", device="cpu", image_aspect="crop")
    assert not torch.allclose(crop.preprocess([image]), want)
