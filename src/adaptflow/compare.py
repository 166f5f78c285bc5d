"""Transfer learning versus fine-tuning, measured: every strategy on one snapshot, one test split.

``run_compare`` ingests once (one snapshot), trains the transfer-learning baseline once (frozen
backbone, cached features, linear head: the reference row ``baseline``), then trains each requested
strategy in sequence through :func:`adaptflow.training.finetune.run_finetune`, each starting from
the baseline head (LP-FT), and scores every model on the same test split with
:func:`adaptflow.evaluation.score` (accuracy with a bootstrap 95% interval, macro-F1) plus McNemar's
exact test against the baseline on the very same images.

Strategy names:

- ``linear_probe`` runs *as a strategy* (backbone frozen, head trained end to end on augmented
  images through the fine-tuning loop). It is not the same row as ``baseline``, which trains the
  head on cached, un-augmented features; both are reported, so the two can be compared.
- ``partial``, ``full``, ``lora``, ``gradual``: see :mod:`adaptflow.training.strategies`.
- ``scratch``: the control. A randomly initialised backbone and head, every parameter trained
  (``full`` without layer-wise decay, BatchNorm statistics learned), for the same epochs.

Cost figures per row: trainable parameters, wall seconds, training images/s, peak memory (CUDA:
allocator peak; CPU: the process's RSS high-water mark, reset per strategy), and the train-val
accuracy gap at the best epoch (the overfitting measure).

MLflow: one parent run ``compare`` and one nested run per strategy. On a cluster the strategies
fan out with ``dsl.ParallelFor`` (``pipelines/compare.py``), each task calling
:func:`compare_strategy_step`; :func:`compare_report_step` gathers them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adaptflow.config import COMPARE_STRATEGIES, Settings
from adaptflow.contracts import (
    BaselineResult,
    Candidate,
    CompareResult,
    ModelScore,
    Snapshot,
    StrategyOutcome,
)
from adaptflow.data.images import ImageStore
from adaptflow.errors import ConfigError
from adaptflow.stage_logs import log_compare_file, log_compare_result, log_outcome
from adaptflow.tracking import TrackingContext, run_lifecycle

log = logging.getLogger(__name__)

BASELINE = "baseline"


def parse_strategies(text: str | Sequence[str]) -> list[str]:
    """``"partial,full"`` or a list -> validated, de-duplicated names in the given order."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [s.strip() for s in text]
    names = [s for s in dict.fromkeys(items) if s and s != BASELINE]
    unknown = [s for s in names if s not in COMPARE_STRATEGIES]
    if unknown:
        raise ConfigError(
            f"unknown strategy {unknown[0]!r}",
            hint=f"valid strategies: {', '.join(COMPARE_STRATEGIES)} (the baseline always runs)",
        )
    return names


def subsample_train(snapshot: Snapshot, per_class: int) -> Snapshot:
    """The few-images condition: keep ``per_class`` training images per class (val and test unchanged).

    Deterministic: within each class the images with the smallest sha256 are kept, so the subset
    depends on the content only. The fingerprint records the subsample.
    """
    if per_class < 1:
        raise ConfigError(f"train images per class must be >= 1, got {per_class}")
    chosen: set[str] = set()
    for label in snapshot.class_names:
        train = sorted((e for e in snapshot.split("train") if e.label == label), key=lambda e: e.sha256)
        chosen.update(e.uri for e in train[:per_class])
    entries = [e for e in snapshot.entries if e.split != "train" or e.uri in chosen]  # original order
    counts = {split: sum(1 for e in entries if e.split == split) for split in ("train", "val", "test")}
    class_counts = {
        split: {c: sum(1 for e in entries if e.split == split and e.label == c) for c in snapshot.class_names}
        for split in ("train", "val", "test")
    }
    fingerprint = hashlib.sha256(f"{snapshot.fingerprint}|train-per-class={per_class}".encode()).hexdigest()
    return snapshot.model_copy(
        update={
            "entries": tuple(entries),
            "counts": counts,
            "class_counts": class_counts,
            "fingerprint": fingerprint,
        }
    )


def test_labels(snapshot: Snapshot) -> np.ndarray:
    index = {c: i for i, c in enumerate(snapshot.class_names)}
    return np.array([index[e.label] for e in snapshot.split("test")], dtype=np.int64)


def score_folder(
    folder: Path, name: str, snapshot: Snapshot, settings: Settings, store: ImageStore
) -> tuple[ModelScore, np.ndarray]:
    from adaptflow.evaluation import predict_candidate, score

    preds = predict_candidate(folder, snapshot.split("test"), store, settings.evaluate.batch_size)
    y = test_labels(snapshot)
    return score(name, "candidate", y, preds, snapshot.class_names, settings.evaluate), preds


def _scratch_init(baseline_dir: Path, out: Path, seed: int) -> Path:
    """A candidate folder with a randomly initialised backbone and head (the from-scratch control)."""
    import torch

    from adaptflow.models.factory import build_model
    from adaptflow.training.candidates import save_candidate

    base = Candidate.load(baseline_dir)
    torch.manual_seed(seed)
    model = build_model(base.backbone.name, len(base.class_names))
    init = base.model_copy(update={"name": "scratch-init", "strategy": "scratch", "history": ()})
    save_candidate(init, model, out)
    return out


