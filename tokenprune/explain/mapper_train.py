"""`train=mapper`: fit the explainability mapper on relevance labels (Lightning), save it, report `train/*`.

The mapper never sees the MLLM while training (notes §2.3-2.5): each label record gives its input
(the layer-0 text→visual attention vector) and its target, the relevance with the lowest
`1 - target_keep` of the values zeroed and the rest divided by their sum (`target_norm: sum`; the
authors avoid a softmax here). Loss: KL(target ‖ softmax(f(x))) over the valid tokens, averaged
over the records of a batch; records of different lengths are right-padded (the net masks the
padding, its logits are -inf there and its target 0). Adam (paper: batch 128, ~100 epochs).

Stage folder (`train.output_dir`, default `outputs/train/<model>-<reducer>-mapper-<hash>`):

    mapper/         mapper.safetensors + mapper.json (net config, metrics, label folders): the
                    trained mapper, loaded by `reducer=explain_mapper reducer.checkpoint=<folder>`
    checkpoints/    last.ckpt (net, optimizer, loop state; `train.resume=auto` continues from it)
    logs/           CSV metrics (and wandb's offline run with train/logger=wandb)

After the fit the pipeline evaluates the model with the reducer given the trained mapper
(`load_trained`), exactly as a later `tokenprune.eval reducer.checkpoint=<stage>/mapper` does.
"""

from __future__ import annotations

import logging
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from tokenprune.explain.shards import LabelRecord, read_labels
from tokenprune.fitting import FitResult, TrainerSettings, build_trainer, resolve_resume
from tokenprune.reducers.explain_mapper import (
    CONFIG_FILE,
    ExplainMapper,
    MapperConfig,
    MapperNet,
    load_mapper,
    save_mapper,
)

log = logging.getLogger(__name__)

MAPPER_DIR = "mapper"
TARGET_NORMS = ("sum", "softmax")
SCHEDULES = ("constant", "cosine")


@dataclass
class MapperOptim:
    """`train.optim`: Adam (the paper's optimiser; its learning rate and schedule are not reported).

    Attributes:
        lr: learning rate.
        betas, eps: Adam's.
        weight_decay: L2 (Adam, not AdamW); 0 by default.
        schedule: constant | cosine (to 0 over the run).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass
class MapperData:
    """`train.data`: which label records, how targets are built, how they are batched.

    Attributes:
        batch_size: records per batch (paper: 128).
        target_keep: fraction of the tokens whose relevance is kept in the target (paper: top 50%;
            the rest is zeroed). round(target_keep * N), at least 1.
        target_norm: sum (divide the kept values by their sum, the paper) | softmax (over the kept values).
        val_fraction: records held out (by a hash of the sample id, so all records of a sample go
            the same way) for the `val/*` metrics reported after the fit; 0 trains on everything.
        max_records: use at most this many records (None: all), in the shards' order.
        num_workers: DataLoader workers.
    """

    batch_size: int = 128
    target_keep: float = 0.5
    target_norm: str = "sum"
    val_fraction: float = 0.05
    max_records: int | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.target_norm not in TARGET_NORMS:
            raise ValueError(f"target_norm must be one of {TARGET_NORMS}, got {self.target_norm!r}")
        if not 0.0 < self.target_keep <= 1.0:
            raise ValueError(f"target_keep must be in (0, 1], got {self.target_keep}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def make_target(relevance: torch.Tensor, keep: float = 0.5, norm: str = "sum") -> torch.Tensor:
    """The training target [N]: the top `keep` relevance values renormalised (the rest 0).

    Ties at the cut go to the lower index; an all-zero kept set becomes uniform over it.
    """
    n = relevance.numel()
    k = min(n, max(1, round(keep * n)))
    top = torch.sort(relevance, descending=True, stable=True).indices[:k]
    values = relevance[top].float().clamp_min(0)
    if norm == "softmax":
        weights = values.softmax(0)
    elif float(values.sum()) > 0:
        weights = values / values.sum()
    else:
        weights = torch.full_like(values, 1.0 / k)
    target = torch.zeros(n, dtype=torch.float32)
    target[top] = weights
    return target


def kl_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over the batch of KL(target ‖ softmax(logits)) over the valid tokens ([B, N] each)."""
    log_q = torch.log_softmax(logits, dim=-1).masked_fill(~mask, 0.0)
    target = target.masked_fill(~mask, 0.0)
    return (torch.xlogy(target, target) - target * log_q).sum(-1).mean()


