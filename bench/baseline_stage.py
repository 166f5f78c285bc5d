"""The baseline stage, timed part by part, for bench/baseline.py (and bench/scale.py's parts)."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: the baseline stage's parts: name in the split -> the function ``run_baseline`` calls for it
PARTS = {
    "decode": "decode_split",
    "extraction (+ BatchNorm shift)": "extract_features",
    "linear probe": "train_linear_probe",
    "probe cross-validation": "measure_transfer_gap",
    "fine-tuning cost estimate": "measure_finetune_cost",
    "candidate saved": "save_candidate",
}


# ------------------------------------------------------------------- the baseline stage, timed
@dataclass
class StageClock:
    """Seconds in each of ``PARTS`` and images through the stage's backbone (``copies``: through the
    cost estimate's deep copy of the model, which the hook follows into)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    forwards: int = 0
    copies: int = 0


@contextlib.contextmanager
def stage_clock() -> Iterator[StageClock]:
    """Wraps the functions ``run_baseline`` calls (module attributes of adaptflow.training.baseline)."""
    import adaptflow.training.baseline as stage

    clock = StageClock()
    originals: dict[str, Callable[..., Any]] = {name: getattr(stage, name) for name in PARTS.values()}
    build = stage.build_model

    def timed(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock.seconds[part] += time.perf_counter() - start

        return wrapper

    def build_counted(name: str, num_classes: int) -> Any:
        model = build(name, num_classes)
        original = model.backbone

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if module is original:
                clock.forwards += len(args[0])
            else:
                clock.copies += len(args[0])

        original.register_forward_hook(hook)
        return model

    for part, name in PARTS.items():
        setattr(stage, name, timed(part, originals[name]))
    stage.build_model = build_counted  # type: ignore[assignment]
    try:
        yield clock
    finally:
        for name, fn in originals.items():
            setattr(stage, name, fn)
        stage.build_model = build  # type: ignore[assignment]


@dataclass(frozen=True)
class StageRun:
    wall: float
    result: Any  # BaselineResult
    clock: StageClock


def run_stage(snapshot: Any, settings: Any, weights: Any, scratch: Path) -> StageRun:
    """``run_baseline`` with a fresh feature cache and a fresh decoded-image cache under ``scratch``."""
    from adaptflow.data.images import ImageStore
    from adaptflow.training.baseline import BaselineInputs, run_baseline

    inputs = BaselineInputs(
        snapshot,
        settings.backbone,
        weights,
        settings.baseline,
        settings.finetune,
        scratch / "features",
        settings.seed,
        scratch / "decoded",
    )
    with stage_clock() as clock:
        start = time.perf_counter()
        result = run_baseline(inputs, scratch / "baseline", ImageStore())
        wall = time.perf_counter() - start
    return StageRun(wall, result, clock)
