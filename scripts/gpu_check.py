"""GPU verification in one prepared run: CUDA numerics, LLaVA-1.5-7B-shaped timings, one report.

    make gpu-check                                   # = python scripts/gpu_check.py --out outputs/gpu_check
    python scripts/gpu_check.py --dry-run --out DIR  # CPU, shapes reduced: checks the script (make test does)

Writes DIR/report.json and DIR/report.md. Every section is timed; a section that fails is recorded with
its error and the run goes on, so one short GPU window yields every figure it can. Random weights at
the real shapes, built on the device (nothing is downloaded). Sections and their goals:

* env: torch, CUDA, the card, whether FlashAttention-2 is importable.
* parity: `pytest -m gpu` (tests/test_gpu.py): each tiny family's unreduced logits vs plain HF in
  fp32/fp16/bf16, the SDPA signals vs eager, batch 1 == batch N for every reducer (exact indices in
  fp32), and the same under FlashAttention-2 where it is importable.
* prefill: the LLM prefill of a LLaVA-1.5-7B-shaped adapter (fp16, SDPA, batch 1) per reducer, the
  in-LLM cut included, against its analytic limit (prefill FLOPs of `none` / the reducer's, from the
  actual token counts): goal measured / analytic >= 0.8. Median of repeats after a CUDA synchronise.
* reducers: PruMerge / PruMerge+ at B = 32 vs the per-image reference-style loop (goal >= 50x) and
  their share of a CLIP ViT-L/14-336 forward (goal <= 2%) (scripts/bench_reducers.py's pieces).
* throughput: evaluation through the adapter (generate, PruMerge: per-sample token counts) at batch 8
  vs 8 single-sample calls: goal >= 3x.
* lora: one LoRA step (peft, the training stage's `apply_lora`) at the 7B shape with PruMerge+ in the
  loop vs none: step time and peak memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokenprune.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
QUESTION = "Describe the image in one sentence."
GOALS = {"prefill": 0.8, "reducers_speedup": 50.0, "reducers_vit_share": 0.02, "throughput": 3.0}


class Run:
    """Device, dtype and sizes of this run (the real ones, or reduced for --dry-run)."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.device = "cpu" if dry_run or not torch.cuda.is_available() else "cuda"
        self.dtype = torch.float32 if self.device == "cpu" else torch.float16
        self.shape = "tiny" if dry_run else "7b"
        self.repeats = 1 if dry_run else 5
        self.reducer_batch = 1 if dry_run else 32
        # a dry run checks the script, not the numerics (the CPU suite has those): each parity test
        # function once, on tiny LLaVA in fp32
        self.parity_filter = "(tiny_llava or batch_equals or vision_signals) and not float16 and not bfloat16"
        self.parity_filter = self.parity_filter if dry_run else ""
        self.batch = 2 if dry_run else 8

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any], repeats: int | None = None) -> float:
        """Median seconds of `repeats` calls after one warm-up, synchronised on CUDA."""
        fn()
        times = []
        for _ in range(repeats or self.repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def section_env(run: Run) -> dict[str, Any]:
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'unknown'})",
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "flash_attn_importable": importlib.util.find_spec("flash_attn") is not None,
        "dry_run": run.dry_run,
    }


def section_parity(run: Run, out: Path) -> dict[str, Any]:
    """tests/test_gpu.py under pytest; the dry run points it at the CPU (TOKENPRUNE_GPU_TEST_DEVICE)."""
    xml = out / "parity.xml"
    env = {**os.environ, "TOKENPRUNE_GPU_TEST_DEVICE": run.device}
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    if run.parity_filter:
        command += ["-k", run.parity_filter]
    done = subprocess.run(
        [*command, f"--junitxml={xml}", str(ROOT / "tests" / "test_gpu.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    suite = ElementTree.parse(xml).getroot().find("testsuite")
    failed = []
    for case in suite.iter("testcase"):
        problem = next((case.find(tag) for tag in ("failure", "error") if case.find(tag) is not None), None)
        if problem is not None:  # an Element without children is falsy: compare with None
            failed.append(f"{case.get('name')}: {problem.get('message', '')[:300]}")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed, "ok": done.returncode == 0}  # fmt: skip


def llava_adapter(run: Run, reducer: Any = None) -> Any:
    """A random-weight LLaVA at the run's shape, built on the device (no checkpoint on disk)."""
    from transformers import LlavaForConditionalGeneration

    from tokenprune.models.llava import LlavaAdapter
    from tokenprune.models.tiny import tiny_llava_parts

    config, processor = tiny_llava_parts(run.shape)
    config.text_config._attn_implementation = config.vision_config._attn_implementation = "sdpa"
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(run.dtype)
    try:
        with torch.device(run.device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return LlavaAdapter(model, processor, reducer=reducer)


def images(n: int, seed: int = 0) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((336, 336, 3)) * 255).astype("uint8")) for _ in range(n)]


