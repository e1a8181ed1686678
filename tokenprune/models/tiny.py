"""Tiny random checkpoints with the real model classes, for tests and the offline default run.

They are built from configs, saved with `save_pretrained` and loaded back through the same
`from_pretrained` path the real checkpoints use. Nothing is downloaded: the tokenizer is a
byte-level BPE trained here on a fixed corpus.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
# LLaVA-1.5's conversation format (vicuna_v1) as a chat template; the adapter uses the plain
# `prompt` string of the model config, this template serves processor.apply_chat_template users.
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS = """
A chat between a curious human and an artificial intelligence assistant. USER: ASSISTANT:
Is there a red circle in the image? Answer the question using a single word or phrase.
What color is the square? How many objects are there? Which shape is left of the triangle?
yes no red green blue yellow purple orange white black gray circle square triangle star
one two three four five six seven eight zero above below left right top bottom middle
Answer with the option's letter from the given choices directly. A. B. C. D.
What is written on the sign? The image shows a small blue triangle next to a large green square.
0 1 2 3 4 5 6 7 8 9 the a an of in on is are what where which who how many color shape
"""


def train_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with LLaMA-style specials (<s> prepended) and an <image> token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )


def build_tiny_llava(
    path: str | os.PathLike, seed: int = 0, patch_grid: int = 24, patch_size: int = 4
) -> Path:
    """Write a tiny random `LlavaForConditionalGeneration` (CLIP + Llama) with processor to `path`.

    The vision tower has a `patch_grid` x `patch_grid` patch grid (24 x 24, like CLIP-L/336) and
    three layers, so both the penultimate features and the last layer's attention exist. The
    write is atomic: a partially built folder never appears at `path`.
    """
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = Path(path)
    tokenizer = train_tokenizer()
    image_size = patch_grid * patch_size
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=64,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=patch_grid * patch_grid,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA15_CHAT_TEMPLATE,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        try:
            staging.rename(path)
        except OSError:  # another process built it first: keep theirs
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


BUILDERS = {"tiny_llava": build_tiny_llava}


def ensure_built(name: str, path: str | os.PathLike) -> Path:
    """Build the tiny checkpoint `name` at `path` unless a checkpoint is already there."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; valid: {sorted(BUILDERS)}")
    return BUILDERS[name](path)
