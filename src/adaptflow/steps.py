"""Steps: what each KFP component calls, one per stage of the DAG.

The three layers: a *component* (components/) maps KFP artifacts and parameters to plain strings
and folders; a *step* (here) loads the typed inputs, calls one library *stage* function inside the
stage's nested MLflow run, and hands what to record to one helper of :mod:`adaptflow.stage_logs`;
the *stage* (src/adaptflow/...) is a pure function with a typed config and a typed result. Nothing
here knows whether it runs in a Kubeflow pod or under kfp.local.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from adaptflow.contracts import BaselineResult, Candidate, Evaluation, ExportResult, Snapshot
from adaptflow.errors import EXIT_FAILED, Interrupted, describe_error, exit_status
from adaptflow.logs import console, setup_logging
from adaptflow.signals import stop_with_parent
from adaptflow.stage_setup import _in_component_process, open_stage, stage_context, stage_settings
from adaptflow.tracking import (
    run_lifecycle,
    stage_run,
    start_pipeline_run,
)

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
ERROR_FILE_ENV = "ADAPTFLOW_ERROR_FILE"

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(stage: str) -> Callable[[F], F]:
    """Logs a stage's failure clearly, records it for the local runner, and re-raises.

    In a component process an error we can describe ends the process with the exit status that
    says whether a retry can help (:func:`adaptflow.errors.exit_status`), without a traceback; an
    unexpected one (a bug) keeps its traceback and exits 1. Neither is retried unless transient.
    When the stage ends, so does its process: :func:`_spare_exit_collection`.
    """

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            if _in_component_process():
                stop_with_parent()  # a runner killed outright still stops this stage (SIGTERM)
            try:
                return func(*args, **kwargs)
            except Exception as error:
                message, hint = describe_error(error)
                what = "stopped" if isinstance(error, Interrupted) else "failed"
                log.error("stage %s %s: %s%s", stage, what, message, f" (hint: {hint})" if hint else "")
                path = os.environ.get(ERROR_FILE_ENV)
                if path:
                    Path(path).write_text(json.dumps({"stage": stage, "message": message, "hint": hint}))
                status = exit_status(error)
                if _in_component_process() and status != EXIT_FAILED:
                    raise SystemExit(status) from None
                raise
            finally:
                if _in_component_process():
                    _spare_exit_collection()

        return run  # type: ignore[return-value]

    return wrap


def _spare_exit_collection() -> None:
    """A component process ends with its stage: its exit need not garbage-collect what it imported.

    ``gc.freeze`` puts every object alive now out of the collector's reach, so the interpreter's exit
    no longer walks the object graphs of torch, mlflow and kfp (about 1 s per stage process on 2
    cores, bench/overhead.py); the OS takes the memory back. Not in a long-lived process, which
    would then keep that garbage.
    """
    gc.freeze()


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


@reports_errors("ingest")
def ingest_step(
    data_uri: str,
    config_json: str,
    parent_run_id: str,
    out_dir: str,
    force: bool = False,
    lineage: Lineage | None = None,
) -> IngestOutputs:
    from adaptflow.data.ingest import ingest, write_quarantine_report
    from adaptflow.data.verdicts import VerdictCache, verdict_cache_root
    from adaptflow.registry import change_verdict
    from adaptflow.stage_logs import log_ingest, log_pipeline_config

    settings = stage_settings(config_json, uses_torch=False)
    config_hash = settings.config_hash()
    tags = {"adaptflow.data_uri": data_uri, "adaptflow.config_hash": config_hash}
    tags |= lineage.tags() if lineage else {}
    ctx = (
        stage_context(settings, parent_run_id)
        if parent_run_id
        else start_pipeline_run(settings, "adaptflow", tags)
    )
    out = Path(out_dir)
    log_pipeline_config(ctx, settings, tags, out)
    with stage_run(ctx, "ingest", {"adaptflow.data_uri": data_uri}):
        # verdicts of files unchanged since an earlier run are reused: only new or changed files are opened
        snapshot = ingest(data_uri, settings.ingest, verdicts=VerdictCache(verdict_cache_root(settings)))
        snapshot.save(out)
        write_quarantine_report(snapshot, out)
        model = settings.registry.model_name
        changed, reason = change_verdict(ctx.tracking_uri, model, snapshot.fingerprint, config_hash, force)
        log_ingest(ctx, snapshot, data_uri, out, changed, reason)
    console().info("ingest: %s", reason)
    return IngestOutputs(snapshot.fingerprint, ctx.parent_run_id, config_hash, changed, reason)


@reports_errors("report_unchanged")
def report_unchanged_step(
    snapshot_dir: str, config_json: str, parent_run_id: str, reason: str, out_dir: str
) -> None:
    """The Else branch of "changed": write an ``unchanged`` summary and close the pipeline run."""
    from adaptflow.registry import get_champion
    from adaptflow.stage_logs import log_outcome_summary
    from adaptflow.summary import unchanged_summary

    settings, ctx = open_stage(config_json, parent_run_id, uses_torch=False)
    with run_lifecycle(ctx.tracking_uri, ctx.parent_run_id):
        champion = get_champion(ctx.tracking_uri, settings.registry.model_name)
        summary = unchanged_summary(Snapshot.load(snapshot_dir), reason, champion, settings, ctx)
        log_outcome_summary(ctx, summary, "unchanged", Path(out_dir), SUMMARY_FILE)
    log.info("%s", reason)


class BaselineOutputs(NamedTuple):
    should_finetune: bool
    reason: str


@reports_errors("baseline")
def baseline_step(
    snapshot_dir: str, config_json: str, parent_run_id: str, fingerprint: str, out_dir: str
) -> BaselineOutputs:
    from adaptflow.stage_logs import log_baseline
    from adaptflow.training.baseline import baseline_for

    settings, ctx = open_stage(config_json, parent_run_id, uses_torch=True)
    with stage_run(ctx, "baseline", {"adaptflow.data_fingerprint": fingerprint}):
        result = baseline_for(Snapshot.load(snapshot_dir), settings, out_dir)
        log_baseline(ctx, settings, result, Path(out_dir))
    return BaselineOutputs(result.decision.should_finetune, result.decision.reason)


@reports_errors("finetune")
def finetune_step(
    snapshot_dir: str, baseline_dir: str, config_json: str, parent_run_id: str, fingerprint: str, out_dir: str
) -> None:
    """Fine-tunes here, or on the processes ``cluster.finetune`` asks for (torchrun, a Trainer job)."""
    from adaptflow.training.finetune_worker import train_finetune
    from adaptflow.training.placement import train_elsewhere

    settings, ctx = open_stage(config_json, parent_run_id, uses_torch=True)
    paths = {"snapshot_dir": snapshot_dir, "baseline_dir": baseline_dir, "out_dir": out_dir}
    run = {"config_json": config_json, "parent_run_id": ctx.parent_run_id, "fingerprint": fingerprint}
    if not train_elsewhere(settings, **paths, **run):
        train_finetune(settings, ctx, snapshot_dir, baseline_dir, fingerprint, out_dir)


@reports_errors("shard")
def shard_step(snapshot_dir: str, config_json: str, parent_run_id: str) -> None:
    """The train and val splits as WebDataset tar shards under ``finetune.shards_root``, once per fingerprint."""
    from adaptflow.data.shards import write_split_shards

    settings, ctx = open_stage(config_json, parent_run_id, uses_torch=False)
    with stage_run(ctx, "shard"):
        write_split_shards(Snapshot.load(snapshot_dir), settings.finetune)


@reports_errors("keep_baseline")
def keep_baseline_step(baseline_dir: str, out_dir: str) -> None:
    """The Else branch: the baseline candidate is passed on unchanged."""
    setup_logging(exclusive=_in_component_process())
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
    from adaptflow.evaluation import evaluate_against_champion
    from adaptflow.stage_logs import log_evaluation

    settings, ctx = open_stage(config_json, parent_run_id, uses_torch=True)
    snapshot = Snapshot.load(snapshot_dir)
    with stage_run(ctx, "evaluate", {"adaptflow.data_fingerprint": fingerprint}):
        evaluation = evaluate_against_champion(
            snapshot,
            _candidate_dirs(baseline_dir, selected_dir),
            settings.evaluate,
            ctx.tracking_uri,
            settings.registry.model_name,
            out_dir,
        )
        log_evaluation(evaluation, snapshot, Path(out_dir))
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
    from adaptflow.export import export_onnx
    from adaptflow.stage_logs import log_export

    settings, ctx = open_stage(config_json, parent_run_id, uses_torch=True)
    evaluation = Evaluation.load(evaluation_dir)
    with stage_run(ctx, "export", {"adaptflow.candidate": evaluation.winner}):
        result = export_onnx(_winner_dir(evaluation, baseline_dir, selected_dir), settings.export, out_dir)
        log_export(settings, result, Path(out_dir))
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
    from adaptflow.publish import Publication, register_winner
    from adaptflow.stage_logs import log_outcome_summary, log_registration
    from adaptflow.summary import build_summary

    settings, ctx = open_stage(config_json, parent_run_id, uses_torch=False)
    snapshot, evaluation = Snapshot.load(snapshot_dir), Evaluation.load(evaluation_dir)
    export = ExportResult.load(export_dir)
    winner = Candidate.load(_winner_dir(evaluation, baseline_dir, selected_dir))
    run_ends = run_lifecycle(ctx.tracking_uri, ctx.parent_run_id)
    with run_ends, stage_run(ctx, "register", {"adaptflow.candidate": winner.name}) as run:
        onnx = Path(export_dir) / ExportResult.ONNX
        pub = Publication(onnx, winner, snapshot, evaluation, export, settings, ctx, run.info.run_id)
        registration = register_winner(pub)
        registration.save(out_dir)
        log_registration(registration)
        baseline, selected = BaselineResult.load(baseline_dir), Candidate.load(selected_dir)
        summary = build_summary(snapshot, baseline, selected, evaluation, export, registration, ctx)
        log_outcome_summary(ctx, summary, "completed", Path(out_dir), SUMMARY_FILE)
    outcome = "promoted to champion" if registration.promoted else "not promoted"
    console().info("register: %s v%s %s", registration.model_name, registration.version, outcome)
    return RegisterOutputs(registration.version, registration.promoted)


@reports_errors("compare_strategy")
def compare_strategy_step(
    snapshot_dir: str, baseline_dir: str, strategy: str, config_json: str, parent_run_id: str, out_dir: str
) -> float:
    """One ParallelFor task of the compare DAG: trains ``strategy``, scores it; returns test accuracy."""
    from adaptflow.compare import compare_one_strategy
    from adaptflow.stage_logs import log_outcome

    settings, ctx = open_stage(config_json, parent_run_id, uses_torch=True)
    snapshot, out = Snapshot.load(snapshot_dir), Path(out_dir)
    with stage_run(ctx, f"compare-{strategy}", {"adaptflow.strategy": strategy}) as run:
        outcome = compare_one_strategy(strategy, snapshot, Path(baseline_dir), settings, out)
        outcome = outcome.model_copy(update={"run_id": run.info.run_id})
        log_outcome(outcome)
    outcome.save(out)
    return outcome.score.accuracy


@reports_errors("compare_report")
def compare_report_step(
    snapshot_dir: str,
    baseline_dir: str,
    outcome_dirs: list[str],
    data_uri: str,
    config_json: str,
    parent_run_id: str,
    out_dir: str,
) -> str:
    """Gathers the ParallelFor outcomes into one CompareResult + report; returns the best strategy."""
    from adaptflow.compare import gather_outcomes

    settings, ctx = open_stage(config_json, parent_run_id, uses_torch=False)
    snapshot, out = Snapshot.load(snapshot_dir), Path(out_dir)
    return gather_outcomes(data_uri, snapshot, Path(baseline_dir), outcome_dirs, settings, ctx, out).best
