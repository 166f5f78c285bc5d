"""One training step and one evaluation pass: what the loop, the cost estimate and the benchmarks time.

Both keep their figures on the device: a step returns its loss and logits as tensors, and an
evaluation pass reads its sums once at the end.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from adaptflow.training.memory import in_chunks, run_within_memory
from adaptflow.training.runtime import autocast


def _logits(
    model: nn.Module, x: torch.Tensor, device: torch.device, amp: bool, size: int | None
) -> torch.Tensor:
    with autocast(device, amp):
        return in_chunks(model, x, size).float()


def evaluate_loader(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: bool,
    channels_last: bool = False,
    transform: nn.Module | None = None,
) -> tuple[float, float]:
    """(mean loss, accuracy). ``transform`` turns the loader's uint8 batches into model input on
    ``device`` (training/batches.py). Out of memory halves the images per forward pass."""
    loss_sum, correct, seen = evaluate_sums(model, loader, device, amp, channels_last, transform)
    return float(loss_sum) / max(seen, 1), int(correct) / max(seen, 1)


def evaluate_sums(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: bool,
    channels_last: bool = False,
    transform: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(summed loss, correct count, images), the sums on the device: what ranks add up under DDP."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    criterion = nn.CrossEntropyLoss(reduction="sum")
    size: int | None = None
    with torch.inference_mode():
        for x, y in loader:
            x, y = on_device(x, device, transform, channels_last), y.to(device, non_blocking=True)
            logits, size = run_within_memory(
                functools.partial(_logits, model, x, device, amp), size, len(y), "validation", device
            )
            loss_sum += criterion(logits, y)  # summed on the device: one host read per pass
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
    return loss_sum, correct, seen


def on_device(
    x: torch.Tensor, device: torch.device, transform: nn.Module | None, channels_last: bool
) -> torch.Tensor:
    """A loader batch as model input: copied to ``device``, transformed there, in the memory format."""
    x = x.to(device, non_blocking=True)
    if transform is not None:
        x = transform.to(device)(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


class Diverged(Exception):
    """A non-finite loss or gradient: the step was not taken. The loop stops and says where."""


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    micro_batch: int | None = None,
    skipped: torch.Tensor | None = None,
    reduce_gradients: Callable[[list[torch.Tensor]], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; (mean loss, logits). The cost estimate times this same step.

    With ``micro_batch`` the batch goes through the model that many images at a time and the
    gradients accumulate, so the step is the full batch's (up to BatchNorm's per-pass statistics).
    A non-finite loss or gradient raises :class:`Diverged` before the optimizer step; or, where
    :func:`skips_on_device`, the step is skipped on the device and counted in ``skipped``.
    ``reduce_gradients`` (DDP: the mean over the ranks) runs on the gradients before that check, so
    every rank takes the same decision.
    """
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer.zero_grad(set_to_none=True)
    size = len(y) if micro_batch is None else max(1, min(micro_batch, len(y)))
    total = torch.zeros((), device=device)
    pieces = []
    for first in range(0, len(y), size):
        xs, ys = x[first : first + size], y[first : first + size]
        with autocast(device, amp):
            logits = model(xs)
            loss = criterion(logits.float(), ys)
        share = len(ys) / len(y)
        (loss * share).backward() if share < 1 else loss.backward()
        total += loss.detach() * share
        pieces.append(logits.detach())
    # A non-finite loss gives non-finite gradients, so one fused norm over every gradient catches
    # both before anything reaches the weights.
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if reduce_gradients is not None:
        reduce_gradients(grads)
    finite = torch.isfinite(total)
    if grads:
        finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(grads))
    if skipped is not None and skips_on_device(optimizer, device):
        # No host read: the fused optimizer skips the update itself where found_inf is set (as under
        # GradScaler); the loop reads ``skipped`` once per epoch and stops then.
        skipped += ~finite
        optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
        return total, torch.cat(pieces)
    if not bool(finite):  # the one host read of the step
        raise Diverged(f"loss {float(total)}" if not torch.isfinite(total) else "gradient norm is not finite")
    optimizer.step()
    return total, torch.cat(pieces)


def skips_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Whether a non-finite step can be skipped without a host read: CUDA and a fused optimizer
    (``AdamW(fused=True)``, which fine-tuning uses there). On the CPU a read costs nothing."""
    return device.type == "cuda" and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
