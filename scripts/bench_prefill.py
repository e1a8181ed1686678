"""LLM prefill time with each reducer's visual-token count vs. `none`, at a real model's shape.

For every reducer config in configs/reducer/, the number of visual tokens k it keeps is measured by
running it on 576 synthetic CLIP-like patch features (random features; CLS attention with a few
strong outliers, as CLIP's has — adaptive methods such as PruMerge keep a data-dependent count),
then the LLM prefill over k + T tokens (T text tokens, batch 1, SDPA, KV cache off, random weights)
is timed and compared with `none` (576 + T):

    measured speed-up = t(576 + T) / t(k + T)        analytic limit = (576 + T) / (k + T)

and their ratio (the goal is >= 0.8: the prefill scales with the tokens it gets). Only the LLM is
timed; the vision tower and the reducer's own cost are not (see eff/* in result files for those).

Shapes: ``7b`` = LLaVA-1.5-7B's LLM (Vicuna-7B, fp16; for a GPU), ``mid`` = 8 layers of width 1024
(fp32; finishes in < 2 minutes on a 2-core CPU). Timers: CUDA events around the forward after a
synchronise on GPU (median of ``--repeats``), the wall clock on CPU (minimum of ``--repeats``: on a
shared machine other processes only add time); lengths are timed round-robin; warm-up excluded.

    python scripts/bench_prefill.py                      # 7b on CUDA if available, else mid on CPU
    python scripts/bench_prefill.py --shape 7b --device cuda --text 40
    python scripts/bench_prefill.py --smoke             # seconds: checks the script (the test suite runs it)

Reducers inside the LLM (FastV, PDrop, DART, keep_by_signal: ``space="llm_layer"``) get their per-cut
counts from the reducer itself on N0 = 576 tokens with synthetic layer signals; their cut layers,
written for 32-layer LLMs, are scaled to the shape's depth (max(1, round(K * layers / 32)), kept
increasing). Their LLM prefill runs the decoder layers stage by stage (the hidden states shortened to
each stage's S_i = text + visual tokens kept), timed against the same staged loop with every token
(one stage), and their analytic limit is the ratio of the staged prefill FLOPs
(`tokenprune.eval.flops.prefill_flops`: layers before a cut see every token). The cut's own signal
recompute (one layer's q/k, eff/flops_signals) is not timed.

Reducers that read signals of the LLM input (explain_mapper, explain_oracle) are listed as skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

SHAPES = {
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "mid": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
    },
    "smoke": {  # --smoke: the script's every step in seconds (the test suite runs it); no timing value
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
    },
}
PATCHES = 576
CLOCK = [time.perf_counter]  # the CPU timer (--cpu-time: time.process_time)


def layer_counts(reducer, generator: torch.Generator, text: int = 40) -> list[int]:
    """A reducer inside the LLM: the visual tokens left after each of its cuts, from N0 = 576."""
    from tokenprune.synthetic import llm_layer_like_signals
    from tokenprune.types import LayerTokens

    current, counts = PATCHES, []
    original = torch.tensor([PATCHES])
    for stage, layer in enumerate(reducer.layers):
        features = torch.randn(1, current, 64, generator=generator)
        signals = llm_layer_like_signals(current, text, generator)
        tokens = LayerTokens(features, torch.tensor([current]), original, signals, layer=layer, stage=stage)
        current = int(reducer(tokens).lengths[0])
        counts.append(current)
    return counts


def scaled_cuts(cuts: tuple[int, ...], layers: int) -> list[int]:
    """Cut layers written for a 32-layer LLM, scaled to `layers` (at least 1 apart, below `layers`)."""
    out: list[int] = []
    for k in cuts:
        scaled = max(1, round(k * layers / 32), out[-1] + 1 if out else 1)
        out.append(min(scaled, layers - 1))
    if len(set(out)) != len(out):
        raise ValueError(f"cuts {list(cuts)} do not fit a {layers}-layer LLM")
    return out


def kept_tokens(seed: int = 0) -> tuple[dict[str, Any], dict[str, str]]:
    """Visual tokens each reducer config keeps for one synthetic 24x24 CLIP-like image (inside the
    LLM: (cut layers, counts after each cut)), and the reducers skipped with the reason (those
    reading signals of the LLM input, or a trained file)."""
    from hydra.utils import instantiate

    from tokenprune.config import compose, group_options
    from tokenprune.types import VisualTokens

    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(1, PATCHES, 64, generator=generator)  # [1, N, C]
    logits = torch.randn(1, PATCHES + 1, generator=generator)
    spikes = torch.randint(0, PATCHES, (1, 14), generator=generator)
    logits.scatter_add_(1, spikes + 1, 4 + 2 * torch.rand(spikes.shape, generator=generator))
    signals = {
        "vit_cls_attn": logits.softmax(-1)[:, 1:],
        "vit_keys": torch.randn(1, PATCHES, 64, generator=generator),
    }
    tokens = VisualTokens(features=features, grid=(24, 24), signals=signals)
    counts, skipped = {}, {}
    for name in group_options("reducer"):
        try:
            reducer = instantiate(compose([f"reducer={name}"]).reducer)
        except Exception as error:  # e.g. a reducer whose trained weights are not built here
            skipped[name] = " ".join(str(error).split())[:160]
            continue
        if reducer.space == "llm_layer":
            counts[name] = (tuple(reducer.layers), layer_counts(reducer, generator))
            continue
        missing = sorted(set(reducer.requires) - set(signals))
        if missing:
            skipped[name] = f"reads {', '.join(missing)} (not computed by this benchmark)"
            continue
        counts[name] = int(reducer(tokens).lengths[0])
    return counts, skipped


def build_llm(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, **SHAPES[shape])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def staged_forward(model, embeds: torch.Tensor, stages: list[tuple[int, int]]) -> None:
    """The decoder layers stage by stage: (layers, tokens) pairs, the hidden states cut to the last
    `tokens` rows before each stage (positions 0 .. tokens - 1, causal SDPA), then the head on the last."""
    language_model = model.model
    hidden, index = embeds, 0
    for layers, tokens in stages:
        hidden = hidden[:, -tokens:]
        positions = torch.arange(tokens, device=hidden.device)[None]
        embeddings = language_model.rotary_emb(hidden, positions)
        for _ in range(layers):
            hidden = language_model.layers[index](hidden, attention_mask=None, position_embeddings=embeddings)
            index += 1
    model.lm_head(language_model.norm(hidden[:, -1:]))


@torch.inference_mode()
def staged_times(
    model, runs: dict[str, list[tuple[int, int]]], repeats: int, device: str
) -> dict[str, float]:
    """Per named staged run, its prefill time in ms (round-robin; median on GPU, minimum on CPU)."""
    width = max(tokens for stages in runs.values() for _, tokens in stages)
    embeds = torch.randn(1, width, model.config.hidden_size, device=device, dtype=model.dtype)
    cuda = device.startswith("cuda")

    def forward(stages: list[tuple[int, int]]) -> float:
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        staged_forward(model, embeds, stages)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - begin) * 1000

    for stages in runs.values():
        forward(stages)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, stages in runs.items():
            samples[name].append(forward(stages))
    summary = statistics.median if cuda else min
    return {name: summary(values) for name, values in samples.items()}


@torch.inference_mode()
def prefill_times(model, lengths: list[int], repeats: int, device: str) -> dict[int, float]:
    """Per sequence length, the prefill forward time in ms (batch 1, logits of the last position).

    The lengths are measured round-robin (one forward of each per repeat) so that a slow spell of a
    shared machine hits them all alike; the summary is the median on GPU and the minimum on CPU,
    where other processes only ever add time.
    """
    embeds = {
        n: torch.randn(1, n, model.config.hidden_size, device=device, dtype=model.dtype) for n in lengths
    }
    cuda = device.startswith("cuda")

    def forward(n: int) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            model(inputs_embeds=embeds[n], use_cache=False, logits_to_keep=1)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        begin = CLOCK[0]()
        model(inputs_embeds=embeds[n], use_cache=False, logits_to_keep=1)
        return (CLOCK[0]() - begin) * 1000

    for n in lengths:
        forward(n)  # warm-up
    samples: dict[int, list[float]] = {n: [] for n in lengths}
    for _ in range(repeats):
        for n in lengths:
            samples[n].append(forward(n))
    summary = statistics.median if cuda else min
    return {n: summary(values) for n, values in samples.items()}


# ----------------------------------------------------------------------------- SparseVLM (inside the LLM)
def sparsevlm_counts(budget: int, cuts: tuple[int, ...], seed: int = 0) -> list[int]:
    """Visual tokens after each of SparseVLM v1.5's cuts (recycled ones included) for 576 tokens, from
    the reducer itself on random features and ratings (its counts do not depend on them)."""
    from tokenprune.reducers.sparsevlm import V15_KEEP, SparseVLM
    from tokenprune.types import LLM_LAYER_RATER_ATTN, LayerTokens

    reducer = SparseVLM(layers=cuts, keep=V15_KEEP[budget][: len(cuts)])  # a shallow LLM: the first cuts
    generator = torch.Generator().manual_seed(seed)
    n, counts = PATCHES, []
    for stage, layer in enumerate(cuts):
        signals = {LLM_LAYER_RATER_ATTN: torch.rand(1, n, generator=generator)}
        tokens = LayerTokens(
            torch.randn(1, n, 8, generator=generator),
            torch.tensor([n]),
            torch.tensor([PATCHES]),
            signals,
            layer,
            stage,
        )
        n = int(reducer(tokens).lengths[0])
        counts.append(n)
    return counts


@torch.inference_mode()
def staged_prefill_times(
    model, plans: dict[str, list[tuple[int, int]]], repeats: int, device: str
) -> dict[str, float]:
    """Per plan [(layers, tokens), ...] (consecutive decoder layers run on that many rows), the prefill
    time in ms: the decoder layers stage by stage (causal SDPA), then the norm and head on the last row.
    Timed round-robin like `prefill_times`; the cut's own work (signals, selection) is not timed."""
    language_model, width = model.model, model.config.hidden_size
    cuda = device.startswith("cuda")
    inputs = {
        name: [torch.randn(1, s, width, device=device, dtype=model.dtype) for _, s in plan]
        for name, plan in plans.items()
    }

    def forward(name: str) -> float:
        if cuda:
            torch.cuda.synchronize()
        begin = CLOCK[0]()
        first = 0
        for (layers, _), hidden in zip(plans[name], inputs[name]):
            positions = torch.arange(hidden.shape[1], device=device)[None]
            embeddings = language_model.rotary_emb(hidden, positions)
            for layer in language_model.layers[first : first + layers]:
                hidden = layer(hidden, attention_mask=None, position_embeddings=embeddings)
            first += layers
        model.lm_head(language_model.norm(hidden[:, -1:]))
        if cuda:
            torch.cuda.synchronize()
        return (CLOCK[0]() - begin) * 1000

    for name in plans:
        forward(name)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in plans}
    for _ in range(repeats):
        for name in plans:
            samples[name].append(forward(name))
    summary = statistics.median if cuda else min
    return {name: summary(values) for name, values in samples.items()}


