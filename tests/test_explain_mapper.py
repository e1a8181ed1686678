"""The mapper net, its target and loss, its files, the label shards, its training stage (overfits a
small label set), and the configs of labels / train=mapper / the two reducers."""

import inspect
import json

import pytest
import torch
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from tokenprune.config import compose
from tokenprune.explain.labels import is_correct
from tokenprune.explain.mapper_train import kl_loss, make_target, topk_recall
from tokenprune.explain.shards import LabelRecord, ShardWriter, read_labels, summarize
from tokenprune.reducers.explain_mapper import (
    ExplainMapper,
    MapperConfig,
    MapperNet,
    load_mapper,
    save_mapper,
)
from tokenprune.types import LLM_TEXT_ATTN, VisualTokens


def attention_like(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 2).softmax(0)


def test_paper_architecture_size_and_any_length():
    net = MapperNet()
    assert sum(p.numel() for p in net.parameters()) == 177_541  # notes §5: 177.5K at kernel 3, no norm
    assert len(net.blocks) == 5 and net.blocks[-1].pointwise.out_channels == 512
    assert net.macs_per_token() == 177_541 - sum(p.numel() for n, p in net.named_parameters() if "bias" in n)
    for n in (1, 7, 576, 2304):  # fully convolutional: any token count
        logits = net(attention_like(n, n)[None])
        assert logits.shape == (1, n) and bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("scaling", ["zscore", "mean", "max", "none"])
@pytest.mark.parametrize("norm", ["none", "layer"])
def test_padding_does_not_leak(scaling, norm):
    torch.manual_seed(0)
    net = MapperNet(MapperConfig(kernel_size=5, norm=norm, input_scaling=scaling, activation="relu"))
    rows = [attention_like(n, n) for n in (50, 33, 12)]
    x = torch.zeros(3, 50)
    mask = torch.zeros(3, 50, dtype=torch.bool)
    for i, r in enumerate(rows):
        x[i, : r.numel()], mask[i, : r.numel()] = r, True
    batched = net(x, mask)
    for i, r in enumerate(rows):
        torch.testing.assert_close(batched[i, : r.numel()], net(r[None])[0], rtol=1e-5, atol=1e-5)
        assert bool(torch.isinf(batched[i, r.numel() :]).all())


def test_scaling_makes_the_mapper_invariant_to_the_attention_scale():
    net = MapperNet()
    x = attention_like(100, 1)[None]
    torch.testing.assert_close(net(x), net(x * 7.5), rtol=1e-4, atol=1e-4)


def test_config_rejects_open_choices_it_does_not_know():
    for bad in ({"kernel_size": 4}, {"activation": "tanh"}, {"norm": "batch"}, {"input_scaling": "log"}):
        with pytest.raises(ValueError):
            MapperConfig(**bad)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(3)
    net = MapperNet(MapperConfig(channels=[8, 16], kernel_size=5))
    folder = save_mapper(net, tmp_path / "m", {"metrics": {"train/loss": 0.5}})
    loaded, meta = load_mapper(folder / "mapper.safetensors")
    assert meta["net"]["channels"] == [8, 16] and meta["info"]["metrics"]["train/loss"] == 0.5
    x = attention_like(40, 2)[None]
    assert torch.equal(loaded(x), net(x))
    reducer = ExplainMapper(checkpoint=str(folder), ratio=0.25)
    tokens = VisualTokens(torch.randn(1, 40, 8), (5, 8), {LLM_TEXT_ATTN: x})
    want = torch.sort(net(x)[0], descending=True, stable=True).indices[:10].sort().values
    assert torch.equal(reducer(tokens).index[0], want)
    fresh = ExplainMapper(ratio=0.25).load(folder)
    assert torch.equal(fresh(tokens).index, reducer(tokens).index)
    with pytest.raises(FileNotFoundError, match="not a saved explainability mapper"):
        load_mapper(tmp_path)


