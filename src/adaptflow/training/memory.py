"""Out of memory: halve the micro-batch and go on; only a micro-batch of one that still fails is an error.

Fine-tuning keeps the effective batch: a batch is split into micro-batches whose gradients add up
before the one optimizer step (gradient accumulation), so the data order, the learning rate and the
number of steps stay as planned. The failed step was never taken, so it is simply run again in
smaller pieces. Feature extraction has no optimizer state: it just runs smaller batches.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from adaptflow.errors import AdaptflowError

log = logging.getLogger(__name__)

T = TypeVar("T")

_MESSAGES = ("out of memory", "can't allocate memory", "bad_alloc", "failed to allocate")


class OutOfMemory(AdaptflowError):
    """Even one image at a time does not fit: a clear error naming the stage and the batch size."""


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or an allocator's RuntimeError (CPU, MPS)."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _MESSAGES)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def halved(micro_batch: int, batch: int, stage: str, device: torch.device, error: BaseException) -> int:
    """The next micro-batch size after an out-of-memory ``error`` at ``micro_batch`` of ``batch`` images."""
    free_memory(device)
    if micro_batch <= 1:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OutOfMemory(
            f"{stage}: out of memory on {device} even one image at a time (batch {batch}): {first_line}",
            hint=f"give the {stage} stage more memory (cluster.resources), use a smaller backbone or "
            "backbone.input_size, or run on a larger device",
        ) from None
    smaller = max(1, micro_batch // 2)
    log.warning(
        "%s: out of memory at %d images per forward pass; continuing with %d (batch %d, %d accumulated)",
        stage,
        micro_batch,
        smaller,
        batch,
        -(-batch // smaller),
    )
    return smaller


def in_chunks(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int | None
) -> torch.Tensor:
    """``forward(x)`` computed ``size`` images at a time (all at once for None), concatenated."""
    size = len(x) if size is None else size
    return torch.cat([forward(x[i : i + size]) for i in range(0, len(x), size)])


def run_within_memory(
    work: Callable[[int | None], T], size: int | None, batch: int, stage: str, device: torch.device
) -> tuple[T, int | None]:
    """``work(size)``, run again with half the size after each out-of-memory error; (result, size that fitted).

    ``size`` is images per forward pass (None: the whole batch of ``batch``). A training step that
    failed never reached the optimizer, so running it again continues from the last completed step.
    """
    while True:
        try:
            return work(size), size
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            size = halved(size or batch, batch, stage, device, error)
