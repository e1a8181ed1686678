"""Instruction data: LLaVA's JSON format, vicuna_v1 rendering, label masking, broken samples, batching."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tokenprune.config import PROJECT_ROOT, compose
from tokenprune.data.instruct import (
    BAD_IMAGE_FIELD,
    BAD_TURNS,
    CORRUPT_IMAGE,
    MISSING_IMAGE,
    NO_ASSISTANT_TURN,
    NO_CONVERSATIONS,
    TOO_LONG,
    InstructDataset,
    LengthGroupedSampler,
    collate,
    count_tokens,
    load_records,
    parse_record,
    render,
)
from tokenprune.reducers.baselines import UniformSample
from tokenprune.templates import LLAVA15_PROMPT, LLAVA15_SYSTEM, VICUNA_V1

FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "instruct"
RECORDS = load_records(FIXTURE / "llava_instruct.json")
BY_ID = {r["id"]: r for r in RECORDS}


def dataset(tokenizer, **kwargs) -> InstructDataset:
    return InstructDataset(RECORDS, FIXTURE, tokenizer, VICUNA_V1, **{"image_tokens": 10, **kwargs})


def test_render_is_llava_v1_prompt_multi_turn():
    """The rendered text is LLaVA's conv_vicuna_v1 prompt; its first turn is the eval prompt."""
    sample = parse_record(BY_ID["shapes-0002"])
    segments = render(sample.turns, len(sample.images), VICUNA_V1)
    want = (
        LLAVA15_SYSTEM + " USER: <image>\nWhat shape is this? ASSISTANT: a square</s>"
        "USER: What color is it? ASSISTANT: blue</s>USER: Is there a triangle? ASSISTANT: no</s>"
    )
    assert "".join(text for text, _ in segments) == want
    assert [trained for _, trained in segments] == [False, True] * 3
    assert segments[0][0] == LLAVA15_PROMPT.format(images="<image>\n", question="What shape is this?")
    text_only = parse_record(BY_ID["text-0003"])
    assert (
        render(text_only.turns, 0, VICUNA_V1)[0][0]
        == LLAVA15_SYSTEM + " USER: What is two plus two? ASSISTANT:"
    )


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"id": "a"}, NO_CONVERSATIONS),
        ({"id": "a", "conversations": []}, NO_CONVERSATIONS),
        ({"id": "a", "conversations": [{"from": "human", "value": "hi"}]}, NO_ASSISTANT_TURN),
        ({"id": "a", "conversations": [{"from": "robot", "value": "hi"}]}, BAD_TURNS),
        ({"id": "a", "conversations": [{"from": "human", "value": 3}]}, BAD_TURNS),
        (
            {"id": "a", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
            BAD_TURNS,
        ),
        (
            {
                "id": "a",
                "image": 5,
                "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
            },
            BAD_IMAGE_FIELD,
        ),
    ],
)
def test_structurally_broken_records_name_their_reason(record, reason):
    assert parse_record(record) == reason


def test_leading_assistant_turn_dropped_and_image_lists_kept():
    record = {
        "id": "x",
        "image": ["a.png", "b.png"],
        "conversations": [
            {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "<image> <image> compare"},
            {"from": "gpt", "value": "same"},
            {"from": "human", "value": "trailing question without reply"},
        ],
    }
    sample = parse_record(record)
    assert sample.images == ("a.png", "b.png") and sample.turns == (("<image> <image> compare", "same"),)
    first = render(sample.turns, 2, VICUNA_V1)[0][0]
    assert first.endswith("USER: <image>\n<image>\ncompare ASSISTANT:")


def test_labels_masked_exactly_on_non_assistant_tokens(tiny_llava):
    """Labels are the assistant replies + </s> (hand-tokenized), -100 on system/user/image/padding."""
    tiny_llava.reducer = UniformSample(keep=5)
    data = dataset(tiny_llava.tokenizer)
    items = [
        data[data.samples.index(next(s for s in data.samples if s.id == i))]
        for i in ("shapes-0002", "text-0003")
    ]
    batch = collate(items)
    inputs = tiny_llava.prepare_conversations(batch["conversations"], batch["images"])
    tok = tiny_llava.tokenizer

    def ids(text: str, first: bool = False) -> list[int]:
        return tok(text, add_special_tokens=first)["input_ids"]

    image = tiny_llava.image_token_id
    system = LLAVA15_SYSTEM + " USER: "
    turns = {
        "shapes-0002": [
            ("<image>\nWhat shape is this?", " a square"),
            ("What color is it?", " blue"),
            ("Is there a triangle?", " no"),
        ],
        "text-0003": [("What is two plus two?", " four"), ("And three plus three?", " six")],
    }
    for b, sample_id in enumerate(("shapes-0002", "text-0003")):
        want_ids, want_labels = [], []
        for k, (question, reply) in enumerate(turns[sample_id]):
            context = ids((system if k == 0 else "USER: ") + question + " ASSISTANT:", first=k == 0)
            context = [t for token in context for t in ([token] * 5 if token == image else [token])]
            answer = [*ids(reply), tok.eos_token_id]
            want_ids += context + answer
            want_labels += [-100] * len(context) + answer
        width = len(want_ids)
        assert inputs.attention_mask[b].sum() == width
        assert inputs.input_ids[b, -width:].tolist() == want_ids
        assert inputs.labels[b, -width:].tolist() == want_labels
        assert (inputs.labels[b, :-width] == -100).all()  # left padding
    labelled = inputs.labels[0][inputs.labels[0] != -100].tolist()
    assert tok.decode(labelled) == " a square</s> blue</s> no</s>"
    assert inputs.visual_tokens == [5, 0]
    assert (inputs.labels[inputs.input_ids == image] == -100).all()


