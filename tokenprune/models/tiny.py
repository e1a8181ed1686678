"""Tiny random checkpoints with the real model classes, for tests and the offline default run.

They are built from configs, saved with `save_pretrained` and loaded back through the same
`from_pretrained` path the real checkpoints use. Nothing is downloaded: the tokenizer is a
byte-level BPE trained here on a fixed corpus.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from tokenprune.atomic import atomic_folder

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


def train_tokenizer(vocab_size: int = 512, corpus: Sequence[str] | None = None):
    """A byte-level BPE tokenizer with LLaMA-style specials (<s> prepended) and an <image> token.

    Args:
        vocab_size: the most tokens (specials included); a small corpus saturates below it.
        corpus: training lines (None: the tiny models' fixed corpus).
    """
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
    lines = _CORPUS.splitlines() if corpus is None else list(corpus)
    tok.train_from_iterator([line for line in lines if line.strip()] * 4, trainer=trainer)
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


# Sizes of the LLaVA stand-ins: the tiny test model, and LLaVA-1.5-7B's shape (CLIP ViT-L/14-336 +
# Vicuna-7B) for random-weight timings on a GPU (scripts/gpu_check.py).
LLAVA_SHAPES = {
    "tiny": {
        "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4},
        "text": {
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2,
        },
        "vocab_size": None,  # the trained tokenizer's
    },
    "7b": {
        "vision": {
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        },
        "text": {
            "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32,
        },
        "vocab_size": 32064,
    },
}  # fmt: skip


def tiny_llava_parts(shape: str = "tiny", patch_grid: int = 24, patch_size: int = 4) -> tuple:
    """The `LlavaConfig` and `LlavaProcessor` of a random LLaVA stand-in of `shape` (LLAVA_SHAPES).

    The vision tower has a `patch_grid` x `patch_grid` patch grid (24 x 24, like CLIP-L/336; the 7b
    shape uses 14-px patches as CLIP-L/14 does), so both the penultimate features and the last
    layer's attention exist. The tokenizer is a small trained BPE (`train_tokenizer`).
    """
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaProcessor,
    )

    sizes = LLAVA_SHAPES[shape]
    patch_size = 14 if shape == "7b" else patch_size
    tokenizer = train_tokenizer()
    image_size = patch_grid * patch_size
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            **sizes["vision"], image_size=image_size, patch_size=patch_size, projection_dim=64
        ),
        text_config=LlamaConfig(
            **sizes["text"],
            vocab_size=sizes["vocab_size"] or len(tokenizer),
            max_position_embeddings=2048 if shape == "tiny" else 4096,
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
    return config, processor


def build_tiny_llava(
    path: str | os.PathLike, seed: int = 0, patch_grid: int = 24, patch_size: int = 4
) -> Path:
    """Write a tiny random `LlavaForConditionalGeneration` (CLIP + Llama) with processor to `path`.

    Sizes: `tiny_llava_parts`. The write is atomic: a partially built folder never appears at `path`.
    """
    from transformers import LlavaForConditionalGeneration

    path = Path(path)
    config, processor = tiny_llava_parts("tiny", patch_grid, patch_size)
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    with atomic_folder(path, replace=False) as staging:  # another process built it first: keep theirs
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
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


# ---------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL and LLaVA-OneVision: Qwen2-style chat tokens, no BOS.

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
OV_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
# The Qwen2-VL-Instruct chat format (system prompt, images before the text); the adapters use the
# plain `prompt` string of the model config, this template serves apply_chat_template users.
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
# LLaVA-OneVision's qwen_1_5 conversation format: "<image>\n" per image before the question.
OV_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}"
    "<video>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_chat_tokenizer(
    special_tokens: list[str], extra: dict[str, str], chat_template: str, vocab_size: int = 512
):
    """A byte-level BPE tokenizer with Qwen2-style specials: no BOS, pad <|endoftext|>, eos <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        line for line in (_CORPUS + "You are a helpful assistant. system user").splitlines() if line.strip()
    ]
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=extra,
        padding_side="left",
        chat_template=chat_template,
    )


def _save_atomic(path: Path, parts: list) -> Path:
    """save_pretrained every part into a staging folder, then rename it to `path` (atomic)."""
    with atomic_folder(path, replace=False) as staging:  # another process built it first: keep theirs
        for part in parts:
            part.save_pretrained(staging)
    return path


def _set_generation_ids(model, tokenizer) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None


ATTENTION_SHARPNESS = 12.0  # scale of the random vision q/k weights (see _sharpen_vision_attention)


