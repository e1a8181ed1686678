"""The LoRA stage on tiny_llava (CPU): what trains, a fit with PruMerge+ in the loop, overfitting,
resume, save/load, the eval hook, configs, and 2-process DDP through the entry point."""

import inspect
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import random_images
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tokenprune.config import PROJECT_ROOT, compose, group_options
from tokenprune.fitting import resolve_resume
from tokenprune.models.llava import LlavaAdapter
from tokenprune.reducers.prumerge import PruMerge, PruMergePlus
from tokenprune.stages import load_trained
from tokenprune.train.lora import LLM_LINEAR_LAYERS, apply_lora
from tokenprune.train.pipeline import stage_dir
from tokenprune.types import VIT_CLS_ATTN

FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "instruct"


def compose_lora(tiny_llava_path, outputs, *overrides, train="lora"):
    return compose(
        [
            "model=tiny_llava",
            f"model.path={tiny_llava_path}",
            "reducer=prumerge_plus",
            f"train={train}",
            f"paths.outputs={outputs}",
            "train.trainer.enable_progress_bar=false",
            "train.trainer.accelerator=cpu",
            *overrides,
        ],
        "train",
    )


def fit(cfg, output_dir=None, callbacks=None):
    stage = instantiate(cfg.train)

    def build(dtype):
        return instantiate(cfg.model, reducer=instantiate(cfg.reducer), **({"dtype": dtype} if dtype else {}))

    return stage.fit(build, output_dir or stage_dir(cfg), seed=cfg.seed, callbacks=callbacks)


def trained_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {**load_file(folder / "adapter_model.safetensors"), **load_file(folder / "projector.safetensors")}


class Probe(L.Callback):
    """Records, per training batch, whether dropout is in training mode, and the global step."""

    def __init__(self) -> None:
        self.dropout_training: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        modules = [m for m in pl_module.adapter.model.modules() if isinstance(m, torch.nn.Dropout)]
        self.dropout_training.append(bool(modules) and all(m.training for m in modules))


class Preempted(Exception):
    pass