def test_reducer_budget_and_batched_mode():
    tokens = VisualTokens(torch.randn(3, 48, 4), (6, 8), {LLM_TEXT_ATTN: torch.rand(3, 48).softmax(-1)})
    assert ExplainMapper(ratio=0.25)(tokens).lengths.tolist() == [12, 12, 12]
    assert ExplainMapper(ratio=0.25, keep=5)(tokens).lengths.tolist() == [5, 5, 5]  # keep overrides ratio
    out = ExplainMapper(ratio=0.5)(tokens)
    assert bool((out.index.diff(dim=-1) > 0).all())  # original order
    batched = ExplainMapper(ratio=0.5, batch_invariant=False)(tokens)
    assert (batched.index == out.index).float().mean() > 0.95  # may differ only at near-ties
    with pytest.raises(ValueError, match="needs the `llm_text_attn` signal of the LLM input"):
        ExplainMapper(ratio=0.5)(VisualTokens(tokens.features, (6, 8), {}))


def test_one_mapper_per_modality(tmp_path):
    """video_checkpoint: the adapters reduce video tokens with `for_modality("video")`, which scores with
    the video mapper and shares the budget; without it videos use the image mapper."""
    nets = {}
    for seed, kind in ((1, "image"), (2, "video")):
        torch.manual_seed(seed)
        nets[kind] = MapperNet(MapperConfig(channels=[8, 16]))
        save_mapper(nets[kind], tmp_path / kind)
    x = attention_like(40, 4)[None]
    tokens = VisualTokens(torch.randn(1, 40, 8), (5, 8), {LLM_TEXT_ATTN: x})
    reducer = ExplainMapper(
        checkpoint=str(tmp_path / "image"), video_checkpoint=str(tmp_path / "video"), ratio=0.25
    )
    for kind in ("image", "video"):
        want = torch.sort(nets[kind](x)[0], descending=True, stable=True).indices[:10].sort().values
        assert torch.equal(reducer.for_modality(kind)(tokens).index[0], want)
    reducer.keep = 4  # the video mapper follows the reducer's settings
    assert reducer.for_modality("video")(tokens).lengths.tolist() == [4]
    single = ExplainMapper(checkpoint=str(tmp_path / "image"), ratio=0.25)
    assert single.for_modality("video") is single
    with pytest.raises(ValueError, match="modality"):
        single.for_modality("audio")