def train_strategy(
    strategy: str,
    snapshot: Snapshot,
    baseline: BaselineResult,
    baseline_dir: Path,
    settings: Settings,
    out_dir: Path,
    store: ImageStore,
) -> Candidate:
    """Trains one strategy from the baseline candidate (``scratch``: from a random init).

    The advisor's learning-rate profile applies to every strategy when it chose one (high shift).
    """
    from adaptflow.training.advisor import finetune_settings
    from adaptflow.training.finetune import FinetuneInputs, run_finetune

    if strategy == "scratch":
        start = time.perf_counter()
        init = _scratch_init(baseline_dir, out_dir.parent / f"{out_dir.name}-init", settings.seed)
        cfg = settings.finetune.model_copy(
            update={"strategy": "full", "layer_decay": 1.0, "freeze_bn": False}
        )
        trained = run_finetune(FinetuneInputs(snapshot, baseline, init, cfg, settings.seed), out_dir, store)
        candidate = trained.model_copy(
            update={
                "name": "scratch",
                "strategy": "scratch",
                "cost": trained.cost.model_copy(update={"wall_seconds": time.perf_counter() - start}),
                "extra": {**trained.extra, "init": "random"},
            }
        )
        candidate.save(out_dir)
        return candidate
    cfg = finetune_settings(settings.finetune, baseline.decision, settings.baseline.advisor, strategy)
    return run_finetune(FinetuneInputs(snapshot, baseline, baseline_dir, cfg, settings.seed), out_dir, store)


def outcome_of(
    strategy: str,
    candidate: Candidate,
    model_score: ModelScore,
    p_value: float | None = None,
    run_id: str | None = None,
) -> StrategyOutcome:
    m, cost = candidate.metrics, candidate.cost
    return StrategyOutcome(
        strategy=strategy,
        candidate=candidate.name,
        score=model_score,
        trainable_params=cost.trainable_params,
        total_params=cost.total_params,
        wall_seconds=round(cost.wall_seconds, 3),
        images_per_second=cost.train_images_per_second,
        peak_memory_mb=cost.peak_memory_mb,
        train_accuracy=m["train_accuracy"],
        val_accuracy=m["val_accuracy"],
        train_val_gap=m["train_val_gap"],
        best_epoch=int(candidate.extra.get("best_epoch", "0") or 0)
        or max(range(len(candidate.history)), key=lambda i: candidate.history[i].val_accuracy, default=-1)
        + 1,
        epochs_run=cost.epochs_run,
        history=candidate.history,
        p_value_vs_baseline=p_value,
        run_id=run_id,
    )


