"""Backbone forwards per image in the baseline stage, counted at the backbone itself (issue 12).

``test_training.py::test_baseline_computes_each_backbone_feature_exactly_once`` checks the figure
the stage reports (``cost.backbone_forward_images``). This is the independent check: a forward
hook on the baseline model's backbone counts every image that really goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn


@dataclass
class ForwardCount:
    """Images through the stage's own backbone, and through copies of it (the cost estimate's)."""

    backbone: int = 0
    copies: int = 0
    models: list[nn.Module] = field(default_factory=list)


@pytest.fixture()
def counted(monkeypatch: pytest.MonkeyPatch) -> ForwardCount:
    """Every model ``run_baseline`` builds gets a forward hook on its backbone. ``estimate_cost``
    deep-copies the model, hook included; the hook tells the copy's calls apart by the module."""
    import adaptflow.training.baseline as baseline

    count = ForwardCount()
    build = baseline.build_model

    def build_counted(name: str, num_classes: int) -> Any:
        model = build(name, num_classes)
        original = model.backbone
        count.models.append(original)

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if module is original:
                count.backbone += len(args[0])
            else:
                count.copies += len(args[0])

        original.register_forward_hook(hook)
        return model

    monkeypatch.setattr(baseline, "build_model", build_counted)
    return count


def test_backbone_forwards_per_image_equal_one(  # type: ignore[no-untyped-def]
    tiny_baseline, counted: ForwardCount, tmp_path: Path
) -> None:
    from adaptflow.training.baseline import run_baseline

    snapshot = tiny_baseline.snapshot
    images = {e.sha256 for e in snapshot.split("train") + snapshot.split("val")}
    # a fresh feature cache, and a decoded-image cache for the stage to write
    inputs = replace(
        tiny_baseline.inputs, feature_cache_dir=tmp_path / "features", decoded_cache_dir=tmp_path / "decoded"
    )

    first = run_baseline(inputs, tmp_path / "first")
    assert len(counted.models) == 1
    assert counted.backbone == len(images)  # one forward per unique image, BatchNorm shift included
    assert first.candidate.cost.backbone_forward_images == counted.backbone  # the reported figure agrees
    assert counted.copies > 0  # the hook does see the cost estimate's copy: it is counted apart

    counted.backbone = counted.copies = 0
    again = run_baseline(inputs, tmp_path / "again")
    assert len(counted.models) == 2
    assert counted.backbone == 0  # features and the shift signal all from the cache
    assert again.candidate.cost.backbone_forward_images == 0
    assert again.candidate.metrics["val_accuracy"] == pytest.approx(first.candidate.metrics["val_accuracy"])
