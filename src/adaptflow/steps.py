"""Steps: what each KFP component calls. A step = config parsing + MLflow tracking + one pure stage.

Components pass plain strings and artifact folders; steps turn them into typed inputs, run the
stage, log params/metrics/plots to the stage's nested MLflow run, and write the typed result into
the output folder. Nothing here knows whether it runs in a Kubeflow pod or under kfp.local.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from adaptflow.config import Settings, dump_settings
from adaptflow.contracts import BaselineResult, Candidate, Evaluation, ExportResult, Registration, Snapshot
from adaptflow.errors import AdaptflowError
from adaptflow.logs import setup_logging
from adaptflow.tracking import (
    TrackingContext,
    flat_params,
    resolve_tracking_uri,
    stage_run,
    start_pipeline_run,
)

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
ERROR_FILE_ENV = "ADAPTFLOW_ERROR_FILE"

F = TypeVar("F", bound=Callable[..., Any])


def describe_error(error: BaseException) -> tuple[str, str | None]:
    """(message, hint) for the user: our own errors carry both; a full disk gets its own advice."""
    if isinstance(error, AdaptflowError):
        return error.message, error.hint
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = error.filename or "the output folder"
        return (
            f"disk full while writing {where}",
            "free space there, or point workdir / the pipeline root at a larger volume; outputs are "
            "written to a temporary file and renamed, so nothing already saved was damaged",
        )
    return f"{type(error).__name__}: {error}", None


def reports_errors(stage: str) -> Callable[[F], F]:
    """Logs a stage's failure clearly, records it for the local runner, and re-raises."""

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except Exception as error:
                message, hint = describe_error(error)
                log.error("stage %s failed: %s%s", stage, message, f" (hint: {hint})" if hint else "")
                path = os.environ.get(ERROR_FILE_ENV)
                if path:
                    Path(path).write_text(json.dumps({"stage": stage, "message": message, "hint": hint}))
                raise

        return run  # type: ignore[return-value]

    return wrap


def _settings(config_json: str) -> Settings:
    setup_logging()
    return Settings.from_json(config_json)


def _context(settings: Settings, parent_run_id: str) -> TrackingContext:
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(settings)
    experiment_id = MlflowClient(uri).get_run(parent_run_id).info.experiment_id
    return TrackingContext(uri, str(experiment_id), parent_run_id)


def _workdir_path(settings: Settings, *parts: str) -> Path:
    return Path(settings.workdir).resolve().joinpath(*parts)


class Lineage(NamedTuple):
    """KFP facts recorded on every MLflow run and model version."""

    kfp_run_id: str
    pipeline_name: str
    pipeline_version: str

    def tags(self) -> dict[str, str]:
        values = {
            "kfp.run_id": self.kfp_run_id,
            "kfp.pipeline_name": self.pipeline_name,
            "kfp.pipeline_version": self.pipeline_version,
        }
        return {k: v for k, v in values.items() if v}


class IngestOutputs(NamedTuple):
    fingerprint: str
    parent_run_id: str
    config_hash: str
    changed: bool
    reason: str


def unchanged_since_champion(
    tracking_uri: str, model_name: str, fingerprint: str, config_hash: str
) -> str | None:
    """Why training can be skipped, or None.

    Skipped when the champion, or the challenger (the last candidate trained and gated), was made
    from this exact data and config: retraining would reproduce it and burn GPU hours for nothing.
    """
    from mlflow.tracking import MlflowClient

    from adaptflow.registry import CHALLENGER, CHAMPION, get_champion

    client = MlflowClient(tracking_uri)
    for alias in (CHAMPION, CHALLENGER):
        ref = get_champion(tracking_uri, model_name, alias)
        if ref is None:
            continue
        tags = client.get_model_version(model_name, ref.version).tags
        if (
            tags.get("adaptflow.data_fingerprint") == fingerprint
            and tags.get("adaptflow.config_hash") == config_hash
        ):
            verdict = tags.get("adaptflow.gate.decision", "unknown")
            return (
                f"unchanged: data fingerprint {fingerprint[:12]} and config hash {config_hash[:12]} equal those of "
                f"the {alias} v{ref.version} (gate: {verdict}); nothing to retrain (use --force to retrain anyway)"
            )
    return None