class KillAt(L.Callback):
    """Raises after `step` optimizer steps, as a crash or a preemption would stop the process."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise Preempted(f"killed after step {trainer.global_step}")


def test_lora_on_llm_only_projector_trained_vision_frozen(tiny_llava_path):
    cfg = compose_lora(tiny_llava_path, "/tmp/unused")
    adapter = instantiate(cfg.model, reducer=instantiate(cfg.reducer))
    assert isinstance(adapter.reducer, PruMergePlus)
    apply_lora(adapter, instantiate(cfg.train.lora))
    names = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    lora = {n for n in names if "lora_" in n}
    assert lora and all(".language_model." in n for n in lora)
    layers = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert layers == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert names - lora == {
        n
        for n, _ in adapter.model.model.multi_modal_projector.named_parameters(
            prefix="model.multi_modal_projector"
        )
    }
    assert not any("vision_tower" in n or "embed_tokens" in n or "lm_head" in n for n in names)
    adapter.model.train()
    conversation = [("USER: <image>\nWhat color? ASSISTANT:", False), (" red</s>", True)]
    inputs = adapter.prepare_conversations([conversation], [random_images(1)])
    adapter.model(**inputs.as_kwargs()).loss.backward()
    for name, parameter in adapter.model.named_parameters():
        if "lora_B" in name or "multi_modal_projector" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        elif not parameter.requires_grad:
            assert parameter.grad is None, name


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llava_path):
    cfg = compose_lora(tiny_llava_path, "/tmp/unused", "train.lora.lora_dropout=0")
    conversation = [("USER: <image>\nWhat color? ASSISTANT:", False), (" red</s>", True)]
    images = [random_images(1, seed=5)]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation
        adapter = instantiate(cfg.model, reducer=instantiate(cfg.reducer))
        apply_lora(adapter, instantiate(cfg.train.lora), gradient_checkpointing=checkpointing)
        adapter.model.train()
        assert adapter.model.model.language_model.gradient_checkpointing == checkpointing
        adapter.model(**adapter.prepare_conversations([conversation], images).as_kwargs()).loss.backward()
        grads.append({n: p.grad for n, p in adapter.model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_paper_precision_path_runs_on_cpu(tiny_llava_path, tmp_path):
    """bf16 model + bf16-mixed autocast + gradient checkpointing (the paper settings), 2 steps."""
    cfg = compose_lora(
        tiny_llava_path,
        tmp_path,
        "train.trainer.max_steps=2",
        "train.model_dtype=bfloat16",
        "train.trainer.precision=bf16-mixed",
        "train.trainer.gradient_checkpointing=true",
    )
    result = fit(cfg)
    adapter = result.extra["trainer"].lightning_module.adapter
    assert adapter.model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert adapter.model.model.multi_modal_projector.linear_1.weight.dtype == torch.float32  # trained in fp32
    assert result.finished and torch.isfinite(torch.tensor(result.metrics["train/loss"]))
    projector = load_file(result.adapter_dir / "projector.safetensors")
    assert projector["linear_1.weight"].dtype == torch.float32


def test_wandb_logger_is_offline_and_needs_no_login(tiny_llava_path, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_lora(tiny_llava_path, tmp_path, "train.trainer.max_steps=1", "train/logger=wandb")
    result = fit(cfg)
    runs = list((result.adapter_dir.parent / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (result.adapter_dir.parent / "logs" / "version_0" / "metrics.csv").is_file()  # CSV as well


@pytest.fixture(scope="module")
def trained(tiny_llava_path, tmp_path_factory):
    """A 3-step fit with PruMerge+ in the loop (shared by the tests below)."""
    outputs = tmp_path_factory.mktemp("lora")
    cfg = compose_lora(tiny_llava_path, outputs, "train.trainer.max_steps=3")
    probe = Probe()
    before = instantiate(cfg.model).model.model.multi_modal_projector.linear_1.weight.clone()
    result = fit(cfg, callbacks=[probe])
    return cfg, result, probe, before


def test_fit_with_prumerge_plus_in_the_loop(trained):
    cfg, result, probe, projector_before = trained
    metrics = result.metrics
    assert result.finished and result.evaluates
    assert metrics["train/steps"] == 3 and metrics["train/world_size"] == 1
    assert metrics["train/samples"] == 6 and metrics["train/trainable_params"] > 0
    assert 0 < metrics["train/visual_tokens_mean"] < 577  # PruMerge+ kept a subset
    assert metrics["train/skipped_samples"] >= 1  # noreply-0006 at load (+ broken images read so far)
    assert probe.dropout_training and all(probe.dropout_training)  # .train() at fit start: LoRA dropout on
    folder = result.adapter_dir
    assert {p.name for p in folder.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "projector.safetensors",
        "train_info.json",
    }
    weights = trained_weights(folder)
    assert all(".language_model." in k for k in weights if "lora_" in k)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # B starts at zero
    assert not torch.equal(weights["linear_1.weight"], projector_before)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == cfg.train.lora.r and config["lora_alpha"] == cfg.train.lora.lora_alpha
    root = folder.parent
    assert (root / "checkpoints" / "last.ckpt").is_file()
    rows = (root / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "train/loss" in rows[0] and len(rows) >= 4
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["state_dict"] and all(
        "lora_" in k or "multi_modal_projector" in k for k in state["state_dict"]
    )
    assert state["InstructDataModule"] == {"epoch": 0, "batches": 3}


def test_saved_adapter_loads_to_identical_logits(trained, tiny_llava_path):
    cfg, result, _, _ = trained
    trained_adapter = result.extra["trainer"].lightning_module.adapter
    fresh = instantiate(cfg.model, reducer=instantiate(cfg.reducer))
    conversation = [("USER: <image>\nWhat color? ASSISTANT:", False), (" red</s>", True)]
    images = [random_images(1, seed=3)]
    with torch.no_grad():
        base = fresh.model(**fresh.prepare_conversations([conversation], images).as_kwargs()).logits
        load_trained(fresh, result.adapter_dir)
        want = trained_adapter.model(
            **trained_adapter.prepare_conversations([conversation], images).as_kwargs()
        )
        got = fresh.model(**fresh.prepare_conversations([conversation], images).as_kwargs())
    assert not fresh.model.training
    assert torch.equal(got.logits, want.logits)
    assert not torch.allclose(got.logits, base)  # the adapter changed the model


@pytest.mark.integration  # the eval entry point's run() on a fitted stage
def test_eval_entry_loads_train_adapter(trained, tiny_llava_path, tmp_path, monkeypatch):
    """`tokenprune.eval train=lora train.adapter=PATH` evaluates the model with the saved adapter."""
    from tokenprune.eval import runner

    _, result, _, _ = trained

    class Captured(Exception):
        pass

    def capture(adapter, benchmark, **kwargs):
        raise Captured(adapter)

    monkeypatch.setattr(runner, "evaluate", capture)
    cfg = compose_lora(tiny_llava_path, tmp_path, f"train.adapter={result.adapter_dir}")
    with pytest.raises(Captured) as caught:
        runner.run(cfg)
    adapter = caught.value.args[0]
    weights = trained_weights(result.adapter_dir)
    torch.testing.assert_close(
        adapter.model.model.multi_modal_projector.linear_1.weight, weights["linear_1.weight"]
    )
    assert any("lora_" in n for n, _ in adapter.model.named_parameters())


@pytest.mark.slow
def test_loss_decreases_when_overfitting_one_batch(tiny_llava_path, tmp_path):
    records = json.loads((FIXTURE / "llava_instruct.json").read_text())
    one_batch = [r for r in records if r["id"] in ("shapes-0001", "shapes-0008")]
    (tmp_path / "one_batch.json").write_text(json.dumps(one_batch))
    cfg = compose_lora(
        tiny_llava_path,
        tmp_path,
        f"train.data.json={tmp_path / 'one_batch.json'}",
        "train.trainer.max_steps=10",
        "train.optim.lr=1e-2",
        "train.optim.projector_lr=1e-3",
        "train.optim.schedule=constant",
        "train.optim.warmup_ratio=0",
        "train.lora.lora_dropout=0",
    )
    result = fit(cfg)
    losses = result.extra["trainer"].lightning_module.losses
    assert len(losses) == 10
    # The same batch every step: the loss falls monotonically by over a nat. (The tiny model's frozen
    # random lm_head, std 0.02 behind a final RMSNorm, caps the logit margin near 1.3, so ~5 nats
    # is the floor LoRA + projector can reach from ln(512) = 6.24.)
    assert all(b <= a + 1e-4 for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted(tiny_llava_path, tmp_path):
    """Killed after 3 of 7 steps (mid-epoch), rerun with train.resume=auto: the same weights as one run.

    Checkpoints every 2 steps, so the rerun continues from step 2 (data position, optimizer,
    schedule and dropout RNG restored) and crosses an epoch boundary (4 batches per epoch).
    """
    args = (
        "train.trainer.max_steps=7",
        "train.trainer.checkpoint_every_n_steps=2",
        "train.lora.lora_dropout=0.1",
    )
    cfg = compose_lora(tiny_llava_path, tmp_path, *args)
    straight = fit(cfg, tmp_path / "straight")
    with pytest.raises(Preempted):
        fit(cfg, tmp_path / "resumed", callbacks=[KillAt(3)])
    assert not (tmp_path / "resumed" / "adapter").exists()
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] in (2, 3)  # the periodic one, or the one saved on the exception
    resumed = fit(cfg, tmp_path / "resumed")
    assert resumed.finished and resumed.metrics["train/steps"] == 7
    want, got = trained_weights(straight.adapter_dir), trained_weights(resumed.adapter_dir)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    for key in ("train/loss", "train/loss_first", "train/visual_tokens_mean"):  # whole-run metrics
        torch.testing.assert_close(resumed.metrics[key], straight.metrics[key], rtol=1e-5, atol=1e-6, msg=key)
    assert len(resumed.extra["trainer"].lightning_module.losses) == 7  # both segments' micro-batches
    first_segment = checkpoint["tokenprune_progress"]["wall_s"]
    assert 0 < first_segment < resumed.metrics["train/wall_time_s"]  # time summed over the segments
    again = fit(cfg, tmp_path / "resumed")  # finished: not fitted again
    assert again.metrics == resumed.metrics and "trainer" not in again.extra


def test_resolve_resume(tmp_path):
    assert resolve_resume("auto", tmp_path) is None and resolve_resume(None, tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert resolve_resume("auto", tmp_path) == str(last)
    time.sleep(0.01)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # SLURM requeue checkpoint, newer
    hpc.write_bytes(b"x")
    assert resolve_resume("auto", tmp_path) == str(hpc)
    assert resolve_resume(str(last), tmp_path) == str(last)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_resume(str(tmp_path / "nope.ckpt"), tmp_path)


def bind_all(node) -> int:
    """Bind every `_target_` node (also inside lists) to its target's signature; returns how many."""
    count = 0
    if OmegaConf.is_dict(node):
        if "_target_" in node:
            container = OmegaConf.to_container(node, resolve=True)
            signature = inspect.signature(get_method(container.pop("_target_")))
            signature.bind_partial(**{k: v for k, v in container.items() if not k.startswith("_")})
            count += 1
        values = node.values()
    elif OmegaConf.is_list(node):
        values = list(node)
    else:
        return 0
    return count + sum(bind_all(v) for v in values)


