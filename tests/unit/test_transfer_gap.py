"""The semantic shift signal: a cross-validated probe on frozen features against the source task."""

from __future__ import annotations

import numpy as np
import pytest

from adaptflow.training.transfer_gap import (
    SourceTask,
    chance_corrected,
    probe_cv_accuracy,
    source_task,
    transfer_gap,
)


def _blobs(
    separation: float, per_class: int = 30, classes: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 16)) * separation
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + rng.normal(size=(len(labels), 16)), labels


def test_source_task_from_weights_pretrained_here_and_from_a_torchvision_enum() -> None:
    here = source_task({"source_val_accuracy": 0.9, "source_classes": ["a", "b", "c", "d", "e"]})
    assert here == SourceTask(0.9, 5)
    enum = source_task({"_metrics": {"ImageNet-1K": {"acc@1": 69.758}}, "categories": ["x"] * 1000})
    assert enum is not None and enum.classes == 1000 and enum.accuracy == pytest.approx(0.69758)
    assert source_task({}) is None  # a plain .pth mirror carries no source task


def test_chance_corrected_puts_chance_at_zero_and_perfect_at_one() -> None:
    assert chance_corrected(0.2, 5) == pytest.approx(0.0)
    assert chance_corrected(1.0, 1000) == pytest.approx(1.0)
    assert chance_corrected(0.6, 5) == pytest.approx(0.5)


def test_the_gap_grows_as_the_features_stop_separating_the_target() -> None:
    source = SourceTask(0.95, 5)
    separable = probe_cv_accuracy(*_blobs(separation=4.0))
    noise = probe_cv_accuracy(*_blobs(separation=0.0))
    assert separable is not None and noise is not None
    assert separable > 0.9 and noise < 0.45
    assert transfer_gap(noise, 5, source) > transfer_gap(separable, 5, source) + 0.4


def test_no_probe_when_a_class_has_a_single_image() -> None:
    features, labels = _blobs(separation=4.0, per_class=3)
    labels[-3:-1] = 0  # class 4 keeps one image: no stratified fold can hold it out
    assert probe_cv_accuracy(features, labels) is None