@torch.no_grad()
def _sharpen_vision_attention(model, family: str) -> None:
    """Scale the vision tower's query/key weights so its attention is peaked, as a trained tower's is.

    With the default random init (std 0.02) the attention logits are ~0 and every patch receives
    the same attention, so the CLS-attention substitutes would have no outliers and PruMerge would
    keep nothing but its extra token.
    """
    if family == "qwen":
        for block in model.model.visual.blocks:
            width = block.attn.qkv.in_features
            block.attn.qkv.weight[: 2 * width] *= ATTENTION_SHARPNESS
            block.attn.qkv.bias[: 2 * width] *= ATTENTION_SHARPNESS
    else:
        for layer in model.model.vision_tower.encoder.layers:
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                linear.weight *= ATTENTION_SHARPNESS


def build_tiny_qwen2vl(path: str | os.PathLike, seed: int = 0, version: str = "2") -> Path:
    """Write a tiny random `Qwen2VLForConditionalGeneration` (or Qwen2.5-VL with version="2.5") to `path`.

    Vision: 2 blocks, width 32, 4-pixel patches, 2x2 PatchMerger, temporal patch 2 (Qwen2.5-VL:
    the first block full attention, the last windowed, 2x2-merge-unit windows). Text: Qwen2, 2 layers,
    width 64, M-RoPE sections [4, 2, 2]. The saved image processor (Qwen2VLImageProcessorPil)
    resizes to 256..6400 pixels (multiples of 8), i.e. at most 10x10 merged tokens per image; no
    processor class is saved (Qwen2VLProcessor needs torchvision), the adapter tokenizes by hand.
    """
    from transformers import Qwen2VLImageProcessorPil

    path = Path(path)
    extra = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    }
    tokenizer = train_chat_tokenizer(QWEN_SPECIAL_TOKENS, extra, QWEN_CHAT_TEMPLATE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0},
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    common = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    vision = {"depth": 2, "num_heads": 4, "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        config = Qwen2VLConfig(
            text_config=text_config,
            vision_config={**vision, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2},
            **common,
        )
        model_class = Qwen2VLForConditionalGeneration
    elif version == "2.5":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        config = Qwen2_5_VLConfig(
            text_config=text_config,
            vision_config={
                **vision,
                "hidden_size": 32,
                "intermediate_size": 64,
                "out_hidden_size": 64,
                "window_size": 16,  # 16 px = 2x2 merge units of 2x2 4-px patches
                "fullatt_block_indexes": [0],
                "tokens_per_second": 2,
            },
            **common,
        )
        model_class = Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    torch.manual_seed(seed)
    model = model_class(config).eval()
    _sharpen_vision_attention(model, "qwen")
    _set_generation_ids(model, tokenizer)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=80 * 80
    )
    return _save_atomic(path, [model, tokenizer, image_processor])


def build_tiny_qwen25vl(path: str | os.PathLike, seed: int = 0) -> Path:
    """The Qwen2.5-VL variant of `build_tiny_qwen2vl` (windowed vision attention, RMSNorm, SwiGLU)."""
    return build_tiny_qwen2vl(path, seed=seed, version="2.5")


def build_tiny_llava_ov(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random `LlavaOnevisionForConditionalGeneration` (SigLIP + Qwen2) to `path`.

    Vision: SigLIP, 2 layers, width 32, 32-px crops of 4-px patches (8x8 patches per crop), no CLS
    token, features of the last layer ("full"). anyres grid pinpoints up to 96x96 (3x3 crops) with
    `vision_aspect_ratio="anyres_max_4"`, so large images exercise the packing's downscale (the real
    checkpoint uses anyres_max_9 with 384-px crops). Text: Qwen2, 2 layers, width 64. The image
    processor (LlavaOnevisionImageProcessorPil) is saved; no processor class (it needs torchvision).
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
    )

    path = Path(path)
    extra = {"image_token": "<image>", "video_token": "<video>"}
    tokenizer = train_chat_tokenizer(OV_SPECIAL_TOKENS, extra, OV_CHAT_TEMPLATE)
    pinpoints = [[32 * r, 32 * c] for r in (1, 2, 3) for c in (1, 2, 3)]
    config = LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 4,
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_4",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _sharpen_vision_attention(model, "siglip")
    _set_generation_ids(model, tokenizer)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    return _save_atomic(path, [model, tokenizer, image_processor])


BUILDERS.update(
    {
        "tiny_qwen2vl": build_tiny_qwen2vl,
        "tiny_qwen25vl": build_tiny_qwen25vl,
        "tiny_llava_ov": build_tiny_llava_ov,
    }
)