def test_target_and_loss():
    relevance = torch.tensor([0.1, 0.5, 0.0, 0.3, 0.2, 0.4])
    target = make_target(relevance, keep=0.5)
    assert torch.allclose(target, torch.tensor([0, 0.5, 0, 0.3, 0, 0.4]) / 1.2)
    assert torch.allclose(make_target(torch.zeros(4), keep=0.5), torch.tensor([0.5, 0.5, 0, 0]))
    soft = make_target(relevance, keep=0.5, norm="softmax")
    assert torch.allclose(soft.sum(), torch.tensor(1.0)) and (soft > 0).sum() == 3
    mask = torch.tensor([[True] * 6 + [False] * 2])
    padded = torch.cat([target, torch.zeros(2)])[None]
    exact = torch.log(padded.clamp_min(1e-30)).masked_fill(~mask, float("-inf"))
    assert float(kl_loss(exact, padded, mask)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(1, 8).masked_fill(~mask, float("-inf"))
    want = float((target[target > 0] * (target[target > 0] * 6).log()).sum())
    assert float(kl_loss(uniform, padded, mask)) == pytest.approx(want, rel=1e-5)
    assert topk_recall(relevance, relevance) == 1.0 and topk_recall(-relevance, relevance) == 0.0


def test_answer_matching():
    assert is_correct("Red.", "red") and is_correct("the circle", "a circle")
    assert not is_correct("red circle", "red") and is_correct("a red circle", "red", "contains")
    assert not is_correct("reddish", "red", "contains")


def synthetic_records(count: int, seed: int = 0) -> list[LabelRecord]:
    """Relevance = a local, nonlinear function of the attention (learnable by a small conv net)."""
    records = []
    for i in range(count):
        n = 48 + 8 * (i % 3)  # variable lengths: padding in every batch
        attn = attention_like(n, seed + i)
        smooth = torch.nn.functional.avg_pool1d(attn[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
        relevance = smooth.roll(1) ** 2
        records.append(LabelRecord(f"s{i}", f"s{i}", attn, relevance, (1, 1, n), "x"))
    return records


def test_shards_round_trip_and_resume_bookkeeping(tmp_path):
    writer = ShardWriter(tmp_path, shard_size=2, meta={"model": "m"})
    records = synthetic_records(5)
    writer.add(records[:3])  # one shard of 3 (flushed when the buffer reaches 2)
    writer.skip("bad", "wrong_answer", answer="no")
    writer.add(records[3:])
    writer.close()
    back = read_labels([tmp_path])
    assert [r.id for r in back] == [r.id for r in records]
    for got, want in zip(back, records):
        assert torch.equal(got.text_attn, want.text_attn) and torch.equal(got.relevance, want.relevance)
        assert got.grid == want.grid
    again = ShardWriter(tmp_path, shard_size=2)
    assert again.done_samples() == {r.sample for r in records} | {"bad"} and again.next_shard == 2
    summary = summarize(tmp_path)
    assert summary["records"] == 5 and summary["skipped_by_reason"] == {"wrong_answer": 1}


def stage_config(labels, out, *overrides):
    return compose(
        [
            "reducer=explain_mapper",
            "train=mapper",
            f"paths.outputs={out}",
            f"train.labels=[{labels}]",
            "train.trainer.accelerator=cpu",
            "train.trainer.enable_progress_bar=false",
            "train.data.val_fraction=0",
            *overrides,
        ],
        "train",
    )


@pytest.mark.slow
def test_mapper_overfits_a_small_label_set(tmp_path):
    labels = tmp_path / "labels"
    writer = ShardWriter(labels, shard_size=4)
    writer.add(synthetic_records(8))
    writer.close()
    cfg = stage_config(
        labels,
        tmp_path,
        "train.data.batch_size=8",
        "train.trainer.max_epochs=150",
        "train.optim.lr=5e-3",
        "train.trainer.log_every_n_steps=20",
    )
    stage = instantiate(cfg.train)
    outcome = stage.fit(None, tmp_path / "stage", seed=0)
    metrics = outcome.metrics
    assert metrics["train/steps"] == 150 and metrics["train/records"] == 8
    assert metrics["train/loss"] < 0.1 * metrics["train/loss_first"], metrics
    assert metrics["train/fit_topk_recall"] > 0.85 > 0.7 > metrics["train/fit_topk_recall_attention"], metrics
    _, meta = load_mapper(outcome.adapter_dir)
    assert meta["info"]["metrics"]["train/loss"] == metrics["train/loss"]
    assert (tmp_path / "stage" / "checkpoints" / "last.ckpt").is_file()
    # a rerun with resume=auto finds the finished stage and does not fit again
    assert (
        stage.fit(None, tmp_path / "stage", seed=0).metrics
        == json.loads((outcome.adapter_dir / "mapper.json").read_text())["info"]["metrics"]
    )


def test_mapper_stage_refuses_another_reducer(tmp_path):
    cfg = stage_config(tmp_path, tmp_path, "reducer=random")
    with pytest.raises(Exception, match="reducer=explain_mapper"):  # hydra wraps the ValueError
        instantiate(cfg.train)
    with pytest.raises(FileNotFoundError, match=r"tokenprune\.label"):
        instantiate(stage_config(tmp_path / "none", tmp_path).train).fit(None, tmp_path / "s")


def bind(node) -> None:
    container = OmegaConf.to_container(node, resolve=True)
    target = get_method(container.pop("_target_"))
    inspect.signature(target).bind_partial(**{k: v for k, v in container.items() if not k.startswith("_")})
    for value in node.values():
        if OmegaConf.is_dict(value) and "_target_" in value:
            bind(value)


@pytest.mark.parametrize("source", ["instruct_fixture", "llava_json", "shapes"])
def test_label_configs_compose_and_bind(source, tmp_path):
    cfg = compose([f"source={source}", f"paths.outputs={tmp_path}", "model=tiny_llava"], "label")
    bind(cfg.label)
    bind(cfg.source)
    assert cfg.label.output_dir == f"{tmp_path}/labels/tiny_llava/{source}"
    assert cfg.label.only_correct is True  # the paper's filter is the default
    instantiate(cfg.source)
    train = compose(
        ["model=tiny_llava", "reducer=explain_mapper", "train=mapper", f"paths.outputs={tmp_path}"], "train"
    )
    assert train.train.labels == [f"{tmp_path}/labels/tiny_llava"]  # every label set of the model
    assert OmegaConf.to_container(train.reducer.net) == OmegaConf.to_container(train.train.net)
