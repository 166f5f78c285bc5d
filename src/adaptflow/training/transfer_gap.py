"""Semantic shift: how much worse the frozen features separate the target's classes than the source's.

The BatchNorm-statistics signal (:mod:`adaptflow.training.shift`) sees how different the target's
*inputs* look to each layer. It cannot tell "new classes of the same kind of image" from "another
kind of image": on the split tasks in bench/RESULTS.md ("Domain shift on real pairs") a digits
backbone read 0.08 on clothing, below the 0.11 of its own in-domain digits, because the deep layers
see unseen classes as foreign either way.

This signal asks the question with labels instead. The target's cached frozen features are scored
with a cross-validated logistic regression, and its accuracy is compared with the accuracy the
backbone reached on its own source task. Both are chance-corrected, ``(acc - 1/k) / (1 - 1/k)`` for
``k`` classes, so a 5-class target and a 1000-class source sit on one scale:

    transfer_gap = source (chance-corrected) - target probe (chance-corrected)

0 or below: the features separate the target as well as they separated the source. On the real
pairs it put the digits backbone's clothing targets far above its in-domain digits (0.21-0.35
against 0.12), where the BatchNorm signal fails. It is not a domain test on its own: it mixes in how
easy the target is. The fashion backbone probes the easy digits better than its own source (gap
-0.05), and texture-drawn digits that a probe still reads well score low here and high on the
BatchNorm signal. So both are recorded and explained. Only the BatchNorm signal drives a rule.

The source accuracy comes with the weights: ``source_val_accuracy`` and ``source_classes`` in the
metadata of weights pretrained here, torchvision's ImageNet-1K top-1 for its enums. Weights without
it (a plain .pth mirror) get ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_FOLDS = 5


@dataclass(frozen=True)
class SourceTask:
    accuracy: float
    classes: int


def source_task(meta: Mapping[str, Any]) -> SourceTask | None:
    """The backbone's own task from its weights' metadata (pretrained here, or a torchvision enum's)."""
    accuracy, classes = meta.get("source_val_accuracy"), meta.get("source_classes")
    if isinstance(accuracy, (int, float)) and isinstance(classes, (list, tuple)) and len(classes) > 1:
        return SourceTask(float(accuracy), len(classes))
    metrics = meta.get("_metrics", {}).get("ImageNet-1K", {})
    categories = meta.get("categories")
    if "acc@1" in metrics and isinstance(categories, (list, tuple)) and len(categories) > 1:
        return SourceTask(float(metrics["acc@1"]) / 100.0, len(categories))
    return None


def chance_corrected(accuracy: float, classes: int) -> float:
    chance = 1.0 / classes
    return (accuracy - chance) / (1.0 - chance)


def probe_cv_accuracy(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float | None:
    """Stratified k-fold accuracy of a logistic regression on standardised frozen features.

    Cross-validation over train+val, not the validation split alone: with 10 images per class the
    validation split holds 2 per class, and one image moves its accuracy by 10 points.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(labels)
    counts = counts[counts > 0]
    if len(counts) < 2 or counts.min() < 2:
        return None
    folds = StratifiedKFold(n_splits=min(MAX_FOLDS, int(counts.min())), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(np.mean(cross_val_score(probe, features, labels, cv=folds)))


def transfer_gap(probe_accuracy: float, target_classes: int, source: SourceTask) -> float:
    return chance_corrected(source.accuracy, source.classes) - chance_corrected(
        probe_accuracy, target_classes
    )
