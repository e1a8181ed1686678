"""The LightningModule of the LoRA stage: adapter forward with the reducer in the loop, param groups."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


@dataclass
class OptimSettings:
    """`train.optim`: AdamW with one group for the LoRA weights and one for the projector.

    Attributes:
        lr: learning rate of the LoRA weights (LLaVA-1.5 LoRA: 2e-4).
        projector_lr: learning rate of the projector (None: lr; LLaVA-1.5 LoRA: 2e-5).
        weight_decay: AdamW weight decay (LLaVA: 0).
        betas: AdamW betas.
        eps: AdamW epsilon.
        schedule: a transformers scheduler name: cosine | linear | constant_with_warmup | constant.
        warmup_ratio: warmup steps as a fraction of all optimizer steps (ceil, as transformers).
    """

    lr: float = 2e-4
    projector_lr: float | None = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_ratio: float = 0.03


class LoraModule(L.LightningModule):
    """Trains a LoRA-wrapped LLaVA adapter: the language model's LoRA weights and the projector.

    Args:
        adapter: the model adapter; its model already carries the LoRA layers (see lora.apply_lora).
        peft_model: the peft wrapper around adapter.model (registered here, so Lightning moves
            and wraps it; only requires_grad weights are checkpointed).
        optim: optimizer and schedule settings.
    """

    def __init__(self, adapter: Any, peft_model: torch.nn.Module, optim: OptimSettings) -> None:
        super().__init__()
        self.adapter = adapter  # not an nn.Module: the model is registered through peft_model
        self.peft_model = peft_model
        self.optim = optim
        self.strict_loading = False  # checkpoints hold only the trained weights
        self.losses: list[float] = []  # per micro-batch
        self.visual_tokens: list[float] = []  # per micro-batch, mean kept tokens per image sample
        self.skipped: dict[str, str] = {}  # sample id -> reason, found while reading samples
        self.wall_before = 0.0  # seconds of fitting in earlier segments of a resumed run
        self._segment_start = time.monotonic()
        self._rng_to_restore: dict[str, Any] | None = None

    @property
    def projector(self) -> torch.nn.Module:
        return self.adapter.projector()

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        # from_pretrained returns eval mode and Lightning keeps module modes: without this LoRA
        # dropout would stay off
        self.adapter.model.train()

    def on_train_start(self) -> None:
        self._segment_start = time.monotonic()
        if self._rng_to_restore is not None:
            torch.set_rng_state(self._rng_to_restore["torch"])
            if torch.cuda.is_available() and self._rng_to_restore.get("cuda"):
                torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
            self._rng_to_restore = None

    def on_train_end(self) -> None:
        """Merge the broken samples every rank found (each rank reads its own shard)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict[str, str] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self.skipped)
            for found in gathered:
                self.skipped.update(found or {})

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        for sample_id, reason in batch["skipped"]:
            self.skipped[sample_id] = reason
        inputs = self.adapter.prepare_conversations(batch["conversations"], batch["images"])
        loss = self.adapter.loss(inputs)
        if not any(batch["images"]):
            # a text-only batch leaves the projector out of the graph; a zero term keeps it in,
            # so DDP's gradient reduction sees every trained parameter every step
            loss = loss + 0.0 * sum(p.sum() for p in self.projector.parameters() if p.requires_grad)
        size = len(batch["conversations"])
        visual = [v for v, images in zip(inputs.visual_tokens, batch["images"]) if images]
        self.losses.append(float(loss.detach()))
        if visual:
            self.visual_tokens.append(sum(visual) / len(visual))
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if visual:
            self.log("train/visual_tokens", sum(visual) / len(visual), batch_size=len(visual))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        from transformers import get_scheduler

        projector = {id(p) for p in self.projector.parameters()}
        trained = [(n, p) for n, p in self.peft_model.named_parameters() if p.requires_grad]
        lora = [p for _, p in trained if id(p) not in projector]
        proj = [p for _, p in trained if id(p) in projector]
        groups = [{"params": lora, "lr": self.optim.lr, "name": "lora"}]
        if proj:
            groups.append(
                {"params": proj, "lr": self.optim.projector_lr or self.optim.lr, "name": "projector"}
            )
        optimizer = torch.optim.AdamW(
            groups, betas=tuple(self.optim.betas), eps=self.optim.eps, weight_decay=self.optim.weight_decay
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(-(-self.optim.warmup_ratio * total // 1))  # ceil
        scheduler = get_scheduler(
            self.optim.schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trained weights (not the frozen base model) and the RNG state."""
        trained = {f"peft_model.{n}" for n, p in self.peft_model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["tokenprune_rng"] = rng
        checkpoint["tokenprune_skipped"] = dict(self.skipped)
        # the whole run's bookkeeping, so that a resumed fit reports whole-run train/* metrics
        checkpoint["tokenprune_progress"] = {
            "losses": list(self.losses),
            "visual_tokens": list(self.visual_tokens),
            "wall_s": self.wall_time(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("tokenprune_rng")
        self.skipped.update(checkpoint.get("tokenprune_skipped", {}))
        progress = checkpoint.get("tokenprune_progress") or {}
        self.losses = list(progress.get("losses", [])) + self.losses
        self.visual_tokens = list(progress.get("visual_tokens", [])) + self.visual_tokens
        self.wall_before = float(progress.get("wall_s", 0.0))

    def wall_time(self) -> float:
        """Seconds spent fitting, over every segment of a resumed run."""
        return self.wall_before + time.monotonic() - self._segment_start

    def skipped_counts(self) -> Counter[str]:
        return Counter(self.skipped.values())
