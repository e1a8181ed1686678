"""The efficiency meter: the `eff/*` block of every result, from the per-sample records.

Token counts are per sample (all images or video frames of a request together):

* ``eff/visual_tokens_{mean,min,max}``, ``eff/visual_tokens_hist`` ({"edges", "counts"}),
  ``eff/visual_tokens_per_image_mean``, ``eff/text_tokens_mean``, ``eff/new_tokens_mean``;
  with a reducer inside the LLM, ``eff/layer_tokens_mean``: per cut, the mean visual tokens left
  after it (``eff/visual_tokens_*`` count the LLM input), ``eff/visual_tokens_layer_avg``: the
  visual tokens averaged over the LLM's layers (what the tables' Tokens column shows for such a
  reducer: the in-LLM papers' budgets are such averages), and per stage (before the first cut, then
  after each) ``eff/flops_prefill_stages_mean`` (its layers' prefill FLOPs) and
  ``eff/flops_layer_stages_mean`` (one of its layers': the cost of a layer before and after a cut).

Analytic FLOPs (`tokenprune.eval.flops`, formulas in its docstring), per-sample means from the
actual counts: ``eff/flops_{vit,signals,reducer,projector,prefill,decode,total}_mean``,
``eff/flops_decode_per_token_mean``, ``eff/flops_prefill_full_mean`` (every patch kept) and
``eff/prefill_flops_ratio`` (prefill / prefill with every patch kept).

Measured (synchronised CUDA events on a GPU, the wall clock on a CPU — ``eff/timer``), per batch
of ``eff/batch_size_mean`` samples, the warm-up batch excluded (it is not recorded):

* ``eff/encode_ms_mean``: preprocess + vision tower + signals + reducer + projector + splice;
* ``eff/prefill_ms_mean``: the LLM prefill (to the first logits);
* ``eff/ttft_ms_mean``: time to first token = encode + prefill;
* ``eff/decode_ms_per_token``: decode time / decode steps (a step advances the whole batch);
* ``eff/samples_per_s``: samples / summed batch time;
* ``eff/peak_memory_mib`` with ``eff/peak_memory_kind``: ``cuda_max_allocated`` (GPU) or
  ``cpu_max_rss`` (the process's peak resident set, CPU).

Plus ``eff/samples``, ``eff/failed_samples`` and ``eff/resumed_samples`` (answers reused from an
earlier, killed run; their timings are those of the run that made them).
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from tokenprune.eval import flops
from tokenprune.models.base import Adapter


def model_shape(adapter: Adapter) -> flops.ModelShape:
    """The FLOPs shape of an adapter's model: its LLM always, its vision tower where the family has
    a formula (`Adapter.vision_flops`; None otherwise)."""
    vision = adapter.vision_flops()
    return flops.ModelShape(
        vision=None if vision is None else flops.VisionShape(**asdict(vision)),
        llm=flops.llm_shape(adapter.model.config.text_config),
    )


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "eff/peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "eff/peak_memory_kind": "cuda_max_allocated",
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    return {"eff/peak_memory_mib": mib, "eff/peak_memory_kind": "cpu_max_rss"}


def histogram(values: Sequence[int], bins: int = 16) -> dict[str, list[int]]:
    """Counts over equal integer-width bins from 0 to past the maximum."""
    if not values:
        return {"edges": [], "counts": []}
    top = max(values)
    width = max(1, math.ceil((top + 1) / bins))
    edges = list(range(0, top + width + 1, width))
    counts = [0] * (len(edges) - 1)
    for value in values:
        counts[min(value // width, len(counts) - 1)] += 1
    return {"edges": edges, "counts": counts}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: Sequence[dict[str, Any]], adapter: Adapter | None = None) -> dict[str, Any]:
    """The `eff/*` block from per-sample records (see the module docstring)."""
    answered = [r for r in records if "failed" not in r]
    kept = [int(r["visual_tokens"]) for r in answered]
    eff: dict[str, Any] = {
        "eff/samples": len(records),
        "eff/failed_samples": len(records) - len(answered),
        "eff/resumed_samples": sum(1 for r in answered if r.get("resumed")),
        "eff/visual_tokens_mean": _mean(kept),
        "eff/visual_tokens_min": min(kept) if kept else None,
        "eff/visual_tokens_max": max(kept) if kept else None,
        "eff/visual_tokens_hist": histogram(kept),
        "eff/visual_tokens_per_image_mean": _mean(
            [r["visual_tokens"] / r["images"] for r in answered if r.get("images")]
        ),
        "eff/text_tokens_mean": _mean([r["text_tokens"] for r in answered if "text_tokens" in r]),
        "eff/new_tokens_mean": _mean([r["new_tokens"] for r in answered if "new_tokens" in r]),
    }
    staged = [r["layer_tokens"] for r in answered if r.get("layer_tokens")]
    if staged:
        eff["eff/layer_tokens_mean"] = [_mean(list(stage)) for stage in zip(*staged)]
    eff.update(_flops(answered, adapter))
    eff.update(_timings(answered))
    return eff


def _flops(answered: Sequence[dict[str, Any]], adapter: Adapter | None) -> dict[str, Any]:
    stages = ("vit", "signals", "reducer", "projector", "prefill", "decode", "total", "prefill_full")
    out: dict[str, Any] = {f"eff/flops_{s}_mean": None for s in stages}
    out["eff/flops_decode_per_token_mean"] = None
    out["eff/prefill_flops_ratio"] = None
    shape = model_shape(adapter) if adapter is not None else None
    rows = [
        r
        for r in answered
        if (r.get("images") or r.get("videos")) and "text_tokens" in r and "new_tokens" in r
    ]
    if shape is None or not rows:
        return out
    reducer = adapter.reducer
    in_llm = reducer.space == "llm_layer"
    per_sample = [
        flops.sample_flops(
            shape,
            reducer,
            requires=reducer.requires,
            space=reducer.space,
            images=max(int(r.get("images", 0)), 1),
            visual_tokens=int(r["visual_tokens"]),
            text_tokens=int(r["text_tokens"]),
            new_tokens=int(r["new_tokens"]),
            cuts=reducer.layers if in_llm else (),
            layer_tokens=r.get("layer_tokens", ()) if in_llm else (),
        )
        for r in rows
    ]
    for stage in stages:
        values = [f[stage] for f in per_sample]
        out[f"eff/flops_{stage}_mean"] = None if any(v is None for v in values) else _mean(values)
    if in_llm:  # per stage of the cut LLM (before the first cut, after each): lists of means
        out["eff/visual_tokens_layer_avg"] = _mean(
            [
                layer_average(
                    int(r["visual_tokens"]), r.get("layer_tokens", ()), reducer.layers, shape.llm.layers
                )
                for r in rows
            ]
        )
        for key in ("prefill_stages", "layer_stages"):
            out[f"eff/flops_{key}_mean"] = [_mean(list(v)) for v in zip(*(f[key] for f in per_sample))]
    steps = sum(f["decode_steps"] for f in per_sample)
    out["eff/flops_decode_per_token_mean"] = sum(f["decode"] for f in per_sample) / steps if steps else None
    full = [f["prefill_full"] for f in per_sample]
    if all(f is not None for f in full):
        out["eff/prefill_flops_ratio"] = sum(f["prefill"] for f in per_sample) / sum(full)
    out["eff/model_shape"] = shape.as_dict()
    return out


def layer_average(entering: int, after_cuts: Sequence[int], cuts: Sequence[int], depth: int) -> float:
    """Visual tokens averaged over the LLM's `depth` layers: `entering` in layers 0 .. K_1 - 1, then
    `after_cuts[s]` from layer K_{s+1} on (SparseVLM's "N tokens"; FastV at K = 2 keeping 64 of 576 on
    32 layers averages 96)."""
    counts, bounds = [entering, *after_cuts], [0, *cuts, depth]
    return sum(n * (stop - start) for n, start, stop in zip(counts, bounds, bounds[1:])) / depth


def _timings(answered: Sequence[dict[str, Any]]) -> dict[str, Any]:
    batches = {r["batch"]["id"]: r["batch"] for r in answered if isinstance(r.get("batch"), dict)}
    timed = list(batches.values())
    steps = sum(b["decode_steps"] for b in timed)
    total_ms = sum(b["total_ms"] for b in timed)
    return {
        "eff/timer": timed[0]["timer"] if timed else None,
        "eff/batches": len(timed),
        "eff/batch_size_mean": _mean([b["size"] for b in timed]),
        "eff/encode_ms_mean": _mean([b["encode_ms"] for b in timed]),
        "eff/prefill_ms_mean": _mean([b["prefill_ms"] for b in timed]),
        "eff/ttft_ms_mean": _mean([b["encode_ms"] + b["prefill_ms"] for b in timed]),
        "eff/decode_ms_per_token": sum(b["decode_ms"] for b in timed) / steps if steps else None,
        "eff/samples_per_s": 1000.0 * sum(b["size"] for b in timed) / total_ms if total_ms else None,
    }