# The reducer configs timed in the prefill section (those that read only vision-side signals), at
# their shipped settings; the cut inside the LLM is added at 50 % and 25 % after layer 2.
PREFILL_CONFIGS = (
    "none", "uniform", "pool", "downsample", "prumerge", "prumerge_plus", "prumerge_plus_fixed",
    "visionzip", "divprune", "vispruner",
)  # fmt: skip


def prefill_reducers(run: Run) -> dict[str, Any]:
    """The reducers timed in the prefill section: vision-side configs, and the cut inside the LLM."""
    from hydra.utils import instantiate

    from tokenprune.config import compose
    from tokenprune.reducers.keep_by_signal import KeepBySignal
    from tokenprune.reducers.sparsevlm import V15_KEEP, SparseVLM

    cut = 1 if run.dry_run else 2  # the tiny LLM has 2 layers
    reducers = {name: instantiate(compose([f"reducer={name}"]).reducer) for name in PREFILL_CONFIGS}
    reducers[f"llm_layer K={cut} keep 50%"] = KeepBySignal(layers=cut, keep=0.5)
    reducers[f"llm_layer K={cut} keep 25%"] = KeepBySignal(layers=cut, keep=0.25)
    # SparseVLM v1.5 "192": 309 / 204 / 113 visual tokens after its cuts
    sparse = (1,) if run.dry_run else (3, 7, 16)
    reducers["sparsevlm 192"] = SparseVLM(layers=sparse, keep=V15_KEEP[192][: len(sparse)])
    return reducers


def section_prefill(run: Run, adapter: Any) -> dict[str, Any]:
    from tokenprune.eval.flops import llm_shape, llm_stages, prefill_flops

    llm = llm_shape(adapter.model.config.text_config)
    image = images(1, seed=1)
    rows, base = [], None
    reducers = prefill_reducers(run)
    for name, reducer in reducers.items():
        adapter.reducer = reducer
        with torch.inference_mode():
            inputs = adapter.prepare([QUESTION], [image])
            timing: dict[str, Any] = {}
            adapter.generate([QUESTION], [image], max_new_tokens=1, timing=timing)
            seconds = run.timed(lambda inputs=inputs: adapter.logits(inputs))
        length = int(inputs.attention_mask.sum())
        visual = inputs.visual_tokens[0]
        after = (timing.get("layer_tokens") or [[]])[0]  # visual tokens after each in-LLM cut
        if reducer.space == "llm_layer":
            stages = llm_stages(llm, list(reducer.layers), [length, *(length - visual + k for k in after)])
            flops = prefill_flops(llm, stages)
        else:
            flops = prefill_flops(llm, length)
        base = base or (seconds, flops)
        rows.append({"reducer": name, "visual_tokens": visual, "layer_tokens": after, "prefill_ms": seconds * 1e3,
                     "measured_speedup": base[0] / seconds, "analytic_speedup": base[1] / flops})  # fmt: skip
    for row in rows:
        row["measured_over_analytic"] = row["measured_speedup"] / row["analytic_speedup"]
    adapter.reducer = reducers["none"]
    worst = min(row["measured_over_analytic"] for row in rows[1:])
    return {"rows": rows, "worst_ratio": worst, "goal": GOALS["prefill"], "ok": worst >= GOALS["prefill"]}


def section_reducers(run: Run) -> dict[str, Any]:
    import bench_reducers

    from tokenprune.reducers.prumerge import PruMerge, PruMergePlus

    tokens = bench_reducers.make_tokens(run.reducer_batch, run.device, run.dtype)
    vit = (
        bench_reducers.vit_forward_time(run.reducer_batch, run.device, run.dtype, run.repeats)
        if not run.dry_run
        else None
    )
    rows = []
    for name, reducer, plus in (("prumerge", PruMerge(), False), ("prumerge_plus", PruMergePlus(), True)):
        with torch.inference_mode():
            vector = run.timed(lambda r=reducer: r(tokens))
            loop = run.timed(lambda p=plus: bench_reducers.loop_reference_style(tokens, p), repeats=1)
        rows.append({"reducer": name, "batch": run.reducer_batch, "vector_ms": vector * 1e3, "loop_ms": loop * 1e3,
                     "speedup": loop / vector, "vit_ms": vit and vit * 1e3, "vit_share": vit and vector / vit})  # fmt: skip
    ok = all(r["speedup"] >= GOALS["reducers_speedup"] for r in rows) and all(
        r["vit_share"] is not None and r["vit_share"] <= GOALS["reducers_vit_share"] for r in rows
    )
    return {
        "rows": rows,
        "goals": {k: GOALS[k] for k in ("reducers_speedup", "reducers_vit_share")},
        "ok": ok,
    }


