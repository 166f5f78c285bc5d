"""Device, seeding, AMP and memory measurement shared by every training loop."""

from __future__ import annotations

import random
import resource
import sys
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        from adaptflow.errors import ConfigError

        raise ConfigError(
            f"device {requested!r} requested but CUDA is not available", hint="use device=auto or cpu"
        )
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager[object]:
    """bf16 autocast on CUDA (no grad scaler needed); plain fp32 on CPU for reproducible runs."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by this stage. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
