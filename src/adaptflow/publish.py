"""The register stage: the winner logged as an MLflow ONNX model, registered with lineage tags, and
put through the promotion gate under the lease (:mod:`adaptflow.promotion`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptflow.config import Settings
from adaptflow.contracts import (
    Candidate,
    ChampionRef,
    Evaluation,
    ExportResult,
    GateDecision,
    Registration,
    Snapshot,
)
from adaptflow.lease import lease_for
from adaptflow.promotion import ChampionRescore, PromotionInputs, promote_under_lease
from adaptflow.registry import CHALLENGER
from adaptflow.tracking import TrackingContext, git_commit, lineage_tags


@dataclass(frozen=True)
class Publication:
    """What the register stage publishes: the exported winner and everything it is judged and tagged by."""

    onnx_path: Path
    winner: Candidate
    snapshot: Snapshot
    evaluation: Evaluation
    export: ExportResult
    settings: Settings
    ctx: TrackingContext
    register_run_id: str


def version_tags(pub: Publication) -> dict[str, str]:
    from adaptflow.models.weights import init_label

    winner, snapshot, evaluation, export = pub.winner, pub.snapshot, pub.evaluation, pub.export
    settings, ctx, register_run_id = pub.settings, pub.ctx, pub.register_run_id
    score = evaluation.score(winner.name)
    tags = {
        "adaptflow.data_fingerprint": snapshot.fingerprint,
        "adaptflow.config_hash": settings.config_hash(),
        "adaptflow.git_commit": git_commit(),
        "adaptflow.strategy": winner.strategy,
        "adaptflow.candidate": winner.name,
        "adaptflow.backbone": winner.backbone.name,
        "adaptflow.backbone_sha256": winner.backbone_sha256,
        "adaptflow.backbone_init": init_label(winner.backbone_sha256),
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


def publish_model(pub: Publication) -> str:
    """Logs + registers the ONNX model in the active run; moves ``challenger``; returns the version."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    from adaptflow.onnx_model import load_onnx_classifier

    winner, onnx_path, settings = pub.winner, pub.onnx_path, pub.settings

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
    client = mlflow.MlflowClient(pub.ctx.tracking_uri)
    for key, value in version_tags(pub).items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version


def describe_version(pub: Publication, version: str, decision: GateDecision) -> None:
    """The version's description: its model card (adaptflow.model_card)."""
    import mlflow

    from adaptflow.model_card import model_card
    from adaptflow.promotion import AUDIT_FILE

    tags = version_tags(pub)
    lineage = {
        "pipeline run": pub.ctx.parent_run_id,
        "register run": pub.register_run_id,
        "git commit": tags["adaptflow.git_commit"],
        **{k.removeprefix("adaptflow."): v for k, v in tags.items() if k.startswith("adaptflow.kfp.")},
    }
    card = model_card(
        version=version,
        winner=pub.winner,
        snapshot=pub.snapshot,
        evaluation=pub.evaluation,
        export=pub.export,
        decision=decision,
        lineage=lineage,
        audit_uri=f"runs:/{pub.register_run_id}/{AUDIT_FILE}" if decision.promote else None,
    )
    client = mlflow.MlflowClient(pub.ctx.tracking_uri)
    client.update_model_version(pub.settings.registry.model_name, version, description=card)


def register_winner(pub: Publication) -> Registration:
    """Registers the winner (``challenger`` moves), then runs the gate and moves ``champion`` if it passes.

    A champion that moved since evaluation is re-scored under the lease on this snapshot's test split.
    """
    import mlflow

    from adaptflow.evaluation import rescore_champion

    settings, ctx, snapshot, evaluation = pub.settings, pub.ctx, pub.snapshot, pub.evaluation
    name = settings.registry.model_name
    version = publish_model(pub)

    def rescore(ref: ChampionRef) -> ChampionRescore:
        return rescore_champion(ref, snapshot, ctx.tracking_uri, settings.evaluate)

    artifacts = mlflow.MlflowClient(ctx.tracking_uri).get_experiment(ctx.experiment_id).artifact_location
    lease = lease_for(name, settings.registry, settings.workdir, ctx.tracking_uri, artifacts)
    run_ids = {"pipeline": ctx.parent_run_id, "register": pub.register_run_id}
    score = evaluation.score(pub.winner.name)
    gate = settings.gate
    inputs = PromotionInputs(ctx.tracking_uri, name, version, score, evaluation, pub.export, gate, run_ids)
    decision, before, after = promote_under_lease(inputs, lease, rescore)
    describe_version(pub, version, decision)
    return Registration(
        model_name=name,
        version=version,
        model_uri=f"models:/{name}/{version}",
        champion_before=before,
        champion_after=after,
        promoted=decision.promote,
        gate=decision,
    )
