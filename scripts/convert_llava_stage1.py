"""Build LLaVA-1.5's stage-2 starting point (Vicuna-v1.5 + CLIP-L/336 + the stage-1 projector) as an HF
LlavaForConditionalGeneration folder, for model=llava15_7b_stage1 / llava15_13b_stage1 (PruMerge's LoRA
starting point; tokenprune/models/stage1.py says what goes where).

    python scripts/convert_llava_stage1.py --size 7b --out outputs/models/llava-v1.5-7b-stage1-hf --download
    python scripts/convert_llava_stage1.py --size 13b --out outputs/models/llava-v1.5-13b-stage1-hf

Sources default to lmsys/vicuna-{size}-v1.5, openai/clip-vit-large-patch14-336 and
liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-{size}-v1.5 (local folders or the HF cache; --download
lets the hub fill the cache). The 7B conversion needs ~16 GB of RAM (fp16), the 13B one ~30 GB.
"""

from __future__ import annotations

import argparse

from tokenprune.models.stage1 import SOURCES, VISION_TOWER, convert


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SOURCES), default="7b")
    parser.add_argument("--out", required=True, help="checkpoint folder to write (must not exist)")
    parser.add_argument("--llm", help="language model folder or hub id (default: lmsys/vicuna-<size>-v1.5)")
    parser.add_argument("--vision", default=VISION_TOWER, help="CLIP folder or hub id")
    parser.add_argument("--projector", help="stage-1 pretrain folder or hub id holding mm_projector.bin")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--download", action="store_true", help="let the hub fill the HF cache")
    args = parser.parse_args()
    llm, projector = SOURCES[args.size]
    out = convert(
        args.llm or llm,
        args.vision,
        args.projector or projector,
        args.out,
        dtype=args.dtype,
        allow_download=args.download,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
