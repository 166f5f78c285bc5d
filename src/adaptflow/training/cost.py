"""What fine-tuning will cost, measured before it runs.

The estimate used to be one cold forward+backward of 32 images through the whole network, times the
planned epochs. That cold step was off by up to 20x in both directions on the real-data benchmark:
the first step pays for allocation, the real batches are smaller, the data loader decodes and
augments every image, and a partial strategy's backward stops early. Early stopping usually ends
the schedule before its last epoch as well. So the estimate is now built from:

- **a steady-state step**: a copy of the model, set up as the chosen strategy trains it, with its
  optimizer, steps through the real training loader at the planned batch size. The first
  ``WARMUP_STEPS`` are not timed;
- **the validation pass**: one pass through the real validation loader per epoch;
- **early stopping's expected length** (:func:`expected_epochs`).

``seconds`` is the expected wall time and ``max_seconds`` the full schedule. The advisor's budget
check uses ``seconds``. The schedule's own budget cap already bounds ``max_seconds``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.data import DataLoader

from adaptflow.config import FinetuneConfig
from adaptflow.models.factory import Classifier
from adaptflow.training.schedule import Schedule
from adaptflow.training.step import Diverged, evaluate_loader, on_device, train_step
from adaptflow.training.strategies import (
    freeze_batchnorm,
    freeze_frozen_batchnorm,
    plan_strategy,
    schedule_epochs,
)

WARMUP_STEPS = 2
TIMED_STEPS = 4


@dataclass(frozen=True)
class CostEstimate:
    step_seconds: float  # one optimizer step of batch_images images, steady state
    val_seconds: float  # one validation pass
    batch_images: int
    # the loader's length: a trailing single image is dropped, so not always ceil(n / batch)
    steps_per_epoch: int
    planned_epochs: int = 0
    expected_epochs: float = 0.0  # early stopping's expected length of the planned schedule

    @property
    def epoch_seconds(self) -> float:
        return self.steps_per_epoch * self.step_seconds + self.val_seconds

    @property
    def seconds(self) -> float:
        """Expected: early stopping included."""
        return self.expected_epochs * self.epoch_seconds

    @property
    def max_seconds(self) -> float:
        """Every planned epoch."""
        return self.planned_epochs * self.epoch_seconds

    @property
    def train_images_per_second(self) -> float:
        return 0.0 if self.step_seconds <= 0 else self.batch_images / self.step_seconds

    def for_schedule(self, schedule: Schedule, min_epochs: int = 0) -> CostEstimate:
        """The same measured step, for a schedule of the same batch size (e.g. budget-capped)."""
        expected = expected_epochs(schedule.epochs, schedule.patience, min_epochs)
        return replace(self, planned_epochs=schedule.epochs, expected_epochs=expected)


def expected_epochs(epochs: int, patience: int, min_epochs: int = 0) -> float:
    """The mean length of a schedule that early stopping may end, if the best validation epoch is
    equally likely to be any of the ``epochs``: ``E[min(epochs, max(min_epochs, best + patience))]``.

    A prior, not a fit: on the real-data benchmark the runs stopped anywhere from a third of the
    schedule to its end. Where the best epoch lands is not known before training.
    """
    if epochs <= 0:
        return 0.0
    stops = [min(epochs, max(min_epochs, best + patience)) for best in range(1, epochs + 1)]
    return sum(stops) / epochs


def _timed_steps(
    model: Classifier,
    loader: DataLoader,
    cfg: FinetuneConfig,
    device: torch.device,
    transform: nn.Module | None = None,
) -> float:
    """Seconds per optimizer step after warm-up, through ``loader`` (cycled if it is short)."""
    plan = plan_strategy(model, cfg)
    if plan.on_epoch_start is not None:
        plan.on_epoch_start(10**6)  # gradual: time its most expensive epochs, every block training
    optimizer = torch.optim.AdamW(plan.param_groups, weight_decay=cfg.weight_decay)
    model.train()
    (freeze_batchnorm if cfg.freeze_bn else freeze_frozen_batchnorm)(model)
    criterion = nn.CrossEntropyLoss()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    start = 0.0
    for step, (x, y) in enumerate(itertools.islice(batches, WARMUP_STEPS + TIMED_STEPS)):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        # a diverging step still costs its forward pass; fine-tuning itself reports the divergence
        with contextlib.suppress(Diverged):
            x = on_device(x, device, transform, channels_last=False)
            train_step(model, x, y, optimizer, criterion, device, cfg.amp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / TIMED_STEPS


def _val_seconds(
    model: nn.Module, val_loader: DataLoader, device: torch.device, amp: bool, transform: nn.Module | None
) -> float:
    """One validation pass through the real validation loader, batches prepared as in training."""
    start = time.perf_counter()
    evaluate_loader(model, val_loader, device, amp, transform=transform)
    return time.perf_counter() - start


def estimate_cost(
    model: Classifier,
    train_loader: DataLoader,
    val_loader: DataLoader,
    schedule: Schedule,
    cfg: FinetuneConfig,
    device: torch.device,
    transforms: tuple[nn.Module, nn.Module] | None = None,
    forward_images_per_second: float | None = None,
) -> CostEstimate:
    """Fine-tuning's expected and maximum wall time for ``cfg.strategy`` on ``schedule``.

    ``transforms``: the (train, validation) batch transforms fine-tuning applies (training/batches.py).
    ``forward_images_per_second``: the model's inference throughput, when the caller measured it
    (the baseline's extraction pass): a validation pass is that forward pass, so it is not run again.
    Trains a deep copy, so the caller's model, its BatchNorm statistics included, is untouched.
    """
    trial = copy.deepcopy(model).to(device)
    train_transform, val_transform = transforms if transforms is not None else (None, None)
    step = _timed_steps(trial, train_loader, cfg, device, train_transform)
    val_images = len(val_loader.dataset)  # type: ignore[arg-type]
    val = (
        val_images / forward_images_per_second
        if forward_images_per_second
        else _val_seconds(trial, val_loader, device, cfg.amp, val_transform)
    )
    del trial
    measured = CostEstimate(step, val, schedule.batch_size, len(train_loader))
    return measured.for_schedule(schedule, schedule_epochs(model, cfg))
