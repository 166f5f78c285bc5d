"""The supervised loop used by pretraining and fine-tuning: epochs, validation, early stopping.

The best weights (by validation accuracy, ties broken by lower validation loss) are kept and
restored at the end, so a late overfitting epoch never becomes the candidate.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from adaptflow.contracts import CostFigures, EpochRecord
from adaptflow.training.runtime import autocast, peak_memory_mb

log = logging.getLogger(__name__)


@dataclass
class LoopResult:
    history: list[EpochRecord]
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float
    train_images: int
    train_seconds: float

    @property
    def best(self) -> EpochRecord:
        return self.history[self.best_epoch - 1]

    def best_metrics(self) -> dict[str, float]:
        """Metrics of the kept (best) epoch; the train-val gap is the overfitting measure."""
        b = self.best
        return {
            "train_accuracy": b.train_accuracy,
            "val_accuracy": b.val_accuracy,
            "val_loss": b.val_loss,
            "train_val_gap": b.train_accuracy - b.val_accuracy,
        }

    @property
    def images_per_second(self) -> float | None:
        return self.train_images / self.train_seconds if self.train_seconds else None

    def cost(
        self, started: float, device: torch.device, params: tuple[int, int], backbone_forward_images: int
    ) -> CostFigures:
        """The stage's cost: wall time since ``started`` (perf_counter), (trainable, total) parameters,
        throughput, memory, and how many images went through the backbone."""
        return CostFigures(
            wall_seconds=time.perf_counter() - started,
            trainable_params=params[0],
            total_params=params[1],
            train_images_per_second=self.images_per_second,
            peak_memory_mb=peak_memory_mb(device),
            epochs_run=len(self.history),
            backbone_forward_images=backbone_forward_images,
            device=str(device),
        )


def evaluate_loader(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool, channels_last: bool = False
) -> tuple[float, float]:
    """(mean loss, accuracy)."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    criterion = nn.CrossEntropyLoss(reduction="sum")
    with torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                logits = model(x)
            loss_sum += float(criterion(logits.float(), y))
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; (loss, logits). The cost estimate times this same step."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        logits = model(x)
        loss = criterion(logits.float(), y)
    loss.backward()
    optimizer.step()
    return loss, logits


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    patience: int,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    train_mode: Callable[[nn.Module], None] | None = None,
    label: str = "train",
    min_epochs: int = 0,
) -> LoopResult:
    """Trains up to ``epochs``; early stopping (``patience``) never ends it before ``min_epochs``."""
    criterion = nn.CrossEntropyLoss()
    history: list[EpochRecord] = []
    best_state = copy.deepcopy(model.state_dict())
    best = (-1.0, float("inf"))
    best_epoch, stale, images, train_seconds = 0, 0, 0, 0.0
    for epoch in range(1, epochs + 1):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        model.train()
        if train_mode is not None:
            train_mode(model)  # e.g. keep BatchNorm statistics frozen
        start = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in train_loader:
            y = y.to(device, non_blocking=True)
            loss, logits = train_step(model, x, y, optimizer, criterion, device, amp, channels_last)
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        if scheduler is not None:
            scheduler.step()
        elapsed = time.perf_counter() - start
        train_seconds += elapsed
        images += seen
        val_loss, val_acc = evaluate_loader(model, val_loader, device, amp, channels_last)
        record = EpochRecord(
            epoch=epoch,
            train_loss=loss_sum / max(seen, 1),
            train_accuracy=correct / max(seen, 1),
            val_loss=val_loss,
            val_accuracy=val_acc,
            seconds=elapsed,
        )
        history.append(record)
        log.info(
            "%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f (%.1fs)",
            label,
            epoch,
            epochs,
            record.train_loss,
            record.train_accuracy,
            val_loss,
            val_acc,
            elapsed,
        )
        if (val_acc, -val_loss) > (best[0], -best[1]):
            best, best_epoch, stale = (val_acc, val_loss), epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= patience and epoch >= min_epochs:
                log.info("%s: early stop at epoch %d (best epoch %d)", label, epoch, best_epoch)
                break
    model.load_state_dict(best_state)
    return LoopResult(history, best_epoch, best[0], best[1], images, train_seconds)
