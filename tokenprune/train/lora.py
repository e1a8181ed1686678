"""The LoRA stage (`train=lora`): peft LoRA on the language model + the projector, reducer in the loop.

What is trained: LoRA weights on the LLM's linear layers (a regex on module names keeps them off
the vision tower, whose layers also have q_proj/k_proj/v_proj), and the whole projector with its
own learning rate. The vision tower and everything else stay frozen. The adapter's forward runs
the reducer, so the loss sees (and the projector's gradient flows through) the reduced tokens.

Outputs under the stage's folder (`train.output_dir`, default `outputs/train/<model>-<reducer>-<train>-<hash>`):

    adapter/        adapter_config.json + adapter_model.safetensors (peft save_pretrained),
                    projector.safetensors, train_info.json (written last: the stage is done)
    checkpoints/    last.ckpt (trained weights, optimizer, schedule, data position, RNG)
    logs/           CSV metrics (and wandb's offline run with train/logger=wandb)

Saving and loading the stage (`save_trained`, `load_trained`) live in `tokenprune.stages`, which the
evaluation uses too; the generic Lightning pieces (`TrainerSettings`, `build_trainer`, `resolve_resume`)
in `tokenprune.fitting`, which the mapper's stage uses too.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenprune.data.instruct import DataSettings
from tokenprune.fitting import FitResult, TrainerSettings, build_trainer, resolve_resume
from tokenprune.stages import INFO_FILE, load_trained, save_trained
from tokenprune.train.module import OptimSettings

log = logging.getLogger(__name__)

# All linear layers of the LLM except lm_head (LLaVA's LoRA targets); the vision tower never matches.
LLM_LINEAR_LAYERS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def apply_lora(adapter: Any, lora: Any, gradient_checkpointing: bool = False, upcast: bool = False) -> Any:
    """Put LoRA layers on adapter.model's LLM (in place) and unfreeze the projector; returns the PeftModel.

    Args:
        adapter: a model adapter (adapter.model is the transformers model).
        lora: a peft.LoraConfig.
        gradient_checkpointing: enable the LLM's gradient checkpointing (non-reentrant).
        upcast: keep the projector's trained weights in float32 (for mixed precision on a
            half-precision model; autocast casts them in the forward).
    """
    from peft import get_peft_model

    peft_model = get_peft_model(adapter.model, lora)  # freezes everything but the LoRA weights
    projector = adapter.projector()
    for parameter in projector.parameters():
        parameter.requires_grad_(True)
    if upcast:
        projector.float()
    if gradient_checkpointing:
        adapter.model.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return peft_model


class LoraStage:
    """`train=lora`: fit LoRA + projector with the reducer in the loop, save them, report `train/*`.

    Args:
        lora: a peft.LoraConfig (r, lora_alpha, lora_dropout, target_modules regex, ...).
        optim: optimizer and schedule (OptimSettings).
        trainer: Lightning settings (TrainerSettings).
        data: instruction data settings (DataSettings).
        logger: an extra logger factory (train/logger=wandb), called with save_dir; CSV is always on.
        adapter: a saved adapter folder to evaluate (`python -m tokenprune.eval`); set, the train
            entry point evaluates it without fitting.
        resume: auto | null | a checkpoint path (see resolve_resume).
        output_dir: the stage's folder (None: derived by the pipeline from the config).
        model_dtype: load the model in this dtype for training (None: the model config's).
    """

    def __init__(
        self,
        lora: Any,
        optim: OptimSettings,
        trainer: TrainerSettings,
        data: DataSettings,
        logger: Any = None,
        adapter: str | None = None,
        resume: str | None = "auto",
        output_dir: str | None = None,
        model_dtype: str | None = None,
    ) -> None:
        self.lora = lora
        self.optim = optim
        self.trainer = trainer
        self.data = data
        self.logger = logger
        self.adapter = adapter
        self.resume = resume
        self.output_dir = output_dir
        self.model_dtype = model_dtype

    def fit(
        self,
        build_adapter: Callable[[str | None], Any],
        output_dir: str | Path,
        seed: int = 0,
        callbacks: list | None = None,
    ) -> FitResult:
        """Fit (or finish, or skip when already done) and save; returns metrics and the adapter folder.

        Args:
            build_adapter: loads the model adapter (with its reducer) in the given dtype (None: default).
            output_dir: the stage's folder (checkpoints/, adapter/, logs/).
            seed: seeds LoRA's initialisation, the data order and dropout.
            callbacks: extra Lightning callbacks (tests).
        """
        import lightning as L

        from tokenprune.train.datamodule import InstructDataModule
        from tokenprune.train.module import LoraModule

        output_dir = Path(output_dir)
        adapter_dir = output_dir / "adapter"
        if self.resume == "auto" and (adapter_dir / INFO_FILE).is_file():
            info = json.loads((adapter_dir / INFO_FILE).read_text())
            log.info(
                "LoRA stage already finished in %s; not fitting again (train.resume=null redoes it)",
                output_dir,
            )
            zero = _is_global_zero()
            return FitResult(info["metrics"], adapter_dir, is_global_zero=zero, evaluates=zero)
        output_dir.mkdir(parents=True, exist_ok=True)
        L.seed_everything(seed, workers=True, verbose=False)
        adapter = build_adapter(self.model_dtype)
        if not adapter.capabilities.supports_training:
            raise ValueError(
                f"train=lora: the {adapter.capabilities.family} adapter does not support training yet "
                "(multi-turn conversation inputs are not implemented for it); use a llava model"
            )
        settings = self.trainer
        peft_model = apply_lora(
            adapter,
            self.lora,
            gradient_checkpointing=settings.gradient_checkpointing,
            upcast="mixed" in str(settings.precision),
        )
        module = LoraModule(adapter, peft_model, self.optim)
        data = InstructDataModule(
            self.data, adapter.tokenizer, image_tokens=adapter.image_token_budget() + 1, seed=seed
        )
        trainer = build_trainer(settings, output_dir, logger=self.logger, callbacks=callbacks)
        checkpoint = resolve_resume(self.resume, output_dir)
        if checkpoint is not None:
            log.info("resuming the LoRA stage from %s", checkpoint)
        from lightning.pytorch.plugins.environments import TorchElasticEnvironment

        launched_outside = TorchElasticEnvironment.detect()  # torchrun: every rank joins the evaluation
        # the DataModule checkpoints its position in the epoch (the DataLoader itself does not)
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
        trainer.fit(module, datamodule=data, ckpt_path=checkpoint)
        wall = module.wall_time()
        adapter.model.eval()
        skipped = data.skipped_at_load + module.skipped_counts()
        if skipped:
            log.warning("skipped %d broken instruction samples: %s", skipped.total(), dict(skipped))
        metrics = _fit_metrics(trainer, module, peft_model, self.data.batch_size, wall, skipped.total())
        finished = (
            trainer.global_step >= trainer.max_steps
            if trainer.max_steps > 0
            else trainer.current_epoch >= (trainer.max_epochs or 0)
        )
        if not finished:  # stopped early (signal, should_stop): the next run resumes
            log.warning(
                "the LoRA stage stopped at step %d before its end; rerun the same command to resume from %s",
                trainer.global_step,
                resolve_resume("auto", output_dir),
            )
        elif trainer.is_global_zero:
            info = {
                "metrics": metrics,
                "skipped": dict(skipped),
                "base_model": str(adapter.model.config.name_or_path),
                "reducer": type(adapter.reducer).__name__,
                "checkpoint": resolve_resume("auto", output_dir),
            }
            save_trained(peft_model, adapter, adapter_dir, info)
            log.info("saved the LoRA adapter and projector to %s", adapter_dir)
        if trainer.world_size > 1 and not launched_outside:
            _leave_process_group()  # rank 0 evaluates alone; the other ranks are done
        return FitResult(
            metrics,
            adapter_dir,
            is_global_zero=trainer.is_global_zero,
            evaluates=finished and (trainer.is_global_zero or launched_outside),
            finished=finished,
            extra={"trainer": trainer},
        )

    def load_trained(self, adapter: Any, path: str | Path) -> Any:
        """Put this stage's saved outputs on a freshly loaded adapter (see the module function)."""
        return load_trained(adapter, path)


def _fit_metrics(
    trainer: Any, module: Any, peft_model: Any, batch_size: int, wall: float, skipped: int
) -> dict[str, float]:
    """`train/*` metrics of a fit (this process's view; the losses of the micro-batches of the whole
    run, earlier segments of a resumed fit included, and its fitting time over all segments)."""
    accumulate = trainer.accumulate_grad_batches
    metrics = {
        "train/steps": float(trainer.global_step),
        "train/epochs": float(trainer.current_epoch),
        "train/samples": float(trainer.global_step * batch_size * trainer.world_size * accumulate),
        "train/world_size": float(trainer.world_size),
        "train/skipped_samples": float(skipped),
        "train/trainable_params": float(sum(p.numel() for p in peft_model.parameters() if p.requires_grad)),
        "train/wall_time_s": round(wall, 3),
    }
    if module.losses:
        metrics["train/loss"] = sum(module.losses[-accumulate:]) / len(module.losses[-accumulate:])
        metrics["train/loss_first"] = module.losses[0]
    if module.visual_tokens:
        metrics["train/visual_tokens_mean"] = sum(module.visual_tokens) / len(module.visual_tokens)
    return metrics


def _leave_process_group() -> None:
    """After a DDP fit started by Lightning's launcher: close the process group and its WORLD_SIZE."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 has saved the adapter
        dist.destroy_process_group()
    os.environ.pop("WORLD_SIZE", None)


def _is_global_zero() -> bool:
    return (
        int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) == 0
        and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0
    )
