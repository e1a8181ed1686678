"""`python -m tokenprune.visualize`: the drawing marks exactly the kept and merged patches."""

import contextlib
import io

import numpy as np
import pytest
import torch
from conftest import random_images
from PIL import Image

from tokenprune.config import compose
from tokenprune.visualize import HEADER, draw, header_height, run

GRAY = (128, 128, 128)


def test_draw_outlines_kept_and_tints_merged_only():
    view = Image.new("RGB", (40, 40), GRAY)  # a 4x4 grid of 10 px patches
    picture = np.asarray(draw(view, (4, 4), torch.tensor([5]), [torch.tensor([6])], 16, True, "t", scale=1))
    body = picture[-40:].astype(int)  # below the title (which wraps on a 40 px canvas)
    assert body.shape == (40, 40, 3)
    kept_border, kept_inside = body[10, 10:20], body[12:18, 12:18]  # patch 5 = row 1, col 1
    assert (kept_border != GRAY).any(axis=-1).all(), "kept patch not outlined"
    assert (kept_inside == GRAY).all(), "kept patch interior should stay visible"
    merged = body[12:18, 22:28]  # patch 6 = row 1, col 2
    assert (merged != GRAY).any(axis=-1).all() and (np.abs(merged - GRAY) < 128).all(), (
        "merged patch not tinted"
    )
    untouched = np.ones((40, 40), bool)
    untouched[10:20, 10:30] = False
    assert (body[untouched] == GRAY).all(), "patches neither kept nor merged must be unchanged"


@pytest.mark.parametrize(
    "reducer", ["reducer=uniform reducer.keep=16", "reducer=prumerge reducer.min_keep=5"]
)
def test_run_writes_the_png(tmp_path, tiny_llava_path, reducer):
    image = tmp_path / "in.png"
    random_images(1)[0].save(image)
    cfg = compose(
        [
            f"image={image}",
            f"paths.outputs={tmp_path}",
            "model=tiny_llava",
            f"model.path={tiny_llava_path}",
            "scale=2",
            *reducer.split(),
        ],
        config_name="visualize",
    )
    out = run(cfg)
    assert out == tmp_path / "visualize" / f"in-{reducer.split()[0].split('=')[1]}.png"
    width, height = Image.open(out).size  # 24x24 patches of 4 px, scale 2; the title wraps to fit
    assert width == 192 and height in (192 + header_height(1), 192 + header_height(2))


def test_bad_image_paths_are_clear_errors(tmp_path):
    def cfg(path):
        return compose([f"image={path}", f"paths.outputs={tmp_path}"], config_name="visualize")

    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(cfg(tmp_path / "missing.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        run(cfg(broken))


def test_the_readme_example_keeps_patches_and_shows_its_whole_title(tmp_path):
    """README's `python -m tokenprune.visualize ...` line (less its comment), run as written (default model:
    the miniature)."""
    import re

    from tokenprune.config import PROJECT_ROOT

    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    (command,) = re.findall(
        r"^python -m tokenprune\.visualize (.*?)(?: \[.*)?(?:\s+#.*)?$", readme, flags=re.M
    )
    overrides = [arg for arg in command.split() if not arg.startswith("scale=")]
    for scale in (2, 3):
        cfg = compose([*overrides, f"scale={scale}", f"output={tmp_path / 'v.png'}"], config_name="visualize")
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            run(cfg)
        kept = int(re.search(r"\((\d+) kept", printed.getvalue()).group(1))
        assert kept >= 8, printed.getvalue()  # PruMerge on the miniature keeps its outliers
        picture = np.asarray(Image.open(tmp_path / "v.png").convert("L")).astype(int)
        header = picture[: picture.shape[0] - 96 * scale]
        assert header.shape[0] >= HEADER and (header[:, -3:] == 255).all()  # no text cut at the edge
