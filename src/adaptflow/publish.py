"""Logging the winner as an MLflow ONNX model and registering it, with lineage tags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from adaptflow.config import Settings
from adaptflow.contracts import Candidate, Evaluation, ExportResult, Snapshot
from adaptflow.registry import CHALLENGER
from adaptflow.tracking import TrackingContext, git_commit, lineage_tags


def version_tags(
    winner: Candidate,
    snapshot: Snapshot,
    evaluation: Evaluation,
    export: ExportResult,
    settings: Settings,
    ctx: TrackingContext,
    register_run_id: str,
) -> dict[str, str]:
    score = evaluation.score(winner.name)
    tags = {
        "adaptflow.data_fingerprint": snapshot.fingerprint,
        "adaptflow.config_hash": settings.config_hash(),
        "adaptflow.git_commit": git_commit(),
        "adaptflow.strategy": winner.strategy,
        "adaptflow.candidate": winner.name,
        "adaptflow.backbone": winner.backbone.name,
        "adaptflow.backbone_sha256": winner.backbone_sha256,
        "adaptflow.metrics.test_accuracy": f"{score.accuracy:.6f}",
        "adaptflow.metrics.test_macro_f1": f"{score.macro_f1:.6f}",
        "adaptflow.metrics.val_accuracy": f"{winner.metrics.get('val_accuracy', float('nan')):.6f}",
        "adaptflow.onnx.max_abs_diff": f"{export.max_abs_diff:.3e}",
        "adaptflow.onnx.latency_ms_p50": f"{export.latency_ms_p50:.3f}",
        "adaptflow.pipeline_run_id": ctx.parent_run_id,
        "adaptflow.register_run_id": register_run_id,
        "adaptflow.test_size": str(evaluation.test_size),
        "adaptflow.class_names": json.dumps(list(winner.class_names))[:4900],
    }
    if evaluation.mcnemar_p_value is not None:
        tags["adaptflow.mcnemar_p_value"] = f"{evaluation.mcnemar_p_value:.6f}"
    tags.update({f"adaptflow.{k}": v for k, v in lineage_tags(ctx.tracking_uri, ctx.parent_run_id).items()})
    return tags


def publish_model(
    onnx_path: Path,
    winner: Candidate,
    snapshot: Snapshot,
    evaluation: Evaluation,
    export: ExportResult,
    settings: Settings,
    ctx: TrackingContext,
    register_run_id: str,
) -> str:
    """Logs + registers the ONNX model in the active run; moves ``challenger``; returns the version."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    from adaptflow.onnx_model import load_onnx_classifier

    name = settings.registry.model_name
    size = winner.preprocessing.input_size
    example = np.zeros((1, 3, size, size), dtype=np.float32)
    logits = load_onnx_classifier(onnx_path).logits(example)
    info = mlflow.onnx.log_model(
        onnx_model=onnx.load(str(onnx_path)),
        name="model",
        registered_model_name=name,
        signature=infer_signature(example, logits),
        input_example=example,
        save_as_external_data=False,
        metadata={
            "class_names": list(winner.class_names),
            "preprocessing": winner.preprocessing.model_dump(mode="json"),
            "candidate": winner.name,
        },
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient(ctx.tracking_uri)
    for key, value in version_tags(
        winner, snapshot, evaluation, export, settings, ctx, register_run_id
    ).items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version
