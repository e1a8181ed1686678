"""Image decoding that refuses truncated files, whatever another library set globally."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from PIL import ImageFile


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """Inside: a truncated image file raises OSError instead of decoding its missing part as black.

    lmms-eval sets `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True` for the whole process when it is
    imported (lmms_eval/api/task.py); this restores PIL's default for the block and puts the
    previous value back after it.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
