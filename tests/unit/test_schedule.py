"""The fine-tuning schedule is sized from the data: steps, not a fixed epoch count."""

from __future__ import annotations

import pytest

from adaptflow.config import FinetuneConfig
from adaptflow.training.schedule import plan_schedule


@pytest.mark.parametrize(
    ("train_images", "batch", "steps", "epochs"),
    [
        (33, 8, 5, 60),  # 10 images/class x 5 classes after the split: small batches, many epochs
        (163, 16, 11, 28),
        (875, 64, 14, 22),
        (100_000, 64, 1563, 12),  # a big set: finetune.epochs is the floor
    ],
)
def test_small_sets_get_small_batches_and_enough_steps(
    train_images: int, batch: int, steps: int, epochs: int
) -> None:
    schedule = plan_schedule(train_images, FinetuneConfig())
    assert (schedule.batch_size, schedule.steps_per_epoch, schedule.epochs) == (batch, steps, epochs)
    assert schedule.epochs * schedule.steps_per_epoch >= min(300, 12 * steps)
    assert schedule.patience == max(4, epochs // 4)


def test_bounds_come_from_the_config() -> None:
    tiny = plan_schedule(3, FinetuneConfig(max_epochs=40))
    assert tiny.batch_size == 8 and tiny.epochs == 40
    fixed = plan_schedule(3, FinetuneConfig(epochs=2), epoch_seconds=1.0, budget_seconds=1.0)
    assert fixed.epochs == 2 and fixed.why == "finetune.epochs"
    assert plan_schedule(1000, FinetuneConfig(batch_size=4)).batch_size == 4


def test_the_time_budget_caps_epochs_but_never_below_finetune_epochs() -> None:
    cfg = FinetuneConfig()
    free = plan_schedule(163, cfg)
    capped = plan_schedule(163, cfg, epoch_seconds=2.0, budget_seconds=30.0)
    assert capped.epochs == 15 < free.epochs and "budget" in capped.why
    floor = plan_schedule(163, cfg, epoch_seconds=100.0, budget_seconds=1.0)
    assert floor.epochs == 12
