"""Lightning callbacks of the training stages."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger("tokenprune.train")
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
