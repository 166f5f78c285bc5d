"""Small builders for stage results, shared by unit tests and the promoter processes of the race tests."""

from __future__ import annotations

from adaptflow.contracts import ExportResult, ModelScore


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