def test_broken_samples_are_skipped_counted_and_never_stop_an_epoch(tiny_llava):
    data = dataset(tiny_llava.tokenizer)
    assert len(data) == 8 and data.skipped == Counter({NO_ASSISTANT_TURN: 1})
    loader = DataLoader(data, batch_size=3, collate_fn=collate)
    batches = list(loader)  # a whole epoch, no exception
    seen = [i for b in batches for i in b["ids"]]
    assert len(seen) == 8 and not {"missing-0005", "corrupt-0007"} & set(seen)
    skipped = dict(entry for b in batches for entry in b["skipped"])
    assert skipped == {"missing-0005": MISSING_IMAGE, "corrupt-0007": CORRUPT_IMAGE}
    for batch in batches:
        for conversation, images in zip(batch["conversations"], batch["images"]):
            assert conversation[0][0].count("<image>") == len(images)
            assert all(image.mode == "RGB" for image in images)
    assert len(list(loader)) == len(batches)  # next epoch: the known broken ones are passed over silently


def test_over_long_samples_are_skipped(tiny_llava):
    """Skipped exactly when text tokens + image_tokens per image exceed max_length."""
    data = dataset(tiny_llava.tokenizer, max_length=100, image_tokens=20)
    lengths = {
        s.id: count_tokens(tiny_llava.tokenizer, render(s.turns, len(s.images), VICUNA_V1))
        + 19 * len(s.images)
        for s in data.samples
    }
    too_long = {i for i, n in lengths.items() if n > 100}
    assert too_long == {"shapes-0002", "shapes-0004"}  # the long ones; the rest fit
    kept = {data[i]["id"] for i in range(len(data))}
    assert kept == set(lengths) - too_long - {"missing-0005", "corrupt-0007"}
    assert [data.load(i) for i, s in enumerate(data.samples) if s.id in too_long] == [TOO_LONG, TOO_LONG]


def test_all_broken_is_a_clear_error(tiny_llava):
    records = [BY_ID["missing-0005"], BY_ID["corrupt-0007"]]
    data = InstructDataset(records, FIXTURE, tiny_llava.tokenizer, VICUNA_V1)
    with pytest.raises(RuntimeError, match="no loadable instruction sample"):
        data[0]
    with pytest.raises(ValueError, match="no usable instruction sample"):
        InstructDataset([BY_ID["noreply-0006"]], FIXTURE, tiny_llava.tokenizer, VICUNA_V1)


def test_length_grouped_sampler_shards_groups_and_resumes():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (37,), generator=generator).tolist()
    has_image = [i % 3 != 0 for i in range(37)]
    ranks = [LengthGroupedSampler(lengths, 4, has_image, num_replicas=2, rank=r, seed=1) for r in range(2)]
    per_rank = [list(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == ranks[0].num_batches() * 4
    assert set(per_rank[0]) | set(per_rank[1]) == set(range(37))  # every sample, some repeated to fill
    for batch in ranks[0].global_batches():
        assert len(batch) == 8 and len({has_image[i] for i in batch}) == 1  # one modality per batch
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    for r, indices in enumerate(per_rank):  # rank r's batch b is its share of global batch b
        shares = [batch[r::2] for batch in ranks[0].global_batches()]
        assert indices == [i for share in shares for i in share]
    again = LengthGroupedSampler(lengths, 4, has_image, num_replicas=2, rank=0, seed=1)
    assert list(again) == per_rank[0]  # deterministic
    again.set_epoch(1)
    assert list(again) != per_rank[0]  # reshuffled per epoch
    resumed = LengthGroupedSampler(lengths, 4, has_image, num_replicas=2, rank=0, seed=1)
    resumed.resume(0, 3)
    assert list(resumed) == per_rank[0][12:]  # skips the 3 batches already trained on
    assert list(resumed) == per_rank[0]  # only once
    finished = LengthGroupedSampler(lengths, 4, has_image, num_replicas=2, rank=0, seed=1)
    finished.resume(0, finished.num_batches())
    assert finished.epoch == 1 and finished.skip == 0


def test_mix665k_loads_by_setting_paths(tiny_llava, tmp_path):
    """train/data=llava_mix665k + paths.data_root: LLaVA's playground layout loads as is."""
    from hydra.utils import instantiate

    from tokenprune.train.datamodule import InstructDataModule

    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    shutil.copy(FIXTURE / "images" / "red_circle.png", tmp_path / "coco" / "train2017" / "000000033471.jpg")
    records = [
        {
            "id": "000000033471",
            "image": "coco/train2017/000000033471.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                {"from": "gpt", "value": "The bus in the image is white and red."},
                {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                {"from": "gpt", "value": "The back of the bus features an advertisement."},
            ],
        },
        {
            "id": "oFWJ8rs_0",
            "model": "",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
        },
    ]
    Path(tmp_path / "llava_v1_5_mix665k.json").write_text(json.dumps(records))
    cfg = compose(["train=lora", "train/data=llava_mix665k", f"paths.data_root={tmp_path}"], "train")
    settings = instantiate(cfg.train.data)
    assert settings.json == str(tmp_path / "llava_v1_5_mix665k.json") and settings.batch_size == 16
    module = InstructDataModule(settings, tiny_llava.tokenizer, image_tokens=577)
    module.setup("fit")
    items = [module.dataset[i] for i in range(len(module.dataset))]
    assert [i["id"] for i in items] == ["000000033471", "oFWJ8rs_0"]
    assert len(items[0]["images"]) == 1 and items[1]["images"] == []