@reports_errors("ingest")
def ingest_step(
    data_uri: str,
    config_json: str,
    parent_run_id: str,
    out_dir: str,
    force: bool = False,
    lineage: Lineage | None = None,
) -> IngestOutputs:
    import mlflow

    from adaptflow.data.ingest import ingest, write_quarantine_report

    settings = _settings(config_json)
    config_hash = settings.config_hash()
    lineage_tags = lineage.tags() if lineage else {}
    run_tags = {"adaptflow.data_uri": data_uri, "adaptflow.config_hash": config_hash, **lineage_tags}
    ctx = (
        _context(settings, parent_run_id)
        if parent_run_id
        else start_pipeline_run(settings, "adaptflow", run_tags)
    )
    client = mlflow.MlflowClient(ctx.tracking_uri)
    for key, value in run_tags.items():
        client.set_tag(ctx.parent_run_id, key, value)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_settings(settings))
    mlflow.set_tracking_uri(ctx.tracking_uri)
    client.log_artifact(ctx.parent_run_id, str(out / "config.yaml"))
    params = flat_params("", settings.model_dump(mode="json", exclude={"cluster"}))
    client.log_batch(ctx.parent_run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()][:100])
    with stage_run(ctx, "ingest", {"adaptflow.data_uri": data_uri}):
        snapshot = ingest(data_uri, settings.ingest)
        snapshot.save(out)
        write_quarantine_report(snapshot, out)
        mlflow.log_params({"source_uri": data_uri, "classes": ",".join(snapshot.class_names)[:6000]})
        mlflow.log_metrics(
            {f"images_{k}": float(v) for k, v in snapshot.counts.items()}
            | {"quarantined": float(len(snapshot.quarantined))}
        )
        mlflow.set_tag("adaptflow.data_fingerprint", snapshot.fingerprint)
        mlflow.log_artifact(str(out / "quarantine.csv"))
        mlflow.log_artifact(str(out / Snapshot.FILE))
        skip = (
            None
            if force
            else unchanged_since_champion(
                ctx.tracking_uri, settings.registry.model_name, snapshot.fingerprint, config_hash
            )
        )
        reason = skip or ("retraining forced" if force else "new data or config since the champion")
        mlflow.set_tags({"adaptflow.changed": str(skip is None), "adaptflow.change_reason": reason})
    client.set_tag(ctx.parent_run_id, "adaptflow.data_fingerprint", snapshot.fingerprint)
    log.info("ingest: %s", reason)
    return IngestOutputs(snapshot.fingerprint, ctx.parent_run_id, config_hash, skip is None, reason)


@reports_errors("report_unchanged")
def report_unchanged_step(
    snapshot_dir: str, config_json: str, parent_run_id: str, reason: str, out_dir: str
) -> None:
    """The Else branch of "changed": write an ``unchanged`` summary and close the pipeline run."""
    from adaptflow.registry import get_champion
    from adaptflow.summary import dataset_summary
    from adaptflow.tracking import finish_pipeline_run

    settings = _settings(config_json)
    ctx = _context(settings, parent_run_id)
    snapshot = Snapshot.load(snapshot_dir)
    champion = get_champion(ctx.tracking_uri, settings.registry.model_name)
    summary = {
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
            "model_name": settings.registry.model_name,
        },
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    import mlflow

    mlflow.MlflowClient(ctx.tracking_uri).set_tag(ctx.parent_run_id, "adaptflow.status", "unchanged")
    finish_pipeline_run(ctx)
    log.info("%s", reason)


class BaselineOutputs(NamedTuple):
    should_finetune: bool
    reason: str