@pytest.mark.parametrize(
    "overrides",
    [
        ["train=lora"],
        ["train=lora", "train/logger=wandb", "train/data=llava_mix665k"],
        ["train=lora_paper"],
        ["train=lora_paper_fsdp"],
        ["train=lora_paper_deepspeed"],
    ],
    ids=lambda o: " ".join(o),
)
def test_train_configs_compose_and_bind(overrides):
    cfg = compose(overrides, "train")
    assert bind_all(cfg.train) >= 5  # stage, lora, optim, trainer, data (+ logger, strategy)


def test_paper_recipe_config():
    cfg = compose(["train=lora_paper"], "train")
    train = OmegaConf.to_container(cfg.train, resolve=True)
    lora, optim, trainer, data = train["lora"], train["optim"], train["trainer"], train["data"]
    assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"]) == (128, 256, 0.05)
    assert (optim["lr"], optim["projector_lr"], optim["schedule"], optim["warmup_ratio"]) == (
        2e-4,
        2e-5,
        "cosine",
        0.03,
    )
    assert optim["weight_decay"] == 0 and trainer["max_epochs"] == 1 and trainer["max_steps"] == -1
    assert trainer["precision"] == "bf16-mixed" and trainer["gradient_checkpointing"]
    assert (
        trainer["num_nodes"] * trainer["devices"] * data["batch_size"] * trainer["accumulate_grad_batches"]
        == 128
    )
    assert data["json"].endswith("llava_v1_5_mix665k.json") and data["max_length"] == 2048
    fsdp = OmegaConf.to_container(compose(["train=lora_paper_fsdp"], "train").train.trainer.strategy)
    assert fsdp["_target_"].endswith("FSDPStrategy")
    assert "lora" in group_options("train") and "lora_paper" in group_options("train")
    assert (
        lora["target_modules"]
        == LLM_LINEAR_LAYERS
        == compose(["train=lora"], "train").train.lora.target_modules
    )