def topk_recall(scores: torch.Tensor, relevance: torch.Tensor, keep: float = 0.5) -> float:
    """Fraction of the top-`keep` tokens by relevance that are also in the top-`keep` by `scores` ([N] each)."""
    n = relevance.numel()
    k = min(n, max(1, round(keep * n)))
    want = torch.sort(relevance, descending=True, stable=True).indices[:k]
    got = torch.sort(scores, descending=True, stable=True).indices[:k]
    hit = torch.zeros(n, dtype=torch.bool)
    hit[got] = True
    return float(hit[want].float().mean())


def pad_batch(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [N_i] vectors to [B, max N] (zeros) and their validity mask."""
    width = max(r.numel() for r in rows)
    out = torch.zeros(len(rows), width)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
        mask[i, : r.numel()] = True
    return out, mask


class LabelDataset(Dataset):
    """(attention vector, target) pairs of label records."""

    def __init__(self, records: Sequence[LabelRecord], keep: float = 0.5, norm: str = "sum") -> None:
        self.records = list(records)
        self.targets = [make_target(r.relevance, keep, norm) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.records[i].text_attn.float(), self.targets[i]


def collate(items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    x, mask = pad_batch([x for x, _ in items])
    target, _ = pad_batch([t for _, t in items])
    return {"x": x, "target": target, "mask": mask}


def split_records(records: Sequence[LabelRecord], val_fraction: float) -> tuple[list, list]:
    """(train, val) by a hash of the sample id (stable across runs and machines)."""
    if val_fraction <= 0:
        return list(records), []
    cut = int(val_fraction * 10_000)
    val = [r for r in records if zlib.crc32(r.sample.encode()) % 10_000 < cut]
    train = [r for r in records if zlib.crc32(r.sample.encode()) % 10_000 >= cut]
    return train, val


class MapperModule(L.LightningModule):
    """The mapper net under Lightning: KL loss, Adam, optional cosine schedule."""

    def __init__(self, net: MapperNet, optim: MapperOptim) -> None:
        super().__init__()
        self.net = net
        self.optim = optim
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["x"], batch["mask"])
        loss = kl_loss(logits, batch["target"], batch["mask"])
        self.losses.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["x"].shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(
            self.net.parameters(),
            lr=self.optim.lr,
            betas=tuple(self.optim.betas),
            eps=self.optim.eps,
            weight_decay=self.optim.weight_decay,
        )
        if self.optim.schedule == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def evaluate_mapper(net: MapperNet, records: Sequence[LabelRecord], data: MapperData) -> dict[str, float]:
    """KL to the targets and top-k recall of the relevance's top tokens, for the mapper and for the raw
    attention (the baseline the mapper must beat), mean over records."""
    if not records:
        return {}
    net.eval()
    losses, recall, recall_attn = [], [], []
    for start in range(0, len(records), 64):
        chunk = records[start : start + 64]
        x, mask = pad_batch([r.text_attn.float() for r in chunk])
        target, _ = pad_batch([make_target(r.relevance, data.target_keep, data.target_norm) for r in chunk])
        logits = net(x, mask)
        for i, r in enumerate(chunk):
            n = r.text_attn.numel()
            valid = mask[i : i + 1]
            losses.append(float(kl_loss(logits[i : i + 1], target[i : i + 1], valid)))
            recall.append(topk_recall(logits[i, :n], r.relevance, data.target_keep))
            recall_attn.append(topk_recall(r.text_attn.float(), r.relevance, data.target_keep))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"loss": mean(losses), "topk_recall": mean(recall), "topk_recall_attention": mean(recall_attn)}


class MapperStage:
    """`train=mapper`: fit the explainability mapper on label shards; save it; report `train/*`.

    Args:
        labels: label folders (searched recursively for shards; `python -m tokenprune.label` output).
        net: the architecture (MapperConfig).
        optim: Adam settings (MapperOptim).
        trainer: Lightning settings (tokenprune.fitting.TrainerSettings).
        data: targets and batching (MapperData).
        logger: an extra logger factory (train/logger=wandb); CSV is always on.
        resume: auto | null | a checkpoint path (as the LoRA stage).
        output_dir: the stage's folder (None: derived by the pipeline from the config).
        reducer: the `_target_` of the run's reducer; anything but ExplainMapper is refused early.
    """

    def __init__(
        self,
        labels: Sequence[str] | str,
        net: MapperConfig,
        optim: MapperOptim,
        trainer: TrainerSettings,
        data: MapperData,
        logger: Any = None,
        resume: str | None = "auto",
        output_dir: str | None = None,
        reducer: str | None = None,
    ) -> None:
        if reducer is not None and reducer.rsplit(".", 1)[-1] != ExplainMapper.__name__:
            raise ValueError(
                f"train=mapper trains the explainability mapper; set reducer=explain_mapper (got {reducer})"
            )
        self.labels = [labels] if isinstance(labels, str) else [str(p) for p in labels]
        self.net = net if isinstance(net, MapperConfig) else MapperConfig(**net)
        self.optim, self.trainer, self.data = optim, trainer, data
        self.logger, self.resume, self.output_dir = logger, resume, output_dir

    def fit(
        self,
        build_adapter: Callable[[str | None], Any] | None,
        output_dir: str | Path,
        seed: int = 0,
        callbacks: list | None = None,
    ) -> FitResult:
        """Fit (or finish, or skip when already done) and save; `build_adapter` is not needed (the
        mapper trains on labels only) and is accepted for the pipeline's stage interface."""
        output_dir = Path(output_dir)
        mapper_dir = output_dir / MAPPER_DIR
        if self.resume == "auto" and (mapper_dir / CONFIG_FILE).is_file():
            _, meta = load_mapper(mapper_dir)
            log.info("mapper stage already finished in %s (train.resume=null redoes it)", output_dir)
            return FitResult(meta["info"].get("metrics", {}), mapper_dir)
        records = read_labels(self.labels)
        modalities = sorted({r.modality for r in records})
        if len(modalities) > 1:
            log.warning(
                "the label records mix modalities %s; the paper trains one mapper per modality "
                "(set train.labels to one modality's label folders; a video mapper is used with "
                "reducer.video_checkpoint)",
                modalities,
            )
        if self.data.max_records is not None:
            records = records[: self.data.max_records]
        train, val = split_records(records, self.data.val_fraction)
        if not train:
            raise FileNotFoundError(
                f"no label records under {self.labels}; make them with `python -m tokenprune.label model=... data=...`"
            )
        output_dir.mkdir(parents=True, exist_ok=True)
        L.seed_everything(seed, workers=True, verbose=False)
        net = MapperNet(self.net)
        module = MapperModule(net, self.optim)
        loader = DataLoader(
            LabelDataset(train, self.data.target_keep, self.data.target_norm),
            batch_size=self.data.batch_size,
            shuffle=True,
            collate_fn=collate,
            num_workers=self.data.num_workers,
            generator=torch.Generator().manual_seed(seed),
        )
        trainer = build_trainer(self.trainer, output_dir, logger=self.logger, callbacks=callbacks)
        checkpoint = resolve_resume(self.resume, output_dir)
        if checkpoint is not None:
            log.info("resuming the mapper stage from %s", checkpoint)
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        started = time.monotonic()
        trainer.fit(module, train_dataloaders=loader, ckpt_path=checkpoint)
        wall = time.monotonic() - started
        net.cpu()
        metrics = {
            "train/steps": float(trainer.global_step),
            "train/epochs": float(trainer.current_epoch),
            "train/records": float(len(train)),
            "train/val_records": float(len(val)),
            "train/trainable_params": float(sum(p.numel() for p in net.parameters())),
            "train/wall_time_s": round(wall, 3),
        }
        if module.losses:
            metrics["train/loss_first"] = module.losses[0]
            metrics["train/loss"] = module.losses[-1]
        metrics.update({f"train/fit_{k}": v for k, v in evaluate_mapper(net, train, self.data).items()})
        metrics.update({f"val/{k}": v for k, v in evaluate_mapper(net, val, self.data).items()})
        finished = (
            trainer.global_step >= trainer.max_steps
            if trainer.max_steps > 0
            else trainer.current_epoch >= (trainer.max_epochs or 0)
        )
        if finished and trainer.is_global_zero:
            info = {"metrics": metrics, "labels": self.labels, "seed": seed, "data": vars(self.data)}
            save_mapper(net, mapper_dir, info)
            log.info("saved the mapper to %s", mapper_dir)
        elif not finished:
            log.warning("the mapper stage stopped before its end; rerun the same command to resume")
        return FitResult(
            metrics,
            mapper_dir,
            is_global_zero=trainer.is_global_zero,
            evaluates=finished and trainer.is_global_zero,
            finished=finished,
            extra={"trainer": trainer},
        )

    def load_trained(self, adapter: Any, path: str | Path) -> Any:
        """Give the adapter's ExplainMapper reducer the saved mapper (in place); returns the adapter."""
        if not isinstance(adapter.reducer, ExplainMapper):
            raise ValueError("train=mapper needs reducer=explain_mapper to evaluate the trained mapper")
        adapter.reducer.load(path)
        return adapter
