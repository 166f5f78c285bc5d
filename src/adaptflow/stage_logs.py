"""What each step records in MLflow: one helper per stage, called inside the stage's nested run.

Steps stay thin (load inputs, call one library function, call one of these); the library stages
never import MLflow, so they can be tested without a tracking store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from adaptflow.config import Settings, dump_settings
from adaptflow.contracts import (
    BaselineResult,
    Candidate,
    CompareResult,
    Evaluation,
    ExportResult,
    FinetuneDecision,
    Registration,
    Snapshot,
    StrategyOutcome,
)
from adaptflow.tracking import TrackingContext, flat_params

MAX_TAG = 4900  # MLflow tag values are capped at 5,000 characters


def log_pipeline_config(ctx: TrackingContext, settings: Settings, tags: dict[str, str], out: Path) -> None:
    """On the parent run: lineage tags, the resolved config as a file and (the first 100) as params."""
    import mlflow

    client = mlflow.MlflowClient(ctx.tracking_uri)
    for key, value in tags.items():
        client.set_tag(ctx.parent_run_id, key, value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_settings(settings))
    client.log_artifact(ctx.parent_run_id, str(out / "config.yaml"))
    params = flat_params("", settings.model_dump(mode="json", exclude={"cluster"}))
    client.log_batch(ctx.parent_run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()][:100])


def log_dataset_input(ctx: TrackingContext, snapshot: Snapshot, data_uri: str) -> None:
    """The snapshot as an MLflow dataset input of the pipeline run and the ingest run: digest = the
    fingerprint (its first 36 hex digits, MLflow's limit), source = the data URI, profile = the counts."""
    import mlflow
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        name=Path(data_uri.rstrip("/")).name or "snapshot",
        digest=snapshot.fingerprint[:36],
        source_type="s3" if data_uri.startswith("s3://") else "local",
        source=json.dumps({"uri": data_uri}),
        profile=json.dumps(
            {
                "fingerprint": snapshot.fingerprint,
                "counts": snapshot.counts,
                "classes": len(snapshot.class_names),
                "quarantined": len(snapshot.quarantined),
            }
        ),
    )
    entry = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])]
    client = mlflow.MlflowClient(ctx.tracking_uri)
    client.log_inputs(ctx.parent_run_id, datasets=entry)
    active = mlflow.active_run()
    if active is not None:
        client.log_inputs(active.info.run_id, datasets=entry)


def log_ingest(
    ctx: TrackingContext, snapshot: Snapshot, data_uri: str, out: Path, changed: bool, reason: str
) -> None:
    import mlflow

    log_dataset_input(ctx, snapshot, data_uri)

    mlflow.log_params({"source_uri": data_uri, "classes": ",".join(snapshot.class_names)[:6000]})
    mlflow.log_metrics(
        {f"images_{k}": float(v) for k, v in snapshot.counts.items()}
        | {"quarantined": float(len(snapshot.quarantined))}
    )
    mlflow.set_tags(
        {
            "adaptflow.data_fingerprint": snapshot.fingerprint,
            "adaptflow.changed": str(changed),
            "adaptflow.change_reason": reason,
        }
    )
    from adaptflow.data.snapshot_store import saved_files

    mlflow.log_artifact(str(out / "quarantine.csv"))
    for name in saved_files(out, Snapshot.FILE):  # snapshot.json loads only beside its Parquet files
        mlflow.log_artifact(str(out / name))
    mlflow.MlflowClient(ctx.tracking_uri).set_tag(
        ctx.parent_run_id, "adaptflow.data_fingerprint", snapshot.fingerprint
    )


def log_candidate(candidate: Candidate, out: Path) -> None:
    """A trained candidate's metrics, cost figures, per-epoch curves and their plot."""
    import mlflow

    from adaptflow.plots import learning_curves_png

    cost = candidate.cost
    optional = {
        "train_images_per_second": cost.train_images_per_second,
        "peak_memory_mb": cost.peak_memory_mb,
    }
    mlflow.log_metrics(
        {k: float(v) for k, v in candidate.metrics.items()}
        | {
            "wall_seconds": cost.wall_seconds,
            "trainable_params": cost.trainable_params,
            "total_params": cost.total_params,
            "epochs_run": cost.epochs_run,
            "backbone_forward_images": cost.backbone_forward_images,
        }
        | {k: v for k, v in optional.items() if v}
    )
    for h in candidate.history:
        mlflow.log_metrics(
            {
                "epoch_train_loss": h.train_loss,
                "epoch_train_accuracy": h.train_accuracy,
                "epoch_val_loss": h.val_loss,
                "epoch_val_accuracy": h.val_accuracy,
            },
            step=h.epoch,
        )
    if candidate.history:
        mlflow.log_artifact(
            str(learning_curves_png(candidate.history, candidate.name, out / "learning_curves.png"))
        )


