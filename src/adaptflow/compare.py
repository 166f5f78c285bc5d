"""Transfer learning versus fine-tuning, measured: every strategy on one snapshot, one test split.

The compare DAG (``pipelines/compare.py``; locally ``adaptflow compare`` runs it through kfp.local
like ``adaptflow run``) ingests once (one snapshot), trains the transfer-learning baseline once
(frozen backbone, cached features, linear head: the reference row ``baseline``), then trains each
requested strategy, one ``dsl.ParallelFor`` task each (:func:`compare_one_strategy`), through
:func:`adaptflow.training.finetune.run_finetune`, each starting from the baseline head (LP-FT). The
report task (:func:`gather_outcomes`) scores every model on the same test split with
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

MLflow: one parent run ``compare`` and one nested run per stage and strategy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

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
from adaptflow.logs import console
from adaptflow.stage_logs import log_compare_file, log_compare_result
from adaptflow.tracking import TrackingContext
from adaptflow.training.schedule import planned_epochs

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


def test_labels(snapshot: Snapshot) -> np.ndarray:
    index = {c: i for i, c in enumerate(snapshot.class_names)}
    return np.array([index[e.label] for e in snapshot.split("test")], dtype=np.int64)


def score_folder(
    folder: Path, name: str, snapshot: Snapshot, settings: Settings, store: ImageStore
) -> tuple[ModelScore, np.ndarray]:
    from adaptflow.evaluation import score_candidate

    test = snapshot.split("test")
    return score_candidate(
        folder, name, test, test_labels(snapshot), snapshot.class_names, settings.evaluate, store
    )


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
    from adaptflow.models.weights import RANDOM_INIT, init_label
    from adaptflow.training.advisor import finetune_settings
    from adaptflow.training.decoded import decoded_cache_dir
    from adaptflow.training.finetune import FinetuneInputs, run_finetune

    if strategy == "scratch":
        start = time.perf_counter()
        init = _scratch_init(baseline_dir, out_dir.parent / f"{out_dir.name}-init", settings.seed)
        cfg = settings.finetune.model_copy(
            update={"strategy": "full", "layer_decay": 1.0, "freeze_bn": False}
        )
        trained = run_finetune(
            FinetuneInputs(
                snapshot, baseline, init, cfg, settings.seed, decoded_cache_dir=decoded_cache_dir(settings)
            ),
            out_dir,
            store,
        )
        candidate = trained.model_copy(
            update={
                "name": "scratch",
                "strategy": "scratch",
                "cost": trained.cost.model_copy(update={"wall_seconds": time.perf_counter() - start}),
                "backbone_sha256": RANDOM_INIT,
                "extra": {**trained.extra, "init": init_label(RANDOM_INIT)},
            }
        )
        candidate.save(out_dir)
        return candidate
    cfg = finetune_settings(settings.finetune, baseline.decision, settings.baseline.advisor, strategy)
    return run_finetune(
        FinetuneInputs(
            snapshot,
            baseline,
            baseline_dir,
            cfg,
            settings.seed,
            decoded_cache_dir=decoded_cache_dir(settings),
        ),
        out_dir,
        store,
    )


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
        val_loss=m.get("val_loss"),
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
    from adaptflow.evaluation import HeldOut, choose_winner
    from adaptflow.models.weights import describe_backbone
    from adaptflow.report_decision import decide

    base = next(o for o in outcomes if o.strategy == BASELINE)
    others = [o.score for o in outcomes if o.strategy != BASELINE]
    val_images = len(snapshot.split("val"))
    val = {o.score.name: HeldOut(o.val_accuracy, val_images, o.val_loss) for o in outcomes}
    best, reason = choose_winner(base.score, others, settings.evaluate.finetune_margin, val)
    best_strategy = next(o.strategy for o in outcomes if o.score.name == best)
    result = CompareResult(
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
        epochs=planned_epochs(baseline.decision.signals, settings.finetune),
        device=baseline.candidate.cost.device,
        backbone=describe_backbone(baseline.candidate.backbone.name, baseline.candidate.backbone_sha256),
        tracking_uri=tracking_uri,
        run_id=run_id,
    )
    supported = decide(result)
    return result.model_copy(
        update={
            "supported_best": supported.best,
            "supported_best_reason": supported.reason,
            "tied_with": tuple(supported.tied_with),
        }
    )


def copy_compare_output(source: Path, out: Path) -> CompareResult:
    """The report task's output copied into ``out`` itself: the report (HTML, Markdown, plots/)
    beside the result file, so ``--out DIR`` holds ``DIR/<report>.html``, not ``DIR/report/...``."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name == "report" and item.is_dir():
            shutil.copytree(item, out, dirs_exist_ok=True)
        elif item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, out / item.name)
    result = CompareResult.load(out)
    pages = {"report_html": result.report_html, "report_markdown": result.report_markdown}
    moved = {key: str(out / Path(page).name) for key, page in pages.items() if page is not None}
    result = result.model_copy(update=moved)
    result.save(out)
    console().info("compare: result and report in %s", out)
    return result


def _write_report(result: CompareResult, out: Path, ctx: TrackingContext) -> CompareResult:
    from mlflow import MlflowClient

    from adaptflow.report import write_report

    html, markdown = write_report(result, out / "report")
    client = MlflowClient(ctx.tracking_uri)
    for path in (html, markdown):
        client.log_artifact(ctx.parent_run_id, str(path), "report")
    for png in sorted((out / "report" / "plots").glob("*.png")):
        client.log_artifact(ctx.parent_run_id, str(png), "report/plots")
    return result.model_copy(update={"report_html": str(html), "report_markdown": str(markdown)})


def _strategy_rank(outcome: StrategyOutcome) -> int:
    return COMPARE_STRATEGIES.index(outcome.strategy)


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
    from adaptflow.evaluation import score_references
    from adaptflow.stage_logs import log_compare_baseline
    from adaptflow.tracking import stage_run

    baseline = BaselineResult.load(baseline_dir)
    with stage_run(ctx, f"compare-{BASELINE}", {"adaptflow.strategy": BASELINE}) as run:
        base_score, _ = score_folder(baseline_dir / "candidate", BASELINE, snapshot, settings, ImageStore())
        base = outcome_of(BASELINE, baseline.candidate, base_score, run_id=run.info.run_id)
        log_compare_baseline(settings, base, baseline.decision)
    # The table's order is the strategy list's, whatever order the parallel tasks finished in.
    rows = sorted((StrategyOutcome.load(folder) for folder in outcome_dirs), key=_strategy_rank)
    outcomes = [base, *rows]
    result = assemble(data_uri, snapshot, baseline, outcomes, settings, ctx.tracking_uri, ctx.parent_run_id)
    references = score_references(snapshot, settings.evaluate, ImageStore())
    result = result.model_copy(update={"references": tuple(references)})
    result = _write_report(result, out, ctx)
    result.save(out)
    log_compare_result(ctx, result)
    log_compare_file(ctx, out)
    return result
