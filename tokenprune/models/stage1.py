"""LLaVA-1.5's stage-2 starting point as a Hugging Face checkpoint (PruMerge's LoRA starts here).

LLaVA-1.5's stage 2, which PruMerge / PruMerge+ re-ran with LoRA and the reducer in the vision
tower (notes/prumerge.md §9), does not start from the released `llava-hf/llava-1.5-*-hf`: it starts
from the language model `lmsys/vicuna-{7b,13b}-v1.5`, the vision tower
`openai/clip-vit-large-patch14-336` and the projector trained in stage 1
(`liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-{7b,13b}-v1.5`, file `mm_projector.bin`).
`convert` assembles exactly these weights into a `LlavaForConditionalGeneration` folder that
`LlavaAdapter.from_pretrained` (model=llava15_7b_stage1 / llava15_13b_stage1) loads like any
other LLaVA checkpoint:

* language model and LM head: Vicuna's, unchanged; the vocabulary gains `<image>` (the
  placeholder the HF model splices features at; LLaVA's own code splices at a negative id instead)
  and, if the tokenizer has no pad token, `<pad>` (every padded position is masked either way),
  padded to a multiple of 64
  as llava-hf's checkpoints (32064 at 7B/13B). The new rows of the embedding and the LM head are
  the mean of the existing rows (deterministic; llava-hf sampled them around that mean).
* vision tower: CLIP's vision half, unchanged (the text half is dropped), read at layer -2
  (`mm_vision_select_layer -2`, patch tokens only: `vision_feature_select_strategy="default"`).
* projector: `mm_projector.bin`'s `mlp2x_gelu` (Linear C->d, GELU, Linear d->d) as
  `multi_modal_projector.linear_1` / `linear_2`.
* processor: CLIP's image processor (resize + centre crop; the adapter pads to square first with
  `image_aspect: pad`), the tokenizer above and the vicuna_v1 chat template; a greedy generation
  config (LLaVA evaluates greedily; Vicuna's own generation config samples).

Only local folders and the user's HF cache are read (`allow_download=True` lets the hub fill it).

    python scripts/convert_llava_stage1.py --size 7b --out <paths.models>/llava-v1.5-7b-stage1-hf
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tokenprune.atomic import atomic_folder

VISION_TOWER = "openai/clip-vit-large-patch14-336"
SOURCES = {  # size -> (language model, stage-1 projector repository)
    "7b": ("lmsys/vicuna-7b-v1.5", "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5"),
    "13b": ("lmsys/vicuna-13b-v1.5", "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-13b-v1.5"),
}
PROJECTOR_FILE = "mm_projector.bin"
# mm_projector.bin's Sequential(Linear, GELU, Linear) entries -> LlavaMultiModalProjector's
PROJECTOR_KEYS = {
    "0.weight": "linear_1.weight",
    "0.bias": "linear_1.bias",
    "2.weight": "linear_2.weight",
    "2.bias": "linear_2.bias",
}
VOCAB_MULTIPLE = 64


def locate(source: str, allow_download: bool = False) -> Path:
    """A local folder, or a hub repository's snapshot in the HF cache (downloaded only if allowed)."""
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    if local.exists() or source.count("/") != 1:
        raise FileNotFoundError(f"{source!r} is neither a folder nor a hub repository id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=not allow_download))
    except Exception as error:  # huggingface_hub raises several types for "not in the cache"
        raise FileNotFoundError(
            f"{source!r} is not in the HF cache ({type(error).__name__}); fetch it once with "
            f"`huggingface-cli download {source}` or pass --download"
        ) from error


def load_projector(folder: Path) -> dict[str, torch.Tensor]:
    """The stage-1 projector from `folder/mm_projector.bin`, keyed as LlavaMultiModalProjector's state.

    LLaVA saves the trainer's full parameter names (`model.mm_projector.0.weight`, ...); like
    LLaVA's own loader, everything after `mm_projector.` is the Sequential's key.
    """
    file = folder / PROJECTOR_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {PROJECTOR_FILE} in {folder} (the LLaVA-1.5 stage-1 pretrain folder)")
    config_file = folder / "config.json"
    if config_file.is_file():
        kind = json.loads(config_file.read_text(encoding="utf-8")).get("mm_projector_type", "mlp2x_gelu")
        if kind != "mlp2x_gelu":
            raise ValueError(
                f"{config_file}: mm_projector_type {kind!r}, only LLaVA-1.5's mlp2x_gelu converts"
            )
    state = torch.load(file, map_location="cpu", weights_only=True)
    found = {
        key.split("mm_projector.", 1)[1]: value for key, value in state.items() if "mm_projector." in key
    }
    if set(found) != set(PROJECTOR_KEYS):
        raise ValueError(f"{file}: expected mm_projector.{{0,2}}.{{weight,bias}}, found {sorted(found)}")
    return {PROJECTOR_KEYS[key]: value for key, value in found.items()}


def _add_tokens(tokenizer, language_model) -> None:
    """`<image>` and `<pad>` in the tokenizer; embeddings and LM head resized to a multiple of 64,
    the new rows set to the mean of the old ones."""
    from transformers import AddedToken

    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tokenizer.image_token = "<image>"
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    old = language_model.get_input_embeddings().weight.shape[0]
    language_model.resize_token_embeddings(
        len(tokenizer), pad_to_multiple_of=VOCAB_MULTIPLE, mean_resizing=False
    )
    with torch.no_grad():
        for matrix in (
            language_model.get_input_embeddings().weight,
            language_model.get_output_embeddings().weight,
        ):
            matrix[old:] = matrix[:old].float().mean(dim=0).to(matrix.dtype)  # [new, d]


def convert(
    llm: str,
    vision: str,
    projector: str,
    out: str | Path,
    dtype: str = "float16",
    allow_download: bool = False,
) -> Path:
    """Write the stage-2 starting checkpoint (see the module docstring) to `out`, atomically.

    Args:
        llm: the language model (e.g. lmsys/vicuna-7b-v1.5): folder or hub id in the cache.
        vision: the CLIP checkpoint (openai/clip-vit-large-patch14-336).
        projector: the stage-1 pretrain folder or hub id holding mm_projector.bin.
        out: the checkpoint folder to write (must not exist).
        dtype: the saved weights' dtype (float16 as Vicuna's release; bfloat16; float32).
        allow_download: let the hub fill the cache for missing sources.
    """
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionModel,
        GenerationConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from tokenprune.models._loading import resolve_dtype
    from tokenprune.models.tiny import LLAVA15_CHAT_TEMPLATE

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another --out")
    llm_dir, vision_dir, projector_dir = (locate(s, allow_download) for s in (llm, vision, projector))
    weights = load_projector(projector_dir)
    torch_dtype = resolve_dtype(dtype)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    language_model = LlamaForCausalLM.from_pretrained(llm_dir, dtype=torch_dtype)
    tower = CLIPVisionModel.from_pretrained(vision_dir, dtype=torch_dtype)
    _add_tokens(tokenizer, language_model)
    vc, tc = tower.config, language_model.config
    if weights["linear_1.weight"].shape != (tc.hidden_size, vc.hidden_size) or weights[
        "linear_2.weight"
    ].shape != (tc.hidden_size, tc.hidden_size):
        raise ValueError(
            f"projector shapes {tuple(weights['linear_1.weight'].shape)}, {tuple(weights['linear_2.weight'].shape)} "
            f"do not map CLIP width {vc.hidden_size} to LLM width {tc.hidden_size}"
        )
    side = vc.image_size // vc.patch_size
    config = LlavaConfig(
        vision_config=vc.to_dict(),
        text_config=tc.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=side * side,
        multimodal_projector_bias=True,
    )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(language_model.model.state_dict(), assign=True)
    model.lm_head.load_state_dict(language_model.lm_head.state_dict(), assign=True)
    model.model.vision_tower.load_state_dict(tower.state_dict(), assign=True)
    projector_state = {k: v.to(torch_dtype) for k, v in weights.items()}
    model.model.multi_modal_projector.load_state_dict(projector_state, assign=True)
    # greedy, as LLaVA's evaluation (Vicuna's own generation_config samples at temperature 0.9)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(vision_dir),
        tokenizer=tokenizer,
        patch_size=vc.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA15_CHAT_TEMPLATE,
    )
    with atomic_folder(out) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        sources = {"language_model": llm, "vision_tower": vision, "projector": projector, "dtype": dtype}
        (staging / "tokenprune_stage1.json").write_text(
            json.dumps(sources, indent=2) + "\n", encoding="utf-8"
        )
    return out