def sparsevlm_rows(model, text: int, repeats: int, device: str) -> None:
    """SparseVLM v1.5 at 64 / 128 / 192: the staged prefill vs the unreduced one, measured and by FLOPs
    (eval/flops.py), cuts at the reference's 3 / 7 / 16 of 32 layers scaled to this depth."""
    from tokenprune.eval import flops

    depth = model.config.num_hidden_layers
    cuts = tuple(sorted({max(1, min(depth - 1, round(k * depth / 32))) for k in (3, 7, 16)}))
    llm = flops.llm_shape(model.config)
    plans = {"none": [(depth, PATCHES + text)]}
    for budget in (192, 128, 64):
        counts = sparsevlm_counts(budget, cuts)
        plans[f"sparsevlm {budget}"] = flops.llm_stages(
            llm, cuts, [PATCHES + text, *(k + text for k in counts)]
        )
    times = staged_prefill_times(model, plans, repeats, device)
    print(f"\nSparseVLM v1.5 inside the LLM (cuts after layers {list(cuts)} of {depth}; k after each cut):")
    print(
        "| reducer | visual tokens per stage | prefill ms | measured speed-up | analytic FLOPs ratio | measured / analytic |"
    )
    print("|---|---|---|---|---|---|")
    full = flops.prefill_flops(llm, plans["none"])
    for name, plan in plans.items():
        measured = times["none"] / times[name]
        analytic = full / flops.prefill_flops(llm, plan)
        tokens = " / ".join(str(s - text) for _, s in plan)
        print(
            f"| {name} | {tokens} | {times[name]:.1f} | {measured:.2f}x | {analytic:.2f}x | {measured / analytic:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b" if cuda else "mid")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument(
        "--dtype", default=None, help="float16 | bfloat16 | float32 (default fp16 on GPU, fp32 on CPU)"
    )
    parser.add_argument("--text", type=int, default=40, help="text tokens T in the prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny LLM and one repeat: checks the script runs"
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="CPU: time with this process's CPU time instead of the wall clock (a busy shared machine; "
        "use with OMP_NUM_THREADS=1)",
    )
    args = parser.parse_args()
    if args.cpu_time and not args.device.startswith("cuda"):
        CLOCK[0] = time.process_time  # both tables' CPU timer: time spent in this process only
    if args.smoke:
        args.shape, args.repeats = "smoke", 1
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    counts, skipped = kept_tokens()
    model = build_llm(args.shape, args.device, dtype)
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"shape {args.shape} {SHAPES[args.shape]}, {dtype}, {device_name}, T = {args.text}, {'median' if args.device.startswith('cuda') else 'min'} of {args.repeats}"
    )
    inside = {name: value for name, value in counts.items() if isinstance(value, tuple)}
    counts = {name: value for name, value in counts.items() if not isinstance(value, tuple)}
    lengths = prefill_times(
        model, sorted({k + args.text for k in counts.values()}), args.repeats, args.device
    )
    times = {k: lengths[k + args.text] for k in counts.values()}
    base = times[counts["none"]]
    print(
        "| reducer | visual tokens k | prefill ms | measured speed-up | analytic (576+T)/(k+T) | measured / analytic |"
    )
    print("|---|---|---|---|---|---|")
    for name, k in sorted(counts.items(), key=lambda item: -item[1]):
        measured = base / times[k]
        analytic = (PATCHES + args.text) / (k + args.text)
        print(
            f"| {name} | {k} | {times[k]:.1f} | {measured:.2f}x | {analytic:.2f}x | {measured / analytic:.2f} |"
        )
    if inside:
        print_inside(model, inside, args)
    for name, reason in sorted(skipped.items()):
        print(f"skipped {name}: {reason}")
    sparsevlm_rows(model, args.text, args.repeats, args.device)