def log_baseline(ctx: TrackingContext, settings: Settings, result: BaselineResult, out: Path) -> None:
    """The baseline candidate, its settings, and the advisor's decision with every signal."""
    import mlflow

    mlflow.log_params(flat_params("backbone", settings.backbone.model_dump(mode="json")))
    mlflow.log_params(flat_params("baseline", settings.baseline.model_dump(mode="json")))
    log_candidate(result.candidate, out)
    decision = result.decision
    mlflow.log_params({f"advisor.{k}": v for k, v in decision.signals.items()})
    mlflow.set_tags(
        {
            "adaptflow.should_finetune": str(decision.should_finetune),
            "adaptflow.advisor_reason": decision.reason[:MAX_TAG],
        }
    )
    mlflow.log_dict(decision.model_dump(mode="json"), "advisor.json")
    mlflow.MlflowClient(ctx.tracking_uri).set_tag(
        ctx.parent_run_id, "adaptflow.advisor_reason", decision.reason[:MAX_TAG]
    )


def log_evaluation(evaluation: Evaluation, snapshot: Snapshot, out: Path) -> None:
    """Every model's test metrics and confusion matrix, the McNemar p-value and why the winner won."""
    import mlflow

    from adaptflow.plots import confusion_matrix_png

    for s in evaluation.scores:
        mlflow.log_metrics(
            {
                f"{s.name}.test_accuracy": s.accuracy,
                f"{s.name}.test_macro_f1": s.macro_f1,
                f"{s.name}.test_accuracy_ci_low": s.accuracy_ci95[0],
                f"{s.name}.test_accuracy_ci_high": s.accuracy_ci95[1],
            }
        )
        title = f"{s.name}: accuracy {s.accuracy:.3f}"
        png = confusion_matrix_png(
            s.confusion_matrix, snapshot.class_names, title, out / f"confusion_{s.name}.png"
        )
        mlflow.log_artifact(str(png), "confusion_matrices")
    if evaluation.mcnemar_p_value is not None:
        mlflow.log_metric("mcnemar_p_value", evaluation.mcnemar_p_value)
    mlflow.set_tags(
        {"adaptflow.winner": evaluation.winner, "adaptflow.winner_reason": evaluation.winner_reason[:MAX_TAG]}
    )
    mlflow.log_artifact(str(out / Evaluation.FILE))


def log_export(settings: Settings, result: ExportResult, out: Path) -> None:
    import mlflow

    mlflow.log_params(flat_params("export", settings.export.model_dump(mode="json")))
    mlflow.log_metrics(
        {
            "max_abs_diff": result.max_abs_diff,
            "latency_ms_p50": result.latency_ms_p50,
            "latency_ms_p95": result.latency_ms_p95,
            "onnx_size_bytes": result.size_bytes,
            **{f"parity_batch_{k}": v for k, v in result.parity.items()},
        }
    )
    mlflow.log_artifact(str(out / ExportResult.FILE))


def log_registration(registration: Registration) -> None:
    import mlflow

    mlflow.set_tags(
        {
            "adaptflow.promoted": str(registration.promoted),
            "adaptflow.gate.reasons": "; ".join(registration.gate.reasons)[:MAX_TAG],
        }
    )


def parent_metrics(summary: dict[str, Any], wall_seconds: float) -> dict[str, float]:
    """The pipeline run's metrics, under the same keys in every run, so the experiment's runs chart
    across each other: the winner's ``test_accuracy`` and ``macro_f1``, then each contender's."""
    metrics: dict[str, float] = {"wall_seconds": wall_seconds}
    baseline = summary.get("baseline", {}).get("metrics") or {}
    finetune = (summary.get("finetune") or {}).get("metrics") or {}
    winner = finetune if summary.get("winner") not in (None, "baseline") and finetune else baseline
    for key, value in (
        ("test_accuracy", winner.get("accuracy")),
        ("macro_f1", winner.get("macro_f1")),
        ("baseline_test_accuracy", baseline.get("accuracy")),
        ("finetune_test_accuracy", finetune.get("accuracy")),
        ("champion_test_accuracy", summary.get("champion_before_accuracy")),
        ("reference_test_accuracy", (summary.get("reference") or {}).get("accuracy")),
    ):
        if value is not None:
            metrics[key] = float(value)
    return metrics


def run_title(model: str, summary: dict[str, Any], status: str) -> str:
    """The pipeline run's name in the MLflow UI: ``<model>: <outcome>``."""
    if status == "unchanged":
        return f"{model}: unchanged"
    version = summary.get("registered_version")
    return (
        f"{model}: promoted v{version}" if summary.get("promoted") else f"{model}: not promoted (v{version})"
    )


