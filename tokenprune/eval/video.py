"""Video for image models: decode a file and sample frames; find the video files of the video tasks.

`sample_frames(path, n)` decodes ``n`` frames with PyAV (CPU, bundled FFmpeg) at the centres of
``n`` equal segments of the video and returns them as RGB PIL images, so an image model such as
LLaVA-1.5 sees a video as ``n`` images (``n`` x its visual tokens before reduction).

The ``*_doc_to_visual`` functions replace lmms-eval's for the video tasks: they return the same
file path, but look it up under ``lmms_eval_specific_kwargs["video_dir"]`` (set by
`tokenprune.eval.data`: a local dataset folder or lmms-eval's ``$HF_HOME/<cache_dir>`` layout)
instead of a folder fixed when lmms-eval's module is imported, and raise FileNotFoundError (a
failed sample) instead of exiting the process when a file is missing.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Any

from PIL import Image

VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov")


def sample_frames(path: str | os.PathLike, n: int) -> list[Image.Image]:
    """``n`` RGB frames at the centres of ``n`` equal time segments (fewer if the video is shorter)."""
    import av

    if n < 1:
        raise ValueError(f"frames must be >= 1, got {n}")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame for frame in container.decode(stream)] if _short(stream) else None
        if frames is not None:
            if not frames:
                raise ValueError(f"{path} has no video frames")
            picks = _centres(len(frames), n)
            return [frames[i].to_image().convert("RGB") for i in picks]
        return _seek_frames(container, stream, n, path)


def _short(stream: Any) -> bool:
    """Decode everything when the video is short (or its length unknown): exact and cheap."""
    return not stream.frames or stream.frames <= 512


def _centres(count: int, n: int) -> list[int]:
    """Indices of the centres of n equal segments of range(count), without repeats."""
    picks = [min(count - 1, int((2 * i + 1) * count / (2 * n))) for i in range(n)]
    return sorted(set(picks))


def _seek_frames(container: Any, stream: Any, n: int, path: Any) -> list[Image.Image]:
    """Long videos: seek to each target time and decode the first frame at or after it."""
    time_base = stream.time_base or Fraction(1, 1_000_000)
    duration = stream.duration if stream.duration is not None else None
    if duration is None:
        duration = int(container.duration / 1_000_000 / time_base)  # container.duration is in µs
    start = stream.start_time or 0
    images: list[Image.Image] = []
    for i in range(n):
        target = start + int((2 * i + 1) * duration / (2 * n))
        container.seek(target, stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None or frame.pts >= target:
                images.append(frame.to_image().convert("RGB"))
                break
    if not images:
        raise ValueError(f"could not decode frames from {path}")
    return images


def find_video(folder: str | os.PathLike, name: str) -> str:
    """``folder/name`` with the first suffix that exists (``name`` may carry its own)."""
    base = Path(folder) / str(name)
    candidates = [base] if base.suffix in VIDEO_SUFFIXES else []
    stem = base.with_suffix("") if base.suffix in VIDEO_SUFFIXES else base
    candidates += [stem.with_name(stem.name + suffix) for suffix in VIDEO_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"video {name!r} not found under {folder} (tried {[c.name for c in candidates]})")


def _video_dir(kwargs: dict | None) -> str:
    if not kwargs or "video_dir" not in kwargs:
        raise ValueError("lmms_eval_specific_kwargs has no video_dir (set by tokenprune.eval.data)")
    return kwargs["video_dir"]


def videomme_doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[str]:
    """Video-MME: ``<video_dir>/<videoID>.mp4`` (lmms-eval: ``$HF_HOME/videomme/data``)."""
    return [find_video(_video_dir(lmms_eval_specific_kwargs), doc["videoID"])]


def mvbench_doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[str]:
    """MVBench: ``<video_dir>/<source folder of the subtask>/<video>`` (lmms-eval's DATA_LIST)."""
    from lmms_eval.tasks.mvbench.utils import DATA_LIST

    kwargs = lmms_eval_specific_kwargs or {}
    root = Path(_video_dir(kwargs))
    folder = DATA_LIST[kwargs["sub_task"]]
    for base in (root / folder, root / "data0613" / folder):
        if (base / doc["video"]).exists():
            return [str(base / doc["video"])]
    raise FileNotFoundError(f"MVBench video {doc['video']!r} not found under {root / folder}")


def egoschema_doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[str]:
    """EgoSchema: ``<video_dir>/<video_idx>.mp4`` (lmms-eval: ``$HF_HOME/egoschema/videos``)."""
    return [find_video(_video_dir(lmms_eval_specific_kwargs), doc["video_idx"])]


def nextqa_doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[str]:
    """NExT-QA: ``<video_dir>/<video>.mp4`` (lmms-eval: ``$HF_HOME/nextqa/NExTVideo``)."""
    return [find_video(_video_dir(lmms_eval_specific_kwargs), str(doc["video"]))]


def activitynetqa_doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[str]:
    """ActivityNet-QA: ``<video_dir>/v_<video_name>.mp4`` (lmms-eval: ``$HF_HOME/activitynetqa/all_test``)."""
    return [find_video(_video_dir(lmms_eval_specific_kwargs), f"v_{doc['video_name']}")]
