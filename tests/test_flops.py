"""Analytic FLOPs (tokenprune/eval/flops.py) and the efficiency meter's aggregation (eval/meter.py)."""

from __future__ import annotations

import inspect

import pytest

from tokenprune.eval import flops, meter
from tokenprune.reducers.baselines import AvgPool, NoReduction, UniformSample
from tokenprune.reducers.explain_mapper import ExplainMapper
from tokenprune.reducers.prumerge import PruMerge, PruMergePlus

# A shape small enough to count by hand: 2x2 patches of side 2, width 4; LLM width 8, 2 layers,
# 2 query heads sharing 1 key/value head (d_kv = 4), gated MLP of 16, vocabulary 10.
VISION = flops.VisionShape(depth=1, width=4, mlp_width=8, patches=4, patch_size=2)
LLM = flops.LlmShape(layers=2, width=8, mlp_width=16, heads=2, kv_heads=1, vocab=10)
SHAPE = flops.ModelShape(vision=VISION, llm=LLM)


def test_hand_computed_stages():
    # ViT: patch embedding 2 * N * (3 p^2) * C = 2*4*12*4; one layer over L = 5 tokens:
    # 2 L (4 C^2 + 2 C I) = 10 * (64 + 64) and 4 L^2 C = 4 * 25 * 4.
    assert flops.vit_flops(VISION) == 384 + 1280 + 400
    # CLIP signals, per image: q and k of all 5 tokens (2 * 5 * 2 * 16) + the CLS row of scores (2 * 5 * 4);
    # both PruMerge signals come from the same computation
    assert flops.signal_flops(SHAPE, ["vit_cls_attn"], images=1, text_tokens=3) == 320 + 40
    assert flops.signal_flops(SHAPE, ["vit_cls_attn", "vit_keys"], images=2, text_tokens=3) == 2 * 360
    assert flops.signal_flops(SHAPE, [], images=1, text_tokens=3) == 0
    # VisionZip's / VisPruner's feature-layer signals, per image: k of all 5 tokens (2 * 5 * 16), q of the
    # CLS row (2 * 16), its scores (2 * 5 * 4); heads and keys share it, the CLS feature is a read
    heads_keys = ["vit_cls_attn_heads", "vit_feat_keys", "vit_cls_feature"]
    assert flops.signal_flops(SHAPE, heads_keys, images=2, text_tokens=3) == 2 * (160 + 32 + 40)
    # the mapper's signal: LLM layer-0 q (d x d) and k (d x d_kv) over the unreduced 4 + 3 tokens,
    # 2 * 7 * (64 + 32), plus the 3 text rows' scores against all 7 columns, 2 * 3 * 7 * 8
    assert flops.signal_flops(SHAPE, ["llm_text_attn"], images=1, text_tokens=3) == 1344 + 336
    # the oracle's relevance: forward + backward of the unreduced prompt, 3 x its prefill
    assert flops.signal_flops(SHAPE, ["relevance"], 1, 3) == 3 * flops.prefill_flops(LLM, 7)
    with pytest.raises(ValueError, match="no FLOPs formula"):
        flops.signal_flops(SHAPE, ["mystery"], 1, 3)
    # one token through one layer: 2 (2 d^2 + 2 d d_kv + 3 d m) = 2 (128 + 64 + 384)
    assert LLM.linear_flops_per_token == 1152
    # prefill of S = 6: 2 layers * (6 * 1152 + 4 * 36 * 8) + head 2 * 8 * 10
    assert flops.prefill_flops(LLM, 6) == 2 * (6912 + 1152) + 160
    # one decode step against 7 cached tokens: 2 * (1152 + 4 * 7 * 8) + 160
    assert flops.decode_step_flops(LLM, 7) == 2 * (1152 + 224) + 160
    assert flops.projector_flops(4, 8, tokens=2) == 2 * 2 * (32 + 64)


