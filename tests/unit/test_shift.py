"""The domain-shift signal: BatchNorm statistics of target images against the stored source ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from adaptflow.contracts import Preprocessing
from adaptflow.data.images import load_tensor_batch
from adaptflow.models.factory import Classifier, build_model
from adaptflow.models.weights import read_weights_file
from adaptflow.training.shift import batchnorm_shift

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def source_model(tiny_assets) -> tuple[Classifier, Preprocessing]:  # type: ignore[no-untyped-def]
    state, meta = read_weights_file(tiny_assets.weights)
    model = build_model("resnet18", 5)
    model.load_backbone_state(state)
    return model, Preprocessing.model_validate(meta["preprocessing"])


def _shift(model: Classifier, pre: Preprocessing, tree: Path) -> float:
    paths: list[str | Path] = list(sorted(tree.rglob("*.png")))
    value = batchnorm_shift(
        model.backbone, [load_tensor_batch(paths[:100], pre), load_tensor_batch(paths[100:], pre)], CPU
    )
    assert value is not None
    return value


def test_shift_orders_source_in_domain_and_texture_targets(tiny_assets, source_model) -> None:  # type: ignore[no-untyped-def]
    model, pre = source_model
    source = _shift(model, pre, tiny_assets.source)
    target = _shift(model, pre, tiny_assets.target)
    texture = _shift(model, pre, tiny_assets.target_texture)
    # the source images are what the statistics were stored from; the texture target is furthest away
    assert 0 <= source < target < texture, (source, target, texture)
    # by a clear margin; the ratio depends on the tiny backbone's pretraining draws: 1.79 with per-image
    # torchvision augmentation on the host, 1.48 with kornia's on the batch (same recipe, other draws)
    assert texture > 1.3 * target, (target, texture)


def test_measuring_changes_nothing_in_the_backbone(tiny_assets, source_model) -> None:  # type: ignore[no-untyped-def]
    model, pre = source_model
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.train()
    _shift(model, pre, tiny_assets.target_texture)
    assert model.training and model.backbone.training  # the mode is restored
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer._forward_hooks for layer in model.backbone.modules())
    model.eval()


def test_batches_are_pooled_before_comparing(tiny_assets, source_model) -> None:  # type: ignore[no-untyped-def]
    model, pre = source_model
    paths: list[str | Path] = list(sorted(tiny_assets.target.rglob("*.png")))[:64]
    whole = batchnorm_shift(model.backbone, [load_tensor_batch(paths, pre)], CPU)
    split = batchnorm_shift(
        model.backbone, [load_tensor_batch(paths[:16], pre), load_tensor_batch(paths[16:], pre)], CPU
    )
    assert whole == pytest.approx(split, rel=1e-6)


def test_backbones_without_batchnorm_have_no_signal() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.LayerNorm([4, 6, 6]))
    assert batchnorm_shift(net, [torch.randn(2, 3, 8, 8)], CPU) is None
