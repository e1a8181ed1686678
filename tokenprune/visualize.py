"""`python -m tokenprune.visualize model=... reducer=... image=PATH`: draw what a reducer keeps.

The PNG shows the image as the model sees it (after padding/cropping and resizing), each kept
patch outlined, the patches merged into each kept token tinted in that token's colour (for
reducers that merge, such as PruMerge), and the kept count in the title.
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw, UnidentifiedImageError

from tokenprune.atomic import atomic_write_bytes
from tokenprune.config import CONFIG_DIR, choices, register_resolvers
from tokenprune.models.base import Adapter
from tokenprune.types import VisualTokens

register_resolvers()
HEADER = 22  # title bar height in pixels for one line of title
LINE = 12  # height of each further title line


def header_height(lines: int) -> int:
    """Height of a title bar holding `lines` lines of text."""
    return HEADER + LINE * (lines - 1)


def wrap(text: str, width: int, pen: ImageDraw.ImageDraw) -> list[str]:
    """Words of `text` in lines no wider than `width` pixels (a single long word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and pen.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def kept_and_merged(
    adapter: Adapter, tokens: VisualTokens
) -> tuple[torch.Tensor, list[torch.Tensor], int, bool]:
    """Kept patch ids [M] in output order, the patches merged into each, N, and whether an extra token exists."""
    with torch.no_grad():
        n = tokens.features.shape[1]
        reducer = adapter.reducer
        reduced = reducer(tokens)
        length = int(reduced.lengths[0])
        index = reduced.index[0, :length]
        kept = index[index >= 0]
        if hasattr(reducer, "plan"):
            plan = reducer.plan(tokens)
            m = int(plan.kept[0])
            merged = (
                [plan.neighbours[0, i] for i in range(m)] if getattr(reducer, "merge", "") != "none" else []
            )
        else:
            merged = []
    return kept, merged, n, bool((index < 0).any())


def draw(view: Image.Image, grid: tuple[int, int], kept, merged, n: int, extra: bool, title: str, scale: int):
    rows, cols = grid
    canvas = view.resize((view.width * scale, view.height * scale), Image.NEAREST).convert("RGBA")
    cell_w, cell_h = canvas.width / cols, canvas.height / rows
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    pen = ImageDraw.Draw(overlay)

    def box(patch: int) -> tuple[float, float, float, float]:
        r, c = divmod(int(patch), cols)
        return c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1

    colours = [
        tuple(int(255 * v) for v in colorsys.hsv_to_rgb(i / max(1, len(kept)), 0.9, 1.0))
        for i in range(len(kept))
    ]
    for colour, neighbours in zip(colours, merged):
        for patch in neighbours.tolist():
            pen.rectangle(box(patch), fill=(*colour, 70))
    for colour, patch in zip(colours, kept.tolist()):
        pen.rectangle(box(patch), outline=(*colour, 255), width=max(1, scale))
    canvas = Image.alpha_composite(canvas, overlay)
    label = f"{title}: {len(kept)}{' + 1 merged extra' if extra else ''} of {n} tokens"
    lines = wrap(label, canvas.width - 8, ImageDraw.Draw(canvas))  # the whole title, at any scale
    header = Image.new("RGBA", (canvas.width, header_height(len(lines))), (255, 255, 255, 255))
    ImageDraw.Draw(header).multiline_text((4, 5), "\n".join(lines), fill=(0, 0, 0, 255), spacing=LINE - 10)
    out = Image.new("RGB", (canvas.width, canvas.height + header.height), "white")
    out.paste(header.convert("RGB"), (0, 0))
    out.paste(canvas.convert("RGB"), (0, header.height))
    return out


def run(cfg: DictConfig) -> Path:
    """Reduce one image with the configured model and reducer and write the drawing; returns its path."""
    from hydra.utils import instantiate

    source = Path(cfg.image).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"image={source} does not exist; give a path to an image file")
    try:
        image = Image.open(source).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image={source} is not a readable image ({error})") from error
    adapter: Adapter = instantiate(cfg.model, reducer=instantiate(cfg.reducer))
    if not adapter.capabilities.supports_visualize:
        raise ValueError(
            f"visualize supports one patch grid per image; the {adapter.capabilities.family} adapter "
            "has none yet (use a llava model)"
        )
    if adapter.reducer.space not in ("vision", "llm"):
        raise ValueError(f"visualize draws vision / llm reducers, not space={adapter.reducer.space!r}")
    reducer_name = choices().get("reducer", type(adapter.reducer).__name__)
    with torch.no_grad():
        view, tokens = adapter.visual_view(image)
    kept, merged, n, extra = kept_and_merged(adapter, tokens)
    picture = draw(view, tokens.grid, kept, merged, n, extra, reducer_name, cfg.scale)
    output = (
        Path(cfg.output)
        if cfg.output
        else Path(cfg.paths.outputs) / "visualize" / f"{source.stem}-{reducer_name}.png"
    )
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    atomic_write_bytes(output, buffer.getvalue())
    print(f"wrote {output} ({len(kept)} kept of {n})")
    return output


@hydra.main(config_path=str(CONFIG_DIR), config_name="visualize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