def assemble(
    data_uri: str,
    snapshot: Snapshot,
    baseline: BaselineResult,
    outcomes: list[StrategyOutcome],
    settings: Settings,
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> CompareResult:
    """The comparison, with the best row chosen like evaluate does (must beat the baseline by the margin)."""
    from adaptflow.evaluation import choose_winner

    base = next(o for o in outcomes if o.strategy == BASELINE)
    others = [o.score for o in outcomes if o.strategy != BASELINE]
    best, reason = choose_winner(base.score, others, settings.evaluate.finetune_margin)
    best_strategy = next(o.strategy for o in outcomes if o.score.name == best)
    return CompareResult(
        data_uri=data_uri,
        fingerprint=snapshot.fingerprint,
        class_names=snapshot.class_names,
        counts=snapshot.counts,
        min_train_images_per_class=min(snapshot.class_counts["train"].values()),
        test_size=len(snapshot.split("test")),
        decision=baseline.decision,
        outcomes=tuple(outcomes),
        best=best_strategy,
        best_reason=reason,
        finetune_margin=settings.evaluate.finetune_margin,
        epochs=settings.finetune.epochs,
        device=baseline.candidate.cost.device,
        tracking_uri=tracking_uri,
        run_id=run_id,
    )


def run_compare(
    data_uri: str,
    settings: Settings,
    strategies: Sequence[str],
    out_dir: str | Path,
    *,
    train_per_class: int | None = None,
    track: bool = True,
    report: bool = True,
) -> CompareResult:
    """Baseline + each strategy on one snapshot, scored on the same test split; logged and reported.

    ``train_per_class`` keeps that many training images per class (the few-images condition).
    ``track=False`` skips MLflow (benchmarks); ``report=False`` skips the HTML/Markdown report.
    """
    from adaptflow.data.ingest import ingest

    names = parse_strategies(strategies)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = ImageStore()
    snapshot = ingest(data_uri, settings.ingest)
    if train_per_class is not None:
        snapshot = subsample_train(snapshot, train_per_class)
    snapshot.save(out / "snapshot")

    ctx = None
    if track:
        from adaptflow.tracking import start_pipeline_run

        ctx = start_pipeline_run(
            settings,
            "compare",
            {
                "adaptflow.stage": "compare",
                "adaptflow.data_uri": data_uri,
                "adaptflow.data_fingerprint": snapshot.fingerprint,
                "adaptflow.strategies": ",".join(names),
            },
        )
    with run_lifecycle(ctx.tracking_uri, ctx.parent_run_id) if ctx else contextlib.nullcontext():
        result = _compare(data_uri, snapshot, settings, names, out, store, ctx)
        if report:
            result = _write_report(result, out, ctx)
        result.save(out)
        if ctx is not None:
            log_compare_file(ctx, out)
    return result


def _write_report(result: CompareResult, out: Path, ctx: TrackingContext | None) -> CompareResult:
    from adaptflow.report import write_report

    html, markdown = write_report(result, out / "report")
    if ctx is not None:
        from mlflow import MlflowClient

        client = MlflowClient(ctx.tracking_uri)
        for path in (html, markdown):
            client.log_artifact(ctx.parent_run_id, str(path), "report")
        for png in sorted((out / "report" / "plots").glob("*.png")):
            client.log_artifact(ctx.parent_run_id, str(png), "report/plots")
    return result.model_copy(update={"report_html": str(html), "report_markdown": str(markdown)})


def _compare(
    data_uri: str,
    snapshot: Snapshot,
    settings: Settings,
    names: list[str],
    out: Path,
    store: ImageStore,
    ctx: TrackingContext | None,
) -> CompareResult:
    from adaptflow.stage_logs import log_compare_baseline
    from adaptflow.tracking import stage_run
    from adaptflow.training.baseline import baseline_for

    def stage(strategy: str, run_name: str) -> contextlib.AbstractContextManager[Any]:
        tags = {"adaptflow.strategy": strategy}
        return stage_run(ctx, run_name, tags) if ctx else contextlib.nullcontext()

    with stage(BASELINE, BASELINE) as run:
        baseline = baseline_for(snapshot, settings, out / "baseline", store)
        base_score, _ = score_folder(out / "baseline" / "candidate", BASELINE, snapshot, settings, store)
        run_id = run.info.run_id if run else None
        outcomes = [outcome_of(BASELINE, baseline.candidate, base_score, run_id=run_id)]
        if run is not None:
            log_compare_baseline(settings, outcomes[0], baseline.decision)
    for strategy in names:
        with stage(strategy, f"compare-{strategy}") as run:
            folder = out / "strategies" / strategy
            outcome = compare_one_strategy(strategy, snapshot, out / "baseline", settings, folder)
            outcome = outcome.model_copy(update={"run_id": run.info.run_id if run else None})
            if run is not None:
                log_outcome(outcome)
        s = outcome.score
        log.info(
            "compare: %-12s test accuracy %.4f [%.4f, %.4f], %d trainable, %.1fs",
            *(strategy, s.accuracy, *s.accuracy_ci95, outcome.trainable_params, outcome.wall_seconds),
        )
        outcomes.append(outcome)
    uri, run_id = (ctx.tracking_uri, ctx.parent_run_id) if ctx else (None, None)
    result = assemble(data_uri, snapshot, baseline, outcomes, settings, uri, run_id)
    if ctx is not None:
        log_compare_result(ctx, result)
    return result


def compare_one_strategy(
    strategy: str, snapshot: Snapshot, baseline_dir: Path, settings: Settings, out: Path
) -> StrategyOutcome:
    """One ParallelFor task's stage: ``strategy`` trained from the baseline, scored against it."""
    from adaptflow.evaluation import mcnemar_exact

    (name,) = parse_strategies([strategy])
    store = ImageStore()
    baseline = BaselineResult.load(baseline_dir)
    base_dir = baseline_dir / "candidate"
    _, base_preds = score_folder(base_dir, BASELINE, snapshot, settings, store)
    candidate = train_strategy(name, snapshot, baseline, base_dir, settings, out / "candidate", store)
    model_score, preds = score_folder(out / "candidate", candidate.name, snapshot, settings, store)
    return outcome_of(name, candidate, model_score, mcnemar_exact(test_labels(snapshot), preds, base_preds))


def gather_outcomes(
    data_uri: str,
    snapshot: Snapshot,
    baseline_dir: Path,
    outcome_dirs: Sequence[str],
    settings: Settings,
    ctx: TrackingContext,
    out: Path,
) -> CompareResult:
    """The report task's stage: the ParallelFor outcomes and the baseline row, in one result and report."""
    baseline = BaselineResult.load(baseline_dir)
    base_score, _ = score_folder(baseline_dir / "candidate", BASELINE, snapshot, settings, ImageStore())
    outcomes = [outcome_of(BASELINE, baseline.candidate, base_score)]
    outcomes += [StrategyOutcome.load(folder) for folder in outcome_dirs]
    result = assemble(data_uri, snapshot, baseline, outcomes, settings, ctx.tracking_uri, ctx.parent_run_id)
    result = _write_report(result, out, ctx)
    result.save(out)
    log_compare_result(ctx, result)
    log_compare_file(ctx, out)
    return result
