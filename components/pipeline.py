"""The main DAG's components, one per stage, plus the Else branches' pass-throughs: thin shells."""

from dataclasses import dataclass
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def ingest(
    data_uri: str,
    config_json: str,
    parent_run_id: str,
    force: bool,
    kfp_run_id: str,
    pipeline_name: str,
    pipeline_version: str,
    snapshot: Output[Dataset],
) -> NamedTuple(
    "IngestOutputs",
    [("fingerprint", str), ("parent_run_id", str), ("config_hash", str), ("changed", bool), ("reason", str)],
):
    """Validate, de-duplicate, split and fingerprint the images at data_uri; unchanged since the champion?"""
    from adaptflow.steps import Lineage, ingest_step

    lineage = Lineage(kfp_run_id, pipeline_name, pipeline_version)
    return ingest_step(data_uri, config_json, parent_run_id, snapshot.path, force, lineage)


def baseline(
    snapshot: Input[Dataset],
    config_json: str,
    parent_run_id: str,
    fingerprint: str,
    config_hash: str,
    result: Output[Model],
) -> NamedTuple("BaselineOutputs", [("should_finetune", bool), ("reason", str)]):
    """Transfer learning: frozen backbone, cached features, a new linear head; the advisor's verdict."""
    from adaptflow.steps import baseline_step

    return baseline_step(snapshot.path, config_json, parent_run_id, fingerprint, result.path)


def finetune(
    snapshot: Input[Dataset],
    baseline: Input[Model],
    config_json: str,
    parent_run_id: str,
    fingerprint: str,
    config_hash: str,
    candidate: Output[Model],
):
    """Fine-tune from the baseline head (LP-FT) with the configured strategy."""
    from adaptflow.steps import finetune_step

    finetune_step(snapshot.path, baseline.path, config_json, parent_run_id, fingerprint, candidate.path)


def shard(snapshot: Input[Dataset], config_json: str, parent_run_id: str, fingerprint: str, config_hash: str):
    """Write the train and val splits as WebDataset tar shards (finetune.data_source: shards)."""
    from adaptflow.steps import shard_step

    shard_step(snapshot.path, config_json, parent_run_id)


def keep_baseline(baseline: Input[Model], fingerprint: str, config_hash: str, candidate: Output[Model]):
    """Pass the baseline candidate on when fine-tuning is not worth it."""
    from adaptflow.steps import keep_baseline_step

    keep_baseline_step(baseline.path, candidate.path)


def evaluate(
    snapshot: Input[Dataset],
    baseline: Input[Model],
    selected: Input[Model],
    config_json: str,
    parent_run_id: str,
    fingerprint: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
) -> NamedTuple("EvaluateOutputs", [("winner", str), ("winner_accuracy", float)]):
    """Score every candidate and the current champion on the same test split; pick the winner."""
    import json

    from adaptflow.contracts import Snapshot
    from adaptflow.steps import evaluate_step

    out = evaluate_step(
        snapshot.path, baseline.path, selected.path, config_json, parent_run_id, fingerprint, evaluation.path
    )
    metrics.log_metric("winner_test_accuracy", out.winner_accuracy)
    confusion.log_confusion_matrix(
        list(Snapshot.load(snapshot.path).class_names), json.loads(out.confusion_matrix)
    )
    return out.winner, out.winner_accuracy


def export(
    evaluation: Input[Artifact],
    baseline: Input[Model],
    selected: Input[Model],
    config_json: str,
    parent_run_id: str,
    fingerprint: str,
    config_hash: str,
    onnx_model: Output[Model],
) -> NamedTuple("ExportOutputs", [("max_abs_diff", float), ("latency_ms_p50", float)]):
    """Export the winner to ONNX and check it against PyTorch."""
    from adaptflow.steps import export_step

    return export_step(
        evaluation.path, baseline.path, selected.path, config_json, parent_run_id, onnx_model.path
    )


def register(
    snapshot: Input[Dataset],
    baseline: Input[Model],
    selected: Input[Model],
    evaluation: Input[Artifact],
    onnx_model: Input[Model],
    config_json: str,
    parent_run_id: str,
    registration: Output[Artifact],
) -> NamedTuple("RegisterOutputs", [("version", str), ("promoted", bool)]):
    """Register the ONNX model; move `challenger`, and `champion` only through the gate."""
    from adaptflow.steps import register_step

    return register_step(
        snapshot.path,
        baseline.path,
        selected.path,
        evaluation.path,
        onnx_model.path,
        config_json,
        parent_run_id,
        registration.path,
    )


def report_unchanged(
    snapshot: Input[Dataset],
    config_json: str,
    parent_run_id: str,
    reason: str,
    registration: Output[Artifact],
):
    """Data and config equal the champion's: end the run without training."""
    from adaptflow.steps import report_unchanged_step

    report_unchanged_step(snapshot.path, config_json, parent_run_id, reason, registration.path)


@dataclass(frozen=True)
class PipelineComponents:
    ingest: Any
    baseline: Any
    finetune: Any
    shard: Any
    keep_baseline: Any
    evaluate: Any
    export: Any
    register: Any
    report_unchanged: Any


def pipeline_components(base_image: str) -> PipelineComponents:
    """Components whose image is ``base_image`` (adaptflow's own image, which already holds kfp)."""

    def make(func: Any) -> Any:
        return dsl.component(base_image=base_image, install_kfp_package=False)(func)

    return PipelineComponents(
        ingest=make(ingest),
        baseline=make(baseline),
        finetune=make(finetune),
        shard=make(shard),
        keep_baseline=make(keep_baseline),
        evaluate=make(evaluate),
        export=make(export),
        register=make(register),
        report_unchanged=make(report_unchanged),
    )