def log_outcome_summary(
    ctx: TrackingContext, summary: dict[str, Any], status: str, out: Path, name: str
) -> None:
    """The run's summary file, on the parent run and (inside a stage run) as an artifact; the status
    tag, the run's name (``<model>: <outcome>``) and its metrics (:func:`parent_metrics`)."""
    import mlflow

    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(summary, indent=2))
    client = mlflow.MlflowClient(ctx.tracking_uri)
    client.set_tag(ctx.parent_run_id, "adaptflow.status", status)
    model = summary.get("mlflow", {}).get("model_name") or "adaptflow"
    client.set_tag(ctx.parent_run_id, "mlflow.runName", run_title(model, summary, status))
    started = client.get_run(ctx.parent_run_id).info.start_time or 0
    metrics = parent_metrics(summary, max(0.0, time.time() - started / 1000))
    client.log_batch(
        ctx.parent_run_id,
        metrics=[mlflow.entities.Metric(k, v, int(time.time() * 1000), 0) for k, v in metrics.items()],
    )
    if mlflow.active_run() is not None:
        mlflow.log_dict(summary, name)


def log_outcome(outcome: StrategyOutcome, prefix: str = "") -> None:
    """One row of ``adaptflow compare``: its test score, cost figures and (unprefixed) curves."""
    import mlflow

    s = outcome.score
    metrics = {
        "test_accuracy": s.accuracy,
        "test_accuracy_ci_low": s.accuracy_ci95[0],
        "test_accuracy_ci_high": s.accuracy_ci95[1],
        "test_macro_f1": s.macro_f1,
        "trainable_params": float(outcome.trainable_params),
        "total_params": float(outcome.total_params),
        "wall_seconds": outcome.wall_seconds,
        "train_val_gap": outcome.train_val_gap,
        "val_accuracy": outcome.val_accuracy,
        "train_accuracy": outcome.train_accuracy,
        "epochs_run": float(outcome.epochs_run),
    }
    if outcome.images_per_second:
        metrics["images_per_second"] = outcome.images_per_second
    if outcome.peak_memory_mb:
        metrics["peak_memory_mb"] = outcome.peak_memory_mb
    if outcome.p_value_vs_baseline is not None:
        metrics["mcnemar_p_vs_baseline"] = outcome.p_value_vs_baseline
    mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()})
    if not prefix:
        for h in outcome.history:
            mlflow.log_metrics(
                {"epoch_train_accuracy": h.train_accuracy, "epoch_val_accuracy": h.val_accuracy},
                step=h.epoch,
            )


def log_compare_result(ctx: TrackingContext, result: CompareResult) -> None:
    """On the compare parent run: each row's test accuracy and wall time, and the best row with why."""
    import mlflow

    client = mlflow.MlflowClient(ctx.tracking_uri)
    for o in result.outcomes:
        client.log_metric(ctx.parent_run_id, f"{o.strategy}.test_accuracy", o.score.accuracy)
        client.log_metric(ctx.parent_run_id, f"{o.strategy}.wall_seconds", o.wall_seconds)
    for r in result.references:
        client.log_metric(ctx.parent_run_id, f"{r.name}.test_accuracy", r.accuracy)
    client.set_tag(ctx.parent_run_id, "adaptflow.compare.best", result.best)
    client.set_tag(ctx.parent_run_id, "adaptflow.compare.best_reason", result.best_reason[:MAX_TAG])
    if result.supported_best is not None:  # what the test split supports (ties: the cheaper one)
        client.set_tag(ctx.parent_run_id, "adaptflow.compare.supported_best", result.supported_best)
        reason = result.supported_best_reason or ""
        client.set_tag(ctx.parent_run_id, "adaptflow.compare.supported_best_reason", reason[:MAX_TAG])


def log_compare_file(ctx: TrackingContext, out: Path) -> None:
    import mlflow

    mlflow.MlflowClient(ctx.tracking_uri).log_artifact(
        ctx.parent_run_id, str(out / CompareResult.FILE), "report"
    )


def log_compare_baseline(settings: Settings, outcome: StrategyOutcome, decision: FinetuneDecision) -> None:
    """The compare baseline row, the fine-tuning settings every strategy shares, and the advisor's signals."""
    import mlflow

    mlflow.log_params(flat_params("finetune", settings.finetune.model_dump(mode="json")))
    log_outcome(outcome)
    mlflow.log_params({f"advisor.{k}": v for k, v in decision.signals.items()})
    mlflow.set_tag("adaptflow.advisor_reason", decision.reason[:MAX_TAG])
