"""The run summary: what ``adaptflow run`` prints, as a table or as ``--json``."""

from __future__ import annotations

from typing import Any

from adaptflow.config import Settings
from adaptflow.contracts import (
    BaselineResult,
    Candidate,
    ChampionRef,
    Evaluation,
    ExportResult,
    Registration,
    Snapshot,
)
from adaptflow.tracking import TrackingContext, run_page_url


def dataset_summary(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "source": snapshot.source_uri,
        "fingerprint": snapshot.fingerprint,
        "classes": list(snapshot.class_names),
        "counts": snapshot.counts,
        "quarantined": [q.model_dump() for q in snapshot.quarantined],
    }


def unchanged_summary(
    snapshot: Snapshot, reason: str, champion: ChampionRef | None, settings: Settings, ctx: TrackingContext
) -> dict[str, Any]:
    """The summary of a run that stopped after ingest: data and config unchanged since the champion."""
    return {
        "status": "unchanged",
        "reason": reason,
        "dataset": dataset_summary(snapshot),
        "champion_before": champion.version if champion else None,
        "promoted": False,
        "registered_version": None,
        "mlflow": {
            "tracking_uri": ctx.tracking_uri,
            "experiment_id": ctx.experiment_id,
            "run_id": ctx.parent_run_id,
            "ui_url": run_page_url(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id),
            "model_name": settings.registry.model_name,
        },
    }


def reference_summary(evaluation: Evaluation) -> dict[str, Any] | None:
    """The floor a winner had to beat: the better reference, and every reference's test accuracy."""
    best = evaluation.reference_score()
    if best is None:
        return None
    scores = {s.name: s.accuracy for s in evaluation.scores if s.kind == "reference"}
    return {
        "name": best.name,
        "accuracy": best.accuracy,
        "accuracy_ci95": list(best.accuracy_ci95),
        "scores": scores,
    }


def build_summary(
    snapshot: Snapshot,
    baseline: BaselineResult,
    selected: Candidate,
    evaluation: Evaluation,
    export: ExportResult,
    registration: Registration,
    ctx: TrackingContext,
) -> dict[str, Any]:
    from adaptflow.models.weights import init_label

    ran = baseline.decision.should_finetune and selected.name != "baseline"
    champion = evaluation.champion_score()

    def test_metrics(name: str) -> dict[str, Any]:
        s = evaluation.score(name)
        return {"accuracy": s.accuracy, "accuracy_ci95": list(s.accuracy_ci95), "macro_f1": s.macro_f1}

    return {
        "status": "completed",
        "dataset": dataset_summary(snapshot),
        "backbone": {
            "name": baseline.candidate.backbone.name,
            "init": init_label(baseline.candidate.backbone_sha256),
            "sha256": baseline.candidate.backbone_sha256,
        },
        "baseline": {
            "metrics": test_metrics("baseline")
            | {"val_accuracy": baseline.candidate.metrics["val_accuracy"]},
            "cost": baseline.candidate.cost.model_dump(),
        },
        "advisor": {
            "should_finetune": baseline.decision.should_finetune,
            "reason": baseline.decision.reason,
            "signals": baseline.decision.signals,
        },
        "finetune": {
            "ran": ran,
            "strategy": selected.strategy if ran else None,
            "reason": baseline.decision.reason,
            "metrics": (test_metrics(selected.name) | {"val_accuracy": selected.metrics["val_accuracy"]})
            if ran
            else None,
            "cost": selected.cost.model_dump() if ran else None,
            "resumed_from": selected.extra.get("resumed_from") if ran else None,
        },
        "reference": reference_summary(evaluation),
        "winner": evaluation.winner,
        "winner_reason": evaluation.winner_reason,
        "champion_before": registration.champion_before,
        "champion_before_accuracy": champion.accuracy if champion else None,
        "mcnemar_p_value": evaluation.mcnemar_p_value,
        "registered_version": registration.version,
        "model_uri": registration.model_uri,
        "promoted": registration.promoted,
        "champion_after": registration.champion_after,
        "gate": {"promote": registration.gate.promote, "reasons": list(registration.gate.reasons)},
        "onnx": {
            "max_abs_diff": export.max_abs_diff,
            "parity": export.parity,
            "tolerance": export.tolerance,
            "latency_ms_p50": export.latency_ms_p50,
        },
        "mlflow": {
            "tracking_uri": ctx.tracking_uri,
            "experiment_id": ctx.experiment_id,
            "run_id": ctx.parent_run_id,
            "ui_url": run_page_url(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id),
            "model_name": registration.model_name,
        },
    }
