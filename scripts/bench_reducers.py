"""Micro-benchmark: batched, vectorised PruMerge / PruMerge+ against a per-image loop in the reference's style.

The loop follows the structure of the authors' code (notes/prumerge.md §7): per image, the IQR in
numpy on the host, `topk`, the complement by scatter + sort, for PruMerge+ a Python filter of the
grid points with one tensor membership test each, then one kept token at a time: build its
candidate list, one `bmm` against all candidate keys, `topk`, gather, multiply, sum. It is run image
by image with a per-image IQR, the same semantics as the vectorised reducer's default
`iqr_scope="image"` (the reference's own PruMerge+ cannot run at B > 1).

    .venv/bin/python scripts/bench_reducers.py                  # fp32 on CPU, B in {1, 8, 32}
    .venv/bin/python scripts/bench_reducers.py --device cuda    # fp16 on a GPU
    .venv/bin/python scripts/bench_reducers.py --vit            # also time a random-weight CLIP ViT-L/14-336
    .venv/bin/python scripts/bench_reducers.py --smoke          # seconds: checks the script (the test suite runs it)

    .venv/bin/python scripts/bench_reducers.py --threads 1 --clock cpu   # on a machine shared with other jobs

Inputs are CLIP-like (N = 576 patches, C = D = 1024; 20-50 IQR outliers per image). Times are the
best of `--repeat` runs; on CUDA each run is synchronised. `--clock cpu` times the process's CPU time
instead of the wall clock: with one thread it equals the wall time of a quiet machine and is far less
sensitive to other processes (CPU only).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tokenprune.reducers.prumerge import PruMerge, PruMergePlus
from tokenprune.synthetic import clip_like_tokens
from tokenprune.types import VIT_CLS_ATTN, VIT_KEYS, VisualTokens

N, GRID, DIM = 576, (24, 24), 1024


def make_tokens(b: int, device: str, dtype: torch.dtype, seed: int = 0) -> VisualTokens:
    """CLIP-like CLS attention (a few strong outliers), normal keys and features (tokenprune.synthetic)."""
    return clip_like_tokens(b, GRID, DIM, seed=seed, dtype=dtype, device=device)


def loop_reference_style(tokens: VisualTokens, plus: bool, knn_k: int = 32) -> list[torch.Tensor]:
    """One image and one kept token at a time, as the authors' code does (per-image IQR)."""
    outputs = []
    for b in range(tokens.features.shape[0]):
        x = tokens.features[b : b + 1]  # [1, N, D]
        attention = tokens.signals[VIT_CLS_ATTN][b : b + 1].to(x.dtype)  # [1, N]
        values = attention.float().cpu().numpy().ravel()  # host sync, as the reference
        q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
        ratio = float((values > q3 + 1.5 * (q3 - q1)).sum()) / values.size
        idx = torch.topk(attention, int(N * ratio), dim=1).indices  # [1, m]
        if plus and ratio > 0:
            stride = max(int(int(1 / ratio) / 3), 1)
            grid = torch.arange(0, N - 1, stride, device=x.device)
            extra = [p for p in grid if p not in idx]  # one device sync per grid point
            if extra:
                idx = torch.cat([idx, torch.stack(extra)[None]], dim=1)
        m = idx.shape[1]
        everything = torch.arange(N, device=x.device)[None].clone()
        complement = everything.scatter_(1, idx, 0).sort(dim=1).values[:, m:]  # [1, N - m]
        unit = F.normalize(tokens.signals[VIT_KEYS][b : b + 1], dim=-1)  # [1, N, C]
        merged = x[:, idx[0]].clone()  # [1, m, D]
        for i in range(m):
            centre = idx[0, i]
            candidates = torch.cat([idx[0, :i], idx[0, i + 1 :], complement[0]])  # [N - 1]
            similarity = torch.bmm(
                unit[:, centre][:, None], unit[:, candidates].transpose(1, 2)
            )  # [1, 1, N-1]
            nearest = candidates[torch.topk(similarity, knn_k, dim=2).indices[0, 0]]  # [k]
            merged[0, i] = x[0, centre] + (x[0, nearest] * attention[0, nearest, None]).sum(0)
        extra_token = (x[0, complement[0]] * attention[0, complement[0], None]).sum(0)
        outputs.append(torch.cat([merged[0], extra_token[None]]))
    return outputs


def best_time(fn: Callable[[], object], repeat: int, device: str, clock: str = "wall") -> float:
    now = time.process_time if clock == "cpu" else time.perf_counter
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = now()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(now() - start)
    return min(times)


def vit_forward_time(b: int, device: str, dtype: torch.dtype, repeat: int) -> float:
    """A full CLIP ViT-L/14-336 vision tower (random weights) forward at batch b."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )  # fmt: skip
    model = CLIPVisionModel(config).to(device, dtype).eval()
    pixels = torch.randn(b, 3, 336, 336, device=device, dtype=dtype)
    with torch.inference_mode():
        model(pixel_values=pixels, output_hidden_states=True)
        return best_time(lambda: model(pixel_values=pixels, output_hidden_states=True), repeat, device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeat", type=int, default=5, help="runs of the vectorised reducer (loop: 2)")
    parser.add_argument(
        "--vit", action="store_true", help="also time a random-weight CLIP ViT-L/14-336 forward"
    )
    parser.add_argument("--smoke", action="store_true", help="B = 1, one run: checks the script runs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="wall clock or process CPU time"
    )
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.repeat = [1], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu times CPU runs only")
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    device = "cuda" if args.device.startswith("cuda") else args.device
    print(
        f"torch {torch.__version__}, device {args.device}, {dtype}, threads {torch.get_num_threads()}, "
        f"clock {args.clock}"
    )
    header = f"{'method':<10} {'B':>3} {'tokens/img':>10} {'loop ms':>8} {'vector ms':>9} {'speed-up':>8}"
    header += f" {'batched ms':>10} {'speed-up':>8} {'max|diff|':>9}"
    print(header + ("  vit ms  reducer/vit" if args.vit else ""))
    for b in args.batches:
        tokens = make_tokens(b, args.device, dtype)
        vit = vit_forward_time(b, args.device, dtype, 1) if args.vit else None
        for name, reducer, plus in (("PruMerge", PruMerge(), False), ("PruMerge+", PruMergePlus(), True)):
            with torch.inference_mode():
                out = reducer(tokens)
                looped = loop_reference_style(tokens, plus)
                vector = best_time(lambda r=reducer, t=tokens: r(t), args.repeat, device, args.clock)
                reducer.merge_chunk = b  # force the fully batched merge (the default on CPU is per image)
                batched = best_time(lambda r=reducer, t=tokens: r(t), args.repeat, device, args.clock)
                loop = best_time(
                    lambda p=plus, t=tokens: loop_reference_style(t, p),
                    min(2, args.repeat),
                    device,
                    args.clock,
                )
            diff = max((out.features[i, : len(y)] - y).abs().max().item() for i, y in enumerate(looped))
            line = (
                f"{name:<10} {b:>3} {out.lengths.float().mean().item():>10.1f} {loop * 1e3:>8.1f} "
                f"{vector * 1e3:>9.1f} {loop / vector:>7.1f}x {batched * 1e3:>10.1f} {loop / batched:>7.1f}x"
                f" {diff:>9.2e}"
            )
            if vit is not None:
                line += f"  {vit * 1e3:>6.0f}  {vector / vit:>10.2%}"
            print(line)


if __name__ == "__main__":
    main()