def _log_candidate(candidate: Candidate, out: Path) -> None:
    import mlflow

    from adaptflow.plots import learning_curves_png

    mlflow.log_metrics({k: float(v) for k, v in candidate.metrics.items()})
    cost = candidate.cost
    mlflow.log_metrics(
        {
            "wall_seconds": cost.wall_seconds,
            "trainable_params": cost.trainable_params,
            "total_params": cost.total_params,
            "epochs_run": cost.epochs_run,
            "backbone_forward_images": cost.backbone_forward_images,
            **(
                {"train_images_per_second": cost.train_images_per_second}
                if cost.train_images_per_second
                else {}
            ),
            **({"peak_memory_mb": cost.peak_memory_mb} if cost.peak_memory_mb else {}),
        }
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


@reports_errors("baseline")
def baseline_step(
    snapshot_dir: str, config_json: str, parent_run_id: str, fingerprint: str, out_dir: str
) -> BaselineOutputs:
    import mlflow

    from adaptflow.models.weights import resolve_weights
    from adaptflow.training.baseline import BaselineInputs, run_baseline

    settings = _settings(config_json)
    ctx = _context(settings, parent_run_id)
    snapshot = Snapshot.load(snapshot_dir)
    with stage_run(ctx, "baseline", {"adaptflow.data_fingerprint": fingerprint}):
        mlflow.log_params(flat_params("backbone", settings.backbone.model_dump(mode="json")))
        mlflow.log_params(flat_params("baseline", settings.baseline.model_dump(mode="json")))
        weights = resolve_weights(settings.backbone, _workdir_path(settings, "cache", "weights"))
        cache_dir = Path(settings.baseline.feature_cache_dir or _workdir_path(settings, "cache", "features"))
        result = run_baseline(
            BaselineInputs(
                snapshot,
                settings.backbone,
                weights,
                settings.baseline,
                settings.finetune,
                cache_dir,
                settings.seed,
            ),
            out_dir,
        )
        _log_candidate(result.candidate, Path(out_dir))
        decision = result.decision
        mlflow.log_params({f"advisor.{k}": v for k, v in decision.signals.items()})
        mlflow.set_tags(
            {
                "adaptflow.should_finetune": str(decision.should_finetune),
                "adaptflow.advisor_reason": decision.reason[:4900],
            }
        )
        mlflow.log_dict(decision.model_dump(mode="json"), "advisor.json")
    client = mlflow.MlflowClient(ctx.tracking_uri)
    client.set_tag(ctx.parent_run_id, "adaptflow.advisor_reason", decision.reason[:4900])
    return BaselineOutputs(decision.should_finetune, decision.reason)


@reports_errors("finetune")
def finetune_step(
    snapshot_dir: str, baseline_dir: str, config_json: str, parent_run_id: str, fingerprint: str, out_dir: str
) -> None:
    import mlflow

    from adaptflow.training.advisor import finetune_settings
    from adaptflow.training.finetune import FinetuneInputs, run_finetune

    settings = _settings(config_json)
    ctx = _context(settings, parent_run_id)
    baseline = BaselineResult.load(baseline_dir)
    cfg = finetune_settings(settings.finetune, baseline.decision, settings.baseline.advisor)
    with stage_run(
        ctx, "finetune", {"adaptflow.data_fingerprint": fingerprint, "adaptflow.strategy": cfg.strategy}
    ):
        mlflow.log_params(flat_params("finetune", cfg.model_dump(mode="json")))
        candidate = run_finetune(
            FinetuneInputs(
                Snapshot.load(snapshot_dir), baseline, Path(baseline_dir) / "candidate", cfg, settings.seed
            ),
            out_dir,
        )
        _log_candidate(candidate, Path(out_dir))


@reports_errors("keep_baseline")
def keep_baseline_step(baseline_dir: str, out_dir: str) -> None:
    """The Else branch: the baseline candidate is passed on unchanged."""
    setup_logging()
    shutil.copytree(Path(baseline_dir) / "candidate", out_dir, dirs_exist_ok=True)
    log.info("finetune skipped: passing the baseline candidate on")


def _candidate_dirs(baseline_dir: str, selected_dir: str) -> list[Path]:
    return [Path(baseline_dir) / "candidate", Path(selected_dir)]


def _winner_dir(evaluation: Evaluation, baseline_dir: str, selected_dir: str) -> Path:
    for folder in _candidate_dirs(baseline_dir, selected_dir):
        if Candidate.load(folder).name == evaluation.winner:
            return folder
    raise RuntimeError(f"winner {evaluation.winner} is not among the candidates")


class EvaluateOutputs(NamedTuple):
    winner: str
    winner_accuracy: float
    confusion_matrix: str  # JSON, for KFP's ClassificationMetrics


@reports_errors("evaluate")
def evaluate_step(
    snapshot_dir: str,
    baseline_dir: str,
    selected_dir: str,
    config_json: str,
    parent_run_id: str,
    fingerprint: str,
    out_dir: str,
) -> EvaluateOutputs:
    import mlflow

    from adaptflow.evaluation import ChampionModel, evaluate
    from adaptflow.onnx_model import load_onnx_classifier
    from adaptflow.plots import confusion_matrix_png
    from adaptflow.registry import download_onnx, get_champion

    settings = _settings(config_json)
    ctx = _context(settings, parent_run_id)
    snapshot = Snapshot.load(snapshot_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with stage_run(ctx, "evaluate", {"adaptflow.data_fingerprint": fingerprint}):
        ref = get_champion(ctx.tracking_uri, settings.registry.model_name)
        champion = None
        if ref is not None:
            path = download_onnx(ref.uri, out / "champion", ctx.tracking_uri)
            champion = ChampionModel(ref, load_onnx_classifier(path))
        evaluation, _ = evaluate(
            snapshot,
            _candidate_dirs(baseline_dir, selected_dir),
            champion,
            settings.evaluate,
            champion_note=None if ref else "no champion registered yet",
        )
        evaluation.save(out)
        shutil.rmtree(out / "champion", ignore_errors=True)
        for s in evaluation.scores:
            mlflow.log_metrics(
                {
                    f"{s.name}.test_accuracy": s.accuracy,
                    f"{s.name}.test_macro_f1": s.macro_f1,
                    f"{s.name}.test_accuracy_ci_low": s.accuracy_ci95[0],
                    f"{s.name}.test_accuracy_ci_high": s.accuracy_ci95[1],
                }
            )
            png = confusion_matrix_png(
                s.confusion_matrix,
                snapshot.class_names,
                f"{s.name}: accuracy {s.accuracy:.3f}",
                out / f"confusion_{s.name}.png",
            )
            mlflow.log_artifact(str(png), "confusion_matrices")
        if evaluation.mcnemar_p_value is not None:
            mlflow.log_metric("mcnemar_p_value", evaluation.mcnemar_p_value)
        mlflow.set_tags(
            {
                "adaptflow.winner": evaluation.winner,
                "adaptflow.winner_reason": evaluation.winner_reason[:4900],
            }
        )
        mlflow.log_artifact(str(out / Evaluation.FILE))
    best = evaluation.score(evaluation.winner)
    return EvaluateOutputs(evaluation.winner, best.accuracy, json.dumps(best.confusion_matrix))


class ExportOutputs(NamedTuple):
    max_abs_diff: float
    latency_ms_p50: float


@reports_errors("export")
def export_step(
    evaluation_dir: str,
    baseline_dir: str,
    selected_dir: str,
    config_json: str,
    parent_run_id: str,
    out_dir: str,
) -> ExportOutputs:
    import mlflow

    from adaptflow.export import export_onnx

    settings = _settings(config_json)
    ctx = _context(settings, parent_run_id)
    evaluation = Evaluation.load(evaluation_dir)
    with stage_run(ctx, "export", {"adaptflow.candidate": evaluation.winner}):
        mlflow.log_params(flat_params("export", settings.export.model_dump(mode="json")))
        result = export_onnx(_winner_dir(evaluation, baseline_dir, selected_dir), settings.export, out_dir)
        mlflow.log_metrics(
            {
                "max_abs_diff": result.max_abs_diff,
                "latency_ms_p50": result.latency_ms_p50,
                "latency_ms_p95": result.latency_ms_p95,
                "onnx_size_bytes": result.size_bytes,
                **{f"parity_batch_{k}": v for k, v in result.parity.items()},
            }
        )
        mlflow.log_artifact(str(Path(out_dir) / ExportResult.FILE))
    return ExportOutputs(result.max_abs_diff, result.latency_ms_p50)


class RegisterOutputs(NamedTuple):
    version: str
    promoted: bool


@reports_errors("register")
def register_step(
    snapshot_dir: str,
    baseline_dir: str,
    selected_dir: str,
    evaluation_dir: str,
    export_dir: str,
    config_json: str,
    parent_run_id: str,
    out_dir: str,
) -> RegisterOutputs:
    import mlflow

    from adaptflow.contracts import ChampionRef
    from adaptflow.evaluation import rescore_champion
    from adaptflow.publish import publish_model
    from adaptflow.registry import ChampionRescore, PromotionInputs, lease_for, promote_under_lease
    from adaptflow.summary import build_summary
    from adaptflow.tracking import finish_pipeline_run

    settings = _settings(config_json)
    ctx = _context(settings, parent_run_id)
    snapshot = Snapshot.load(snapshot_dir)
    baseline = BaselineResult.load(baseline_dir)
    evaluation = Evaluation.load(evaluation_dir)
    export = ExportResult.load(export_dir)
    winner = Candidate.load(_winner_dir(evaluation, baseline_dir, selected_dir))
    selected = Candidate.load(selected_dir)
    name = settings.registry.model_name
    try:
        with stage_run(ctx, "register", {"adaptflow.candidate": winner.name}) as run:
            version = publish_model(
                Path(export_dir) / ExportResult.ONNX,
                winner,
                snapshot,
                evaluation,
                export,
                settings,
                ctx,
                run.info.run_id,
            )

            def rescore(ref: ChampionRef) -> ChampionRescore:
                return rescore_champion(ref, snapshot, ctx.tracking_uri, settings.evaluate)

            experiment = mlflow.MlflowClient(ctx.tracking_uri).get_experiment(ctx.experiment_id)
            lease = lease_for(
                name, settings.registry, settings.workdir, ctx.tracking_uri, experiment.artifact_location
            )
            decision, before, after = promote_under_lease(
                PromotionInputs(
                    ctx.tracking_uri,
                    name,
                    version,
                    evaluation.score(winner.name),
                    evaluation,
                    export,
                    settings.gate,
                    {"pipeline": ctx.parent_run_id, "register": run.info.run_id},
                ),
                lease,
                rescore,
            )
            mlflow.set_tags(
                {
                    "adaptflow.promoted": str(decision.promote),
                    "adaptflow.gate.reasons": "; ".join(decision.reasons)[:4900],
                }
            )
            registration = Registration(
                model_name=name,
                version=version,
                model_uri=f"models:/{name}/{version}",
                champion_before=before,
                champion_after=after,
                promoted=decision.promote,
                gate=decision,
            )
            registration.save(out_dir)
            summary = build_summary(snapshot, baseline, selected, evaluation, export, registration, ctx)
            mlflow.MlflowClient(ctx.tracking_uri).set_tag(ctx.parent_run_id, "adaptflow.status", "completed")
            Path(out_dir, SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
            mlflow.log_dict(summary, "summary.json")
        finish_pipeline_run(ctx)
    except BaseException:
        finish_pipeline_run(ctx, "FAILED")
        raise
    log.info(
        "register: %s v%s %s", name, version, "promoted to champion" if decision.promote else "not promoted"
    )
    return RegisterOutputs(version, decision.promote)
