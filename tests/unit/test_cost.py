"""The fine-tuning cost estimate: a steady-state step through the real loader x early stopping's expected epochs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from adaptflow.config import FinetuneConfig
from adaptflow.models.factory import build_model
from adaptflow.training.cost import estimate_cost, expected_epochs
from adaptflow.training.schedule import plan_schedule


def test_expected_epochs_is_the_mean_stop_over_every_best_epoch() -> None:
    # best epoch 1..4 with patience 1 stops at 2, 3, 4, 4
    assert expected_epochs(4, 1) == pytest.approx(3.25)
    assert expected_epochs(20, 20) == 20  # patience as long as the schedule: it always runs to the end
    assert expected_epochs(20, 1, min_epochs=20) == 20  # gradual: no stop before every block trains
    assert expected_epochs(100, 25) == pytest.approx(72.25)  # about 1 - (3/4)**2 / 2 of the schedule
    assert 0.5 * 60 < expected_epochs(60, 15) < 60


def test_estimate_times_the_chosen_strategy_without_touching_the_model() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = TensorDataset(torch.randn(40, 3, 32, 32), torch.randint(0, 3, (40,)))
    train, val = DataLoader(images, batch_size=8, shuffle=True), DataLoader(images, batch_size=256)
    schedule = plan_schedule(40, FinetuneConfig(max_epochs=30))
    cpu = torch.device("cpu")
    full = estimate_cost(model, train, val, schedule, FinetuneConfig(strategy="full"), cpu)
    head = estimate_cost(model, train, val, schedule, FinetuneConfig(strategy="linear_probe"), cpu)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # a deep copy trained, BatchNorm statistics included
    assert 0 < head.step_seconds < full.step_seconds  # a head-only backward stops early
    assert full.epoch_seconds == pytest.approx(
        schedule.steps_per_epoch * full.step_seconds + full.val_seconds
    )
    assert full.seconds == pytest.approx(full.expected_epochs * full.epoch_seconds)
    assert full.seconds < full.max_seconds == pytest.approx(schedule.epochs * full.epoch_seconds)
    assert full.train_images_per_second == pytest.approx(8 / full.step_seconds)