def print_inside(model, inside: dict[str, tuple[tuple[int, ...], list[int]]], args) -> None:
    """The reducers inside the LLM: staged prefill vs the same loop over every token, and the FLOPs ratio."""
    from tokenprune.eval import flops

    llm = flops.llm_shape(model.config)
    full = PATCHES + args.text
    runs: dict[str, list[tuple[int, int]]] = {"(every token)": [(llm.layers, full)]}
    cuts = {}
    for name, (layers, kept) in sorted(inside.items()):
        try:
            cuts[name] = scaled_cuts(layers, llm.layers)
        except ValueError as error:
            print(f"skipped {name}: {error}")
            del inside[name]
            continue
        runs[name] = flops.llm_stages(llm, cuts[name], [full, *(k + args.text for k in kept)])
    times = staged_times(model, runs, args.repeats, args.device)
    base = times["(every token)"]
    print()
    print(
        f"Inside the LLM ({llm.layers} layers; cuts scaled from 32 layers; staged loop, every token: {base:.1f} ms)"
    )
    print(
        "| reducer | cuts (this depth) | visual tokens after each cut | prefill ms | measured speed-up | analytic (FLOPs) | measured / analytic |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (_, kept) in sorted(inside.items()):
        measured = base / times[name]
        analytic = flops.prefill_flops(llm, full) / flops.prefill_flops(llm, runs[name])
        print(
            f"| {name} | {cuts[name]} | {' / '.join(map(str, kept))} | {times[name]:.1f} | {measured:.2f}x | {analytic:.2f}x | {measured / analytic:.2f} |"
        )


if __name__ == "__main__":
    main()
