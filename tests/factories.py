"""Small builders for stage results, shared by unit tests and the promoter processes of the race tests."""

from __future__ import annotations

from typing import Any

from adaptflow.contracts import (
    CompareResult,
    EpochRecord,
    ExportResult,
    FinetuneDecision,
    ModelScore,
    StrategyOutcome,
)


def model_score(name: str, accuracy: float, *, version: str | None = "1", n: int = 200) -> ModelScore:
    """A score whose kind follows its name: "champion" is the champion, anything else a candidate."""
    return ModelScore(
        name=name,
        kind="champion" if name == "champion" else "candidate",
        version=version,
        accuracy=accuracy,
        accuracy_ci95=(max(0.0, accuracy - 0.02), min(1.0, accuracy + 0.02)),
        macro_f1=accuracy,
        per_class_precision={},
        per_class_recall={},
        confusion_matrix=[[0]],
        n=n,
    )


def export_result(passed: bool = True, latency_ms: float = 1.0) -> ExportResult:
    return ExportResult(
        candidate="c",
        max_abs_diff=1e-6 if passed else 1.0,
        parity={"1": 1e-6},
        tolerance=1e-4,
        passed=passed,
        latency_ms_p50=latency_ms,
        latency_ms_p95=latency_ms,
        opset=18,
        size_bytes=1,
    )


def strategy_outcome(
    strategy: str, accuracy: float, trainable_params: int = 8_000_000, wall_seconds: float = 2.0
) -> StrategyOutcome:
    """One row of a comparison on a 20-image, two-class test split, with three epochs of curves."""
    score = model_score(strategy, accuracy, version=None, n=20)
    score = score.model_copy(update={"confusion_matrix": [[8, 2], [1, 9]], "macro_f1": accuracy - 0.01})
    history = tuple(
        EpochRecord(
            epoch=e,
            train_loss=1 / e,
            train_accuracy=min(1.0, accuracy + 0.05 * e),
            val_loss=1 / e,
            val_accuracy=accuracy,
            seconds=1.0,
        )
        for e in (1, 2, 3)
    )
    return StrategyOutcome(
        strategy=strategy,
        candidate=strategy,
        score=score,
        trainable_params=trainable_params,
        total_params=11_000_000,
        wall_seconds=wall_seconds,
        images_per_second=100.0,
        peak_memory_mb=900.0,
        train_accuracy=accuracy + 0.1,
        val_accuracy=accuracy,
        train_val_gap=0.1,
        best_epoch=2,
        epochs_run=3,
        history=history,
        p_value_vs_baseline=None if strategy == "baseline" else 0.03,
    )


def compare_result(*outcomes: StrategyOutcome, **fields: Any) -> CompareResult:
    """A comparison of ``outcomes`` (the first is the baseline; the last is best) on cat/dog images."""
    values: dict[str, Any] = {
        "data_uri": "/data/digits",
        "fingerprint": "ab" * 32,
        "class_names": ("cat", "dog"),
        "counts": {"train": 60, "val": 20, "test": 20},
        "min_train_images_per_class": 30,
        "test_size": 20,
        "decision": FinetuneDecision(
            should_finetune=True, strategy="full", reason="fine-tune: baseline below target", signals={}
        ),
        "outcomes": outcomes,
        "best": outcomes[-1].strategy,
        "best_reason": f"{outcomes[-1].strategy} beats the baseline by +0.1000",
        "finetune_margin": 0.01,
        "epochs": 3,
        "device": "cpu",
    }
    return CompareResult(**(values | fields))
