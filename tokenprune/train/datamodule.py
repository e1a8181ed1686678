"""The instruction-data DataModule: LLaVA JSON -> length-grouped, per-rank, resumable batches."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from tokenprune.data.instruct import (
    DataSettings,
    InstructDataset,
    LengthGroupedSampler,
    collate,
    load_records,
)
from tokenprune.templates import get_template

log = logging.getLogger(__name__)


class InstructDataModule(L.LightningDataModule):
    """Batches of rendered conversations + PIL images; the adapter tokenizes and reduces in the forward.

    The sampler is rank-aware (the Trainer runs with `use_distributed_sampler=False`), and the
    position in the epoch is checkpointed (`state_dict`), so a resumed run continues with the
    next unseen batch instead of restarting the epoch.
    """

    def __init__(self, settings: DataSettings, tokenizer: Any, image_tokens: int, seed: int = 0) -> None:
        super().__init__()
        self.settings = settings
        self.tokenizer = tokenizer
        self.image_tokens = settings.image_tokens or image_tokens
        self.seed = seed
        self.dataset: InstructDataset | None = None
        self.sampler: LengthGroupedSampler | None = None
        self.position = (0, 0)  # (epoch, batches consumed in it)
        self._resume: tuple[int, int] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = InstructDataset(
                load_records(self.settings.json),
                image_root=self.settings.image_root,
                tokenizer=self.tokenizer,
                template=get_template(self.settings.template),
                max_length=self.settings.max_length,
                image_tokens=self.image_tokens,
            )

    @property
    def skipped_at_load(self) -> Counter[str]:
        return self.dataset.skipped if self.dataset is not None else Counter()

    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = self.trainer
        self.sampler = LengthGroupedSampler(
            self.dataset.lengths,
            batch_size=self.settings.batch_size,
            has_image=self.dataset.has_image,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            seed=self.seed,
            megabatch=self.settings.megabatch,
            group_by_length=self.settings.group_by_length,
        )
        if self._resume is not None:
            self.sampler.resume(*self._resume)
        workers = self.settings.num_workers
        return DataLoader(
            self.dataset,
            batch_size=self.settings.batch_size,
            sampler=self.sampler,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            # its own generator: creating the iterator does not draw from the global RNG, so a
            # resumed run's dropout stream matches an uninterrupted one
            generator=torch.Generator().manual_seed(self.seed),
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Called once per batch about to be trained on: track the position in the epoch."""
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        done = self.position[1] if self.position[0] == epoch else 0
        self.position = (epoch, done + 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.position[0], "batches": self.position[1]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))
        self.position = self._resume
        if self.sampler is not None:
            self.sampler.resume(*self._resume)
