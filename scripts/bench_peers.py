"""Micro-benchmark: the batched peer reducers against per-image loops in their references' style.

VisionZip (54 + 10), DivPrune (64 of the projected tokens), VisPruner (64, important_ratio 0.5) and
Downsample (64) on N = 576 CLIP-like patches, C = 1024 (DivPrune: D = 4096, LLaVA-1.5-7B's projected
width). Each "loop" column runs one image at a time with the reference's structure: VisionZip's
topk / complement / similarity / per-target mean, DivPrune's greedy loop that recomputes the minimum
over every chosen row at each step (as its reference does), VisPruner's rounds, and one resize per
image. `--vit` also times a random-weight CLIP ViT-L/14-336 forward at the same batch, and prints
each reducer's share of it.

    .venv/bin/python scripts/bench_peers.py                 # fp32 on CPU, B in {1, 32}
    .venv/bin/python scripts/bench_peers.py --vit
    .venv/bin/python scripts/bench_peers.py --device cuda   # fp16 on a GPU

Times are the best of `--repeat` runs (loops: at most 2); on CUDA each run is synchronised.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_reducers import best_time, vit_forward_time

from tokenprune.reducers.divprune import DivPrune
from tokenprune.reducers.downsample import Downsample
from tokenprune.reducers.visionzip import VisionZip
from tokenprune.reducers.vispruner import VisPruner
from tokenprune.synthetic import clip_like_tokens
from tokenprune.types import VIT_CLS_ATTN_HEADS, VIT_CLS_FEATURE, VIT_FEAT_KEYS, VisualTokens

N, GRID, DIM, HEADS, LLM_DIM = 576, (24, 24), 1024, 16, 4096


def make_tokens(b: int, dim: int, device: str, dtype: torch.dtype, seed: int = 0) -> VisualTokens:
    """Per-head CLS attention with a few strong patches, normal keys, features and CLS row of width dim
    (tokenprune.synthetic)."""
    return clip_like_tokens(b, GRID, dim, seed=seed, dtype=dtype, device=device, heads=HEADS, key_dim=DIM)


def visionzip_loop(tokens: VisualTokens, dominant: int = 54, contextual: int = 10) -> None:
    for i in range(tokens.features.shape[0]):
        x, cls = tokens.features[i], tokens.signals[VIT_CLS_FEATURE][i]  # [N, D], [D]
        top = tokens.signals[VIT_CLS_ATTN_HEADS][i].sum(0).topk(dominant - 1).indices  # [k]
        mask = torch.ones(N, dtype=torch.bool, device=x.device)
        mask[top] = False
        metric = tokens.signals[VIT_FEAT_KEYS][i].view(N, HEADS, -1).mean(1)[mask]  # [M, c]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        rest = x[mask]  # [M, D]
        m = rest.shape[0]
        targets = torch.arange(0, m, max(1, m // contextual), device=x.device)[:contextual]
        others = torch.ones(m, dtype=torch.bool, device=x.device)
        others[targets] = False
        assign = (metric[others] @ metric[targets].T).argmax(1)  # [M - c]
        members = rest[others]
        merged = [rest[t] + members[assign == j].mean(0) for j, t in enumerate(targets)]
        torch.cat([cls[None], x[~mask], torch.stack(merged)])


def divprune_loop(tokens: VisualTokens, keep: int = 64) -> None:
    for i in range(tokens.features.shape[0]):
        unit = F.normalize(tokens.features[i].float(), dim=-1, eps=0.0)
        distance = 1 - unit @ unit.T  # [N, N]
        chosen = [int(distance.topk(2, dim=0, largest=False).values[1].argmax())]
        for _ in range(keep - 1):
            chosen.append(int(distance[chosen].min(dim=0).values.argmax()))
        tokens.features[i, sorted(chosen)]


def vispruner_loop(tokens: VisualTokens, keep: int = 64, ratio: float = 0.5, step: int = 8) -> None:
    for i in range(tokens.features.shape[0]):
        ranked = tokens.signals[VIT_CLS_ATTN_HEADS][i].float().mean(0).argsort(descending=True)
        important = int(keep * ratio)
        residual = ranked[important:]
        unit = F.normalize(tokens.features[i].float(), dim=-1, eps=0.0)
        while (r := min(step, residual.numel() - (keep - important))) > 0:
            a, b = residual[::2], residual[1::2]
            order = (unit[a] @ unit[b].T).amax(1).argsort(descending=True)[r:]
            residual = torch.cat([a[order], b])
        tokens.features[i, torch.cat([ranked[:important], residual]).sort().values]


def downsample_loop(tokens: VisualTokens) -> None:
    for x in tokens.features:
        image = x.T.reshape(1, -1, *GRID).float()
        F.interpolate(image, size=(8, 8), mode="bilinear", antialias=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--vit", action="store_true", help="also time a random-weight CLIP ViT-L/14-336")
    parser.add_argument("--smoke", action="store_true", help="B = 1, one run: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.repeat = [1], 1
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    device = "cuda" if args.device.startswith("cuda") else args.device
    print(f"torch {torch.__version__}, device {args.device}, {dtype}, threads {torch.get_num_threads()}")
    print(
        f"{'method':<10} {'B':>3} {'loop ms':>9} {'batched ms':>10} {'speed-up':>8}"
        + ("  vit ms  share" if args.vit else "")
    )
    cases = (
        ("VisionZip", VisionZip(54, 10), visionzip_loop, DIM),
        ("DivPrune", DivPrune(keep=64), divprune_loop, LLM_DIM),
        ("VisPruner", VisPruner(keep=64), vispruner_loop, DIM),
        ("Downsample", Downsample(keep=64), downsample_loop, DIM),
    )
    for b in args.batches:
        vit = vit_forward_time(b, args.device, dtype, 1) if args.vit else None
        for name, reducer, loop_fn, dim in cases:
            tokens = make_tokens(b, dim, args.device, dtype)
            with torch.inference_mode():
                batched = best_time(lambda r=reducer, t=tokens: r(t), args.repeat, device)
                loop = best_time(lambda f=loop_fn, t=tokens: f(t), min(2, args.repeat), device)
            line = f"{name:<10} {b:>3} {loop * 1e3:>9.1f} {batched * 1e3:>10.1f} {loop / batched:>7.1f}x"
            if vit is not None:
                line += f"  {vit * 1e3:>6.0f}  {batched / vit:>6.2%}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