def test_reducer_costs():
    """Each reducer reports its own cost; eval/flops.py has no table of reducer classes."""
    assert flops.reducer_flops(NoReduction(), n=4, kept=4, width=4) == 0
    assert flops.reducer_flops(UniformSample(keep=2), n=4, kept=2, width=4) == 0
    assert flops.reducer_flops(AvgPool(keep=1), n=4, kept=1, width=4) == 16
    # 2 M N C + 2 M k C + 2 N C with M = 2 centres (+ the extra token), k = 2 neighbours
    assert flops.reducer_flops(PruMerge(knn_k=2), n=4, kept=3, width=4) == 64 + 32 + 32
    assert (
        flops.reducer_flops(PruMergePlus(knn_k=9), n=4, kept=3, width=4) == 64 + 48 + 32
    )  # k capped at N - 1
    assert PruMerge(merge="none").flops(4, 3, 4) == 32  # the extra token only
    mapper = ExplainMapper(ratio=0.5)
    assert flops.reducer_flops(mapper, n=10, kept=5, width=4) == 2 * mapper.net.macs_per_token() * 10 + 20
    source = inspect.getsource(flops)
    assert "__name__" not in source and "PruMerge" not in source.split('"""', 2)[2]

    class Unknown:
        pass

    assert flops.reducer_flops(Unknown(), 4, 2, 4) is None


def test_sample_flops_adds_the_stages_from_actual_counts():
    out = flops.sample_flops(
        SHAPE,
        PruMerge(knn_k=2),
        ["vit_cls_attn", "vit_keys"],
        "vision",
        images=1,
        visual_tokens=2,
        text_tokens=4,
        new_tokens=3,
    )
    decode = flops.decode_step_flops(LLM, 7) + flops.decode_step_flops(LLM, 8)  # 2 steps after the prefill
    assert out["vit"] == 2064 and out["signals"] == 360 and out["reducer"] == 80
    assert out["projector"] == 384 and out["prefill"] == 16288 and out["decode"] == decode == 5888
    assert out["decode_steps"] == 2
    assert out["total"] == 2064 + 360 + 80 + 384 + 16288 + 5888
    assert out["prefill_full"] == flops.prefill_flops(LLM, 4 + 4)
    # an LLM-space reducer projects every patch
    llm_space = flops.sample_flops(
        SHAPE, NoReduction(), [], "llm", images=2, visual_tokens=8, text_tokens=4, new_tokens=1
    )
    assert llm_space["projector"] == flops.projector_flops(4, 8, 8) and llm_space["decode"] == 0
    unknown = flops.sample_flops(SHAPE, object(), [], "vision", 1, 2, 4, 1)
    assert unknown["reducer"] is None and unknown["total"] is None


# PruMerge Table 2 (FP16): LLM prefill TFLOPs of LLaVA-1.5 and of LLaVA-1.5 + PruMerge (~32 tokens).
PAPER_TABLE2 = {"7b": (9.3, 0.91), "13b": (18.2, 1.80)}
# The prompt lengths the paper's roofline must have used (it does not state them): solving our prefill
# formula for the sequence length gives 698 = 576 visual + 122 text for the full rows and 70 = 32 + 38
# for the PruMerge rows (7B; 13B gives 701 and 71): the two rows assumed different text lengths.
PAPER_PROMPT = {"full": 576 + 122, "prumerge": 32 + 38}


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_prumerge_paper_table2_prefill(size):
    """Both rows of PruMerge's Table 2 within 2 % at the stated prompt lengths."""
    llm = {"7b": flops.LLAVA15_7B, "13b": flops.LLAVA15_13B}[size].llm
    full, pruned = PAPER_TABLE2[size]
    assert flops.prefill_flops(llm, PAPER_PROMPT["full"]) == pytest.approx(full * 1e12, rel=0.02)
    assert flops.prefill_flops(llm, PAPER_PROMPT["prumerge"]) == pytest.approx(pruned * 1e12, rel=0.02)
    # one shared text length cannot give both rows: 40 text tokens misses the full row by > 10 %
    assert abs(flops.prefill_flops(llm, 576 + 40) / (full * 1e12) - 1) > 0.1


