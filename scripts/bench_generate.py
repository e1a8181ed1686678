"""Batched vs per-sample generation through the LLaVA adapter, with and without reduction.

Measured side by side in one process on the tiny LLaVA (CPU) or any checkpoint (--model PATH).
Prints seconds per sample and the batch-N / batch-1 speed-up for each reducer.

    python scripts/bench_generate.py [--samples 16] [--batch 8] [--model PATH] [--device cpu|cuda]
    python scripts/bench_generate.py --smoke     # seconds: checks the script (the test suite runs it)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from tokenprune.models.llava import LlavaAdapter
from tokenprune.models.tiny import build_tiny_llava
from tokenprune.reducers.baselines import NoReduction, UniformSample


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--model", default=None, help="checkpoint folder (default: a tiny LLaVA built in a temp dir)"
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--smoke", action="store_true", help="2 samples, 2 tokens, 1 repeat: checks the script runs"
    )
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.batch, args.new_tokens, args.repeats = 2, 2, 2, 1
    torch.manual_seed(0)
    path = args.model or str(build_tiny_llava(tempfile.mkdtemp() + "/tiny_llava"))
    adapter = LlavaAdapter.from_pretrained(path, dtype=args.dtype, device=args.device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((96, 96, 3)) * 255).astype("uint8")) for _ in range(args.samples)]
    questions = ["Is there a red circle in the image?"] * args.samples

    def generate(batch: int):
        def go():
            for i in range(0, args.samples, batch):
                adapter.generate(
                    questions[i : i + batch],
                    [[im] for im in images[i : i + batch]],
                    max_new_tokens=args.new_tokens,
                )

        return go

    print(f"{'reducer':<12} {'batch 1 s/sample':>17} {f'batch {args.batch} s/sample':>17} {'speed-up':>9}")
    for name, reducer in [("none", NoReduction()), ("uniform144", UniformSample(keep=144))]:
        adapter.reducer = reducer
        one = timed(generate(1), args.repeats) / args.samples
        many = timed(generate(args.batch), args.repeats) / args.samples
        print(f"{name:<12} {one:>17.4f} {many:>17.4f} {one / many:>8.2f}x")


if __name__ == "__main__":
    main()
