"""Lightning callbacks of the training stages."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class CheckpointAtEnd(L.Callback):
    """Write `<dirpath>/last.ckpt` when a fit ends, finished or stopped early (should_stop, a signal).

    ModelCheckpoint writes last.ckpt only with its periodic checkpoints; this one makes the
    state at the end the one `train.resume=auto` continues from.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)