def test_prefill_formula_and_vit_at_llava15_7b():
    llm = flops.LLAVA15_7B.llm
    # prefill is ~ 2 x (LLM projection parameters) x tokens, plus the quadratic attention term
    params = llm.layers * llm.linear_flops_per_token // 2
    assert params == pytest.approx(6.48e9, rel=0.01)
    full = flops.prefill_flops(llm, 616)
    assert full == 2 * params * 616 + llm.layers * 4 * 616**2 * 4096 + 2 * 4096 * llm.vocab
    # the vision tower (23 of CLIP-L/336's 24 layers) is ~0.37 TFLOPs per image
    assert flops.vit_flops(flops.LLAVA15_7B.vision) == pytest.approx(0.366e12, rel=0.01)
    # signals at 7B: the mapper's LLM layer-0 q/k over 576 + 40 tokens (~41 GFLOPs) vs PruMerge's CLIP q/k (~2.4)
    shape = flops.LLAVA15_7B
    assert flops.signal_flops(shape, ["llm_text_attn"], 1, 40) == pytest.approx(41.4e9, rel=0.01)
    assert flops.signal_flops(shape, ["vit_cls_attn", "vit_keys"], 1, 40) == pytest.approx(2.42e9, rel=0.01)


def test_shape_from_llava_config(tiny_llava):
    shape = meter.model_shape(tiny_llava)
    assert shape.vision.patches == 576 and shape.vision.depth == 2  # feature layer -2 of 3
    assert shape.llm.layers == 2 and shape.llm.kv_width == 32
    tiny_llava.reducer = PruMerge()
    assert meter.model_shape(tiny_llava).vision.depth == 2  # signal layer input = layer 2 too


def _record(task, doc_id, kept, batch, **extra):
    return {
        "task": task,
        "doc_id": doc_id,
        "answer": "a",
        "visual_tokens": kept,
        "images": 1,
        "text_tokens": 10,
        "new_tokens": 3,
        "batch": batch,
        **extra,
    }


def test_meter_summarizes_records(tiny_llava):
    b1 = {
        "id": "r-0-0",
        "size": 2,
        "encode_ms": 10.0,
        "prefill_ms": 20.0,
        "decode_ms": 8.0,
        "decode_steps": 2,
        "total_ms": 40.0,
        "timer": "wall_clock",
    }
    b2 = {
        **b1,
        "id": "r-0-1",
        "size": 1,
        "encode_ms": 4.0,
        "prefill_ms": 6.0,
        "decode_ms": 4.0,
        "total_ms": 20.0,
    }
    records = [
        _record("t", 0, 100, b1),
        _record("t", 1, 140, b1),
        _record("t", 2, 30, b2, resumed=True),
        {"task": "t", "doc_id": 3, "failed": "OSError: x", "visual_tokens": 0},
    ]
    eff = meter.summarize(records, tiny_llava)
    assert (eff["eff/samples"], eff["eff/failed_samples"], eff["eff/resumed_samples"]) == (4, 1, 1)
    assert eff["eff/visual_tokens_mean"] == pytest.approx(90) and eff["eff/visual_tokens_min"] == 30
    hist = eff["eff/visual_tokens_hist"]
    assert sum(hist["counts"]) == 3 and hist["edges"][0] == 0 and hist["edges"][-1] > 140
    assert eff["eff/batches"] == 2 and eff["eff/batch_size_mean"] == 1.5
    assert eff["eff/prefill_ms_mean"] == 13.0 and eff["eff/ttft_ms_mean"] == 20.0
    assert eff["eff/decode_ms_per_token"] == pytest.approx(12.0 / 4)
    assert eff["eff/samples_per_s"] == pytest.approx(1000 * 3 / 60)
    shape = meter.model_shape(tiny_llava)
    prefill = [flops.prefill_flops(shape.llm, k + 10) for k in (100, 140, 30)]
    assert eff["eff/flops_prefill_mean"] == pytest.approx(sum(prefill) / 3)
    assert eff["eff/prefill_flops_ratio"] == pytest.approx(
        sum(prefill) / (3 * flops.prefill_flops(shape.llm, 586))
    )
    assert eff["eff/flops_reducer_mean"] == 0  # no reducer on this adapter


def test_histogram_edges():
    assert meter.histogram([]) == {"edges": [], "counts": []}
    h = meter.histogram([0, 1, 15, 16], bins=16)  # width ceil(17 / 16) = 2
    assert h["edges"][:3] == [0, 2, 4] and h["edges"][-1] >= 17
    assert h["counts"][0] == 2 and h["counts"][7] == 1 and h["counts"][8] == 1 and sum(h["counts"]) == 4
