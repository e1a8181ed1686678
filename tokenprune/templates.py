"""Conversation templates and prompts: a leaf module (it imports nothing of tokenprune).

The models render their prompts with these (`tokenprune.models.llava`: LLaVA-1.5's vicuna_v1 prompt) and
the instruction data renders conversations with them (`tokenprune.data.instruct`, the training stages),
so a prompt is written once. Benchmark-specific prompts (LLaVA-1.5's evaluation prompts per task) live
with the benchmarks in `tokenprune.eval.prompts`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

IMAGE = "<image>"  # the image placeholder in LLaVA-format conversations and prompts

# LLaVA-1.5's vicuna_v1 conversation format, as its training and eval scripts render it.
LLAVA15_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA15_PROMPT = LLAVA15_SYSTEM + " USER: {images}{question} ASSISTANT:"


@dataclass(frozen=True)
class ConversationTemplate:
    """How one model family renders a conversation (data only; add a family by adding an instance).

    A conversation renders as
    `system + user(images + q1) + assistant(a1) + end + user(q2) + assistant(a2) + end + ...`;
    `assistant(a) + end` is trained on, the rest is context. `{text}` marks the message.

    Attributes:
        name: the key in TEMPLATES (config: train.data.template).
        system: text before the first user turn.
        user: a user turn around its message, up to the assistant's cue.
        assistant: an assistant reply around its text.
        end: closes each assistant reply and is trained on (so the model learns to stop).
        image: one per image, before the first user message.
    """

    name: str
    system: str
    user: str
    assistant: str
    end: str
    image: str = IMAGE + "\n"


# LLaVA-1.5 (`--version v1`, SeparatorStyle.TWO): "<system> USER: <image>\nq ASSISTANT: a</s>USER: ..."
VICUNA_V1 = ConversationTemplate(
    name="vicuna_v1",
    system=LLAVA15_SYSTEM + " ",
    user="USER: {text} ASSISTANT:",
    assistant=" {text}",
    end="</s>",
)
# Qwen2-VL / Qwen2.5-VL chat format (ChatML with the default system message), as the adapter's prompt.
QWEN_CHATML = ConversationTemplate(
    name="qwen_chatml",
    system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    user="<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
    assistant="{text}",
    end="<|im_end|>\n",
    image="<|vision_start|><|image_pad|><|vision_end|>",
)
# LLaVA-OneVision (Qwen2 LLM): the same ChatML with its "<image>\n" marker, as the adapter's prompt.
ONEVISION_CHATML = replace(QWEN_CHATML, name="onevision_chatml", image=IMAGE + "\n")
TEMPLATES: dict[str, ConversationTemplate] = {t.name: t for t in (VICUNA_V1, QWEN_CHATML, ONEVISION_CHATML)}


def get_template(name: str) -> ConversationTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; valid: {sorted(TEMPLATES)}")
    return TEMPLATES[name]
