"""Generic Lightning pieces every training stage uses (`train=lora*`, `train=mapper`).

`TrainerSettings` is `train.trainer`; `build_trainer` makes the Lightning Trainer from it (CSV logger,
plus wandb; `checkpoints/last.ckpt` every n steps and at the end; SLURM auto-requeue); `resolve_resume`
reads `train.resume`; `FitResult` is what a fit hands to the evaluation that follows. The callbacks
(`CheckpointAtEnd`, `ProgressLog`) and `quiet_lightning` live here too. Nothing here knows LoRA, the
mapper or a model family: the stages in `tokenprune.train.lora` and `tokenprune.explain.mapper_train`
build on it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger("tokenprune.train")


@dataclass
class TrainerSettings:
    """`train.trainer`: how Lightning runs the fit.

    Attributes:
        accelerator: auto | cpu | gpu.
        devices: devices per node (an int, or "auto").
        num_nodes: nodes.
        strategy: auto | ddp | ddp_spawn | a Strategy object (the fsdp/deepspeed train configs).
        precision: 32-true | bf16-mixed | 16-mixed | bf16-true ...
        accumulate_grad_batches: micro-batches per optimizer step.
        max_steps: optimizer steps (-1: from max_epochs).
        max_epochs: epochs (used when max_steps is -1).
        gradient_clip_val: clip the gradient norm (None: off).
        gradient_checkpointing: recompute the LLM's activations in the backward (memory for time).
        log_every_n_steps: logging interval.
        checkpoint_every_n_steps: write checkpoints/last.ckpt every this many optimizer steps.
        enable_progress_bar: Lightning's progress bar; off, a line every `log_every_n_steps` steps with
            the loss, speed and ETA (`ProgressLog`).
        slurm_requeue: under SLURM, requeue the job on the preemption/timeout signal (a checkpoint
            is saved first; `train.resume=auto` picks it up).
    """

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    max_steps: int = -1
    max_epochs: int | None = 1
    gradient_clip_val: float | None = None
    gradient_checkpointing: bool = False
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 500
    enable_progress_bar: bool = True
    slurm_requeue: bool = True


@dataclass
class FitResult:
    """What a fit leaves behind: `train/*` metrics and the saved adapter folder (rank 0)."""

    metrics: dict[str, float]
    adapter_dir: Path
    is_global_zero: bool = True
    evaluates: bool = True  # this process runs the evaluation that follows
    finished: bool = True  # False: stopped before max_steps/max_epochs (nothing saved in adapter/)
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_resume(resume: str | None, output_dir: Path) -> str | None:
    """`train.resume`: auto (the newest of checkpoints/last*.ckpt and a SLURM hpc_ckpt_*.ckpt, if any),
    null (start fresh) or a checkpoint path."""
    if resume in (None, "none", "null", False):
        return None
    if resume == "auto":
        found = [
            *Path(output_dir, "checkpoints").glob("last*.ckpt"),
            *Path(output_dir).glob("hpc_ckpt_*.ckpt"),
        ]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"train.resume={resume!r}: no checkpoint there (use auto, null or a .ckpt path)"
        )
    return str(path)


def build_trainer(
    settings: TrainerSettings, output_dir: Path, logger: Any = None, callbacks: list | None = None
):
    """A Lightning Trainer from `train.trainer`: CSV logger (+ wandb), last.ckpt every n steps, SLURM requeue."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    quiet_lightning()
    loggers = [CSVLogger(save_dir=str(output_dir), name="logs")]
    if callable(logger):  # a partial logger from train/logger (e.g. wandb, offline by default)
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
        loggers.append(logger(save_dir=str(output_dir / "logs")))
    checkpoint = ModelCheckpoint(
        dirpath=str(output_dir / "checkpoints"),
        every_n_train_steps=settings.checkpoint_every_n_steps,
        save_top_k=0,
        save_last=True,
        save_on_exception=True,
    )
    plugins = [SLURMEnvironment(auto_requeue=settings.slurm_requeue)] if SLURMEnvironment.detect() else []
    return L.Trainer(
        accelerator=settings.accelerator,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        strategy=settings.strategy,
        precision=settings.precision,
        accumulate_grad_batches=settings.accumulate_grad_batches,
        max_steps=settings.max_steps,
        max_epochs=settings.max_epochs,
        gradient_clip_val=settings.gradient_clip_val,
        log_every_n_steps=settings.log_every_n_steps,
        enable_progress_bar=settings.enable_progress_bar,
        enable_model_summary=False,
        default_root_dir=str(output_dir),  # SLURM's hpc_ckpt_*.ckpt lands here
        use_distributed_sampler=False,  # the DataModule's sampler is rank-aware and resumable
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=loggers,
        callbacks=[
            checkpoint,
            CheckpointAtEnd(output_dir / "checkpoints"),
            LearningRateMonitor(logging_interval="step"),
            *([] if settings.enable_progress_bar else [ProgressLog(settings.log_every_n_steps)]),
            *(callbacks or []),
        ],
        plugins=plugins,
    )


# Library notices a user of this project cannot act on: Lightning's adverts for its cloud products and
# deprecation warnings raised inside Lightning / transformers code (not ours).
_ADVERT = "💡 Tip:"
_LIBRARY_DEPRECATIONS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"`is_gradient_checkpointing` is deprecated",
)


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_ADVERT)


def quiet_lightning() -> None:
    """Drop Lightning's product adverts and library-internal deprecation warnings from a fit's output."""
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _not_an_advert not in logger.filters:
            logger.addFilter(_not_an_advert)
    for message in _LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message)


class CheckpointAtEnd(L.Callback):
    """Write `<dirpath>/last.ckpt` when a fit ends, finished or stopped early (should_stop, a signal).

    ModelCheckpoint writes last.ckpt only with its periodic checkpoints; this one makes the
    state at the end the one `train.resume=auto` continues from.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


class ProgressLog(L.Callback):
    """One log line every `every` optimizer steps: step, loss, learning rate, speed and ETA.

    The stage uses it when Lightning's progress bar is off (`train.trainer.enable_progress_bar=false`,
    e.g. `make run`), so a long fit is never silent; the line goes to the `tokenprune.train` logger
    (the console and the run folder's log under Hydra).
    """

    def __init__(self, every: int) -> None:
        self.every = max(1, int(every))
        self._start: tuple[float, int] | None = None  # (time, step) when this process began fitting
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step)
        total = trainer.max_steps if trainer.max_steps > 0 else "?"
        log.info("LoRA fit: step %d of %s", trainer.global_step, total)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every or not trainer.is_global_zero or self._start is None:
            return
        self._last_step = step
        started, first = self._start
        per_step = (time.monotonic() - started) / max(1, step - first)
        total = trainer.max_steps if trainer.max_steps > 0 else None
        losses = getattr(pl_module, "losses", None) or [float("nan")]
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        eta = f", ETA {_duration(per_step * (total - step))}" if total else ""
        log.info(
            "step %d/%s  loss %.4f  lr %.2e  %.2f s/step%s",
            step,
            total or "?",
            losses[-1],
            lr,
            per_step,
            eta,
        )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
