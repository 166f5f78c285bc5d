"""How long fine-tuning trains, sized from the data rather than a fixed epoch count.

A fixed 12 epochs of 64-image batches gives a 35-image training split 12 optimizer steps, and the
network barely moves off the linear probe: on Fashion-MNIST with 10 images per class the
registered model scored 0.61 on held-out training images, against 0.81 with the same recipe
trained for enough steps (bench/RESULTS.md, "Real data"). So the schedule is planned in steps:

- batch size: the largest power of two that still gives ``MIN_STEPS_PER_EPOCH`` steps per epoch,
  between ``MIN_BATCH`` and ``finetune.batch_size`` (small sets get small, noisier batches,
  which also regularise);
- epochs (``finetune.epochs: null``, the default): enough for ``finetune.min_steps`` optimizer
  steps, at least ``FLOOR_EPOCHS`` and at most ``finetune.max_epochs``, and no more than the
  advisor's time budget allows at the measured epoch time (:mod:`adaptflow.training.cost`; never
  below the floor: past it the advisor declines fine-tuning as over budget). A number in
  ``finetune.epochs`` is used as is;
- patience: early stopping on validation ends the schedule sooner; it waits ``finetune.patience``
  epochs or a quarter of the planned ones, whichever is longer, so a long schedule on a tiny,
  noisy validation split is not cut off by one unlucky epoch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from adaptflow.config import FinetuneConfig

MIN_BATCH = 8
FLOOR_EPOCHS = 12  # the old fixed count: large sets, where min_steps is a fraction of it, train as before
MIN_STEPS_PER_EPOCH = 8


@dataclass(frozen=True)
class Schedule:
    batch_size: int
    epochs: int  # planned: the cosine schedule's length; early stopping may end it sooner
    patience: int
    steps_per_epoch: int
    why: str

    def as_dict(self) -> dict[str, int]:
        return {
            "batch_size": self.batch_size,
            "planned_epochs": self.epochs,
            "patience": self.patience,
            "steps_per_epoch": self.steps_per_epoch,
        }


def plan_schedule(
    train_images: int,
    cfg: FinetuneConfig,
    epoch_seconds: float | None = None,
    budget_seconds: float | None = None,
) -> Schedule:
    """The batch size, planned epochs and patience for ``train_images`` training images."""
    train_images = max(train_images, 1)
    batch = MIN_BATCH
    while batch * 2 <= cfg.batch_size and train_images / (batch * 2) >= MIN_STEPS_PER_EPOCH:
        batch *= 2
    batch = min(batch, cfg.batch_size)
    steps_per_epoch = math.ceil(train_images / batch)
    if cfg.epochs is not None:
        epochs, why = cfg.epochs, "finetune.epochs"
    else:
        epochs = min(max(FLOOR_EPOCHS, math.ceil(cfg.min_steps / steps_per_epoch)), cfg.max_epochs)
        why = f"{cfg.min_steps} steps at {steps_per_epoch} per epoch"
        if epoch_seconds and budget_seconds:
            affordable = int(budget_seconds / epoch_seconds)
            if affordable < epochs:
                epochs = max(min(FLOOR_EPOCHS, cfg.max_epochs), affordable)
                why = f"the {budget_seconds:.0f}s budget at {epoch_seconds:.1f}s per epoch"
    return Schedule(batch, epochs, max(cfg.patience, epochs // 4), steps_per_epoch, why)


def schedule_from_signals(train_images: int, cfg: FinetuneConfig, signals: Mapping[str, object]) -> Schedule:
    """The schedule the baseline stage planned, planned again from its recorded advisor signals."""
    epoch, budget = signals.get("epoch_seconds"), signals.get("budget_seconds")
    return plan_schedule(
        train_images,
        cfg,
        float(epoch) if isinstance(epoch, (int, float)) else None,
        float(budget) if isinstance(budget, (int, float)) else None,
    )


def planned_epochs(signals: Mapping[str, object], cfg: FinetuneConfig) -> int:
    """The epochs the baseline stage planned for fine-tuning (its advisor signal), else the config's."""
    planned = signals.get("planned_finetune_epochs")
    if isinstance(planned, int):
        return planned
    return cfg.epochs or FLOOR_EPOCHS