def test_stage_folder_ignores_run_only_keys(tiny_llava_path, tmp_path):
    base = stage_dir(compose_lora(tiny_llava_path, tmp_path))
    assert base.parent == tmp_path / "train" and base.name.startswith("tiny_llava-prumerge_plus-lora-")
    assert (
        stage_dir(compose_lora(tiny_llava_path, tmp_path, "train.resume=null", "train/logger=wandb")) == base
    )
    assert stage_dir(compose_lora(tiny_llava_path, tmp_path, "train.lora.r=4")) != base
    assert stage_dir(compose_lora(tiny_llava_path, tmp_path, "benchmark.limit=1")) == base


@pytest.mark.slow
@pytest.mark.integration
def test_ddp_two_cpu_processes_fit_then_evaluate(tiny_llava_path, tmp_path):
    """`python -m tokenprune.train ... strategy=ddp devices=2` on CPU (gloo): one result with train/* + bench/*."""
    command = [
        sys.executable,
        "-m",
        "tokenprune.train",
        "model=tiny_llava",
        f"model.path={tiny_llava_path}",
        "reducer=prumerge_plus",
        "benchmark=smoke",
        "train=lora",
        "train.trainer.accelerator=cpu",
        "train.trainer.devices=2",
        "train.trainer.strategy=ddp",
        "train.trainer.max_steps=2",
        "train.trainer.enable_progress_bar=false",
        "benchmark.limit=1",
        f"paths.outputs={tmp_path}",
    ]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = sorted((tmp_path / "results").glob("*.json"))
    assert len(results) == 1, results
    result = json.loads(results[0].read_text())
    metrics = result["metrics"]
    assert metrics["train/world_size"] == 2 and metrics["train/steps"] == 2
    assert metrics["train/skipped_samples"] >= 2  # at load + the broken images either rank read
    assert metrics["train/samples"] == 8  # 2 steps x 2 processes x batch 2
    assert any(k.startswith("bench/") for k in metrics)
    assert result["choices"]["train"] == "lora" and result["name"].startswith(
        "tiny_llava-prumerge_plus-smoke-lora-"
    )
    (stage,) = (tmp_path / "train").iterdir()
    assert (stage / "adapter" / "adapter_model.safetensors").is_file()
    print(f"DDP entry point: {time.monotonic() - started:.1f} s")


def test_batch_scope_iqr_pools_the_training_batch(tiny_llava_path):
    """reducer.iqr_scope=batch (reducer=prumerge_reference) in training: the inputs of a training batch are
    reduced in one call over all its images, so every image keeps floor(#outliers / B) tokens (+ the extra
    token) with the fence pooled over the batch, as the reference; the per-image scope keeps ragged counts."""
    conversation = [("USER: <image>\nWhat color? ASSISTANT:", False), (" red</s>", True)]
    images = random_images(3)
    kept = {}
    for scope in ("batch", "image"):
        adapter = LlavaAdapter.from_pretrained(
            tiny_llava_path, reducer=PruMerge(iqr_scope=scope), dtype="float32", device="cpu"
        )
        with torch.no_grad():
            kept[scope] = adapter.prepare_conversations(
                [conversation] * 3, [[image] for image in images]
            ).visual_tokens
            attention = adapter.visual_tokens(adapter.preprocess(images)).signals[VIT_CLS_ATTN]  # [3, N]
    values = attention.numpy().ravel()  # the reference: numpy percentiles over the whole batch
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    pooled = int((values > q3 + 1.5 * (q3 - q1)).sum())
    assert kept["batch"] == [pooled // 3 + 1] * 3
    assert len(set(kept["image"])) > 1, "the test needs images with different outlier counts"