def section_throughput(run: Run, adapter: Any) -> dict[str, Any]:
    from tokenprune.reducers.prumerge import PruMerge

    adapter.reducer = PruMerge()
    batch = images(run.batch, seed=2)
    questions = [QUESTION] * run.batch
    with torch.inference_mode():
        _, kept = adapter.generate(questions, [[image] for image in batch], max_new_tokens=8)
        together = run.timed(
            lambda: adapter.generate(
                questions, [[image] for image in batch], max_new_tokens=8, min_new_tokens=8
            ),
            repeats=max(1, run.repeats // 2),
        )
        singles = run.timed(
            lambda: [
                adapter.generate([QUESTION], [[image]], max_new_tokens=8, min_new_tokens=8) for image in batch
            ],
            repeats=1,
        )
    ratio = singles / together
    return {"batch": run.batch, "visual_tokens": kept, "batch_s": together, "singles_s": singles,
            "speedup": ratio, "goal": GOALS["throughput"], "ok": ratio >= GOALS["throughput"]}  # fmt: skip


def section_lora(run: Run, adapter: Any) -> dict[str, Any]:
    from peft import LoraConfig

    from tokenprune.reducers.baselines import NoReduction
    from tokenprune.reducers.prumerge import PruMergePlus
    from tokenprune.train.lora import apply_lora

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")
    peft_model = apply_lora(adapter, lora)
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    batch = images(run.batch // 2, seed=3)
    rows = []
    for name, reducer in (("none", NoReduction()), ("prumerge_plus", PruMergePlus())):
        adapter.reducer = reducer

        def step() -> None:
            inputs = adapter.prepare(
                [QUESTION] * len(batch), [[image] for image in batch], answers=["a cat"] * len(batch)
            )
            adapter.loss(inputs).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if run.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = run.timed(step, repeats=max(1, run.repeats // 2))
        peak = torch.cuda.max_memory_allocated() / 2**30 if run.device == "cuda" else None
        rows.append({"reducer": name, "batch": len(batch), "step_s": seconds, "peak_gib": peak})
    return {"rows": rows, "trained_parameters": sum(p.numel() for p in trained), "ok": True}


def markdown(report: dict[str, Any]) -> str:
    env = report["sections"].get("env", {})
    lines = [
        f"# GPU check: {env.get('device', '?')}",
        "",
        f"`{report['command']}`, {report['wall_s']:.0f} s",
        "",
    ]
    for name, body in report["sections"].items():
        status = "error" if "error" in body else ("ok" if body.get("ok", True) else "below goal")
        lines += [f"## {name} ({status}, {body.get('seconds', 0):.0f} s)", ""]
        if "error" in body:
            lines += ["```", body["error"][-2000:], "```", ""]
            continue
        table = body.get("rows")
        if table:
            keys = list(table[0])
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row[k]) for k in keys) + " |" for row in table]
        else:
            lines += [f"* {k}: {_cell(v)}" for k, v in body.items() if k not in ("seconds",)]
        lines.append("")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check")
    parser.add_argument("--dry-run", action="store_true", help="CPU, reduced shapes: check the script itself")
    parser.add_argument("--only", nargs="*", help="run only these sections")
    args = parser.parse_args()
    run = Run(args.dry_run)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "sections": {}}
    adapter = None

    def shared_adapter() -> Any:
        nonlocal adapter
        adapter = adapter or llava_adapter(run)
        return adapter

    sections = {
        "env": lambda: section_env(run),
        "parity": lambda: section_parity(run, args.out),
        "reducers": lambda: section_reducers(run),
        "prefill": lambda: section_prefill(run, shared_adapter()),
        "throughput": lambda: section_throughput(run, shared_adapter()),
        "lora": lambda: section_lora(run, shared_adapter()),  # last: it puts LoRA layers on the model
    }
    for name, fn in sections.items():
        if args.only and name not in args.only:
            continue
        begin = time.perf_counter()
        try:
            body = fn()
        except Exception:  # record and go on: one short GPU window should give every figure it can
            body = {"error": traceback.format_exc()}
        body["seconds"] = time.perf_counter() - begin
        report["sections"][name] = body
        print(
            f"[gpu_check] {name}: {'error' if 'error' in body else 'done'} in {body['seconds']:.1f} s",
            flush=True,
        )
        report["wall_s"] = time.perf_counter() - started
        atomic_write_text(args.out / "report.json", json.dumps(report, indent=2, default=str))
        atomic_write_text(args.out / "report.md", markdown(report))
    print(f"[gpu_check] report: {args.out / 'report.md'}")
    return 1 if any("error" in body for body in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
