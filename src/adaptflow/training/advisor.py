"""The advisor: should we fine-tune, and how? Decided from measured signals, explained in words.

Signals (all recorded in the decision and in MLflow):
- ``baseline_val_accuracy`` against ``target_accuracy``: transfer learning may already be enough.
- ``min_train_images_per_class``: with few images, fine-tuning a whole backbone overfits.
- ``domain_shift``: how far the target sits from the images the backbone was pretrained on, as
  the frozen backbone's own BatchNorm layers see it (:mod:`adaptflow.training.shift`: mean
  per-channel KL divergence of the target's activation statistics from the stored source
  statistics, over every BatchNorm layer; 0 = looks like the source).
- ``transfer_gap``: the semantic side of the shift, which the BatchNorm signal cannot see: how much
  worse a cross-validated linear probe separates the target's classes than the backbone separated
  its source classes, both chance-corrected (:mod:`adaptflow.training.transfer_gap`). Recorded and
  explained; no rule acts on it yet.
- ``estimated_finetune_seconds``: the expected fine-tuning wall time (:mod:`adaptflow.training.cost`:
  steady-state steps of the chosen strategy through the real loaders x early stopping's expected
  epochs), against ``budget_seconds``; ``max_finetune_seconds`` if every planned epoch runs.

Strategy choice (``choose_strategy``, on by default; only when fine-tuning pays):

- a shift at or above ``high_shift`` picks ``full`` with *uniform* learning rates
  (``layer_decay`` 1.0). Discriminative rates assume the early layers are already right; under an
  input-level shift they are the ones that must change most (Lee et al. 2023, "Surgical
  fine-tuning"). On the demo's texture-drawn digits (shift 1.05) full fine-tuning with
  ``layer_decay`` 0.5 reached 0.835 test accuracy, below the frozen baseline's 0.938; with 1.0 it
  reached 0.972 (bench/RESULTS.md, "Fine-tuning recipes under domain shift");
- otherwise fewer than ``few_images_per_class`` training images in the smallest class picks
  ``partial`` (fewer parameters to overfit with; not measured here, a conservative rule);
- otherwise ``finetune.strategy`` and its ``layer_decay`` stay.

``finetune.strategy_locked`` keeps ``finetune.strategy`` whatever the signals say; under high shift
the advisor still picks uniform learning rates for it (as for a strategy ``adaptflow compare`` names).
Whenever the advisor does replace the configured strategy for a fine-tuning run, the decision's
signals record it (``strategy_override``: ``"lora -> full"``, logged to MLflow with the rest) and
it is logged, as a warning when the configured strategy is not the default. Whether the user *wrote*
the strategy cannot be known here: the settings reach each stage as JSON holding every key, so
pydantic's ``model_fields_set`` names every field there; a non-default value is the evidence left.

``high_shift`` (0.25) sits between what the demo measured for the in-domain target (0.14) and the
mildest shifted one (inverted digits, 0.34). It is calibrated on that demo only: measure the
signal on your own in-domain and shifted data (it is logged with every run) before you rely on it.
"""

from __future__ import annotations

import logging

from adaptflow.config import AdvisorConfig, FinetuneConfig
from adaptflow.contracts import FinetuneDecision

SignalValue = float | int | str | None

log = logging.getLogger(__name__)


def advise(signals: dict[str, SignalValue], cfg: AdvisorConfig, ft: FinetuneConfig) -> FinetuneDecision:
    acc = float(signals["baseline_val_accuracy"] or 0.0)
    # the bound, not the point estimate: a 40-image validation split scores 0.975 by luck easily
    low = signals.get("baseline_val_accuracy_low")
    acc_low = acc if low is None else float(low)
    per_class = int(signals["min_train_images_per_class"] or 0)
    estimate = float(signals["estimated_finetune_seconds"] or 0.0)
    shift = signals.get("domain_shift")
    shift_text = f", domain shift {float(shift):.2f}" if isinstance(shift, (int, float)) else ""
    gap = signals.get("transfer_gap")
    shift_text += f", transfer gap {float(gap):.2f}" if isinstance(gap, (int, float)) else ""
    strategy: str = ft.strategy
    layer_decay: float | None = None
    why = ""
    if cfg.choose_strategy:
        strategy, layer_decay, why = choose_strategy(signals, cfg, ft)

    def decide(should_finetune: bool, reason: str) -> FinetuneDecision:
        recorded = signals
        if should_finetune and strategy != ft.strategy:
            recorded = {**signals, "strategy_override": f"{ft.strategy} -> {strategy}"}
            _log_override(ft.strategy, strategy)
        return FinetuneDecision(
            should_finetune=should_finetune,
            strategy=strategy,
            reason=reason,
            signals=recorded,
            layer_decay=layer_decay,
        )

    if cfg.force is not None:
        verb = "fine-tune" if cfg.force else "keep the baseline"
        return decide(
            cfg.force,
            f"forced by baseline.advisor.force={cfg.force}: {verb} (val accuracy {acc:.3f}{shift_text})",
        )
    if acc_low >= cfg.target_accuracy:
        return decide(
            False,
            f"transfer learning is enough: baseline val accuracy {acc:.3f} (95% lower bound {acc_low:.3f}) "
            f"reaches the target {cfg.target_accuracy:.3f}{shift_text}",
        )
    if cfg.min_images_per_class is not None and per_class < cfg.min_images_per_class:
        return decide(
            False,
            f"too little data to fine-tune safely: {per_class} training images in the smallest class "
            f"(< {cfg.min_images_per_class}); fine-tuning would likely overfit, so the baseline stays",
        )
    if estimate > cfg.budget_seconds:
        return decide(
            False,
            f"over budget: fine-tuning is estimated at {estimate:.0f}s, above the "
            f"{cfg.budget_seconds:.0f}s budget",
        )
    return decide(
        True,
        f"fine-tune ({strategy}): baseline val accuracy {acc:.3f} (95% lower bound {acc_low:.3f}) is below "
        f"the target {cfg.target_accuracy:.3f}"
        f"{shift_text}; the smallest class has {per_class} training images and the estimated "
        f"{estimate:.0f}s fits the {cfg.budget_seconds:.0f}s budget{why}",
    )


def choose_strategy(
    signals: dict[str, SignalValue], cfg: AdvisorConfig, ft: FinetuneConfig
) -> tuple[str, float | None, str]:
    """(strategy, layer_decay or None for the configured one, the reason's tail)."""
    shift = signals.get("domain_shift")
    per_class = int(signals.get("min_train_images_per_class") or 0)
    locked = f"; {ft.strategy} kept (finetune.strategy_locked)"
    if isinstance(shift, (int, float)) and float(shift) >= cfg.high_shift:
        rates = (
            f"uniform learning rates chosen: domain shift {float(shift):.2f} >= high_shift "
            f"{cfg.high_shift:.2f}, so the early layers must adapt as much as the late ones"
        )
        if ft.strategy_locked:
            return ft.strategy, 1.0, f"{locked} with {rates}"
        return "full", 1.0, f"; full fine-tuning with {rates}"
    if ft.strategy_locked:
        return ft.strategy, None, locked
    if per_class < cfg.few_images_per_class:
        return (
            "partial",
            None,
            (
                f"; partial fine-tuning chosen: {per_class} images in the smallest class (< {cfg.few_images_per_class})"
                " and low domain shift, so only the last blocks train"
            ),
        )
    return ft.strategy, None, f"; {ft.strategy} kept (finetune.strategy): low domain shift and enough images"


def _log_override(configured: str, chosen: str) -> None:
    # only a non-default strategy is evidence that someone chose it (see the module docstring)
    chosen_by_user = configured != FinetuneConfig.model_fields["strategy"].default
    log.log(
        logging.WARNING if chosen_by_user else logging.INFO,
        "advisor: fine-tuning with %s instead of finetune.strategy %s; "
        "set finetune.strategy_locked: true to keep the configured strategy",
        chosen,
        configured,
    )


def finetune_settings(
    ft: FinetuneConfig, decision: FinetuneDecision, cfg: AdvisorConfig, strategy: str | None = None
) -> FinetuneConfig:
    """The fine-tuning config a run trains with: as configured, or as the advisor chose.

    ``strategy`` names the strategy explicitly (``adaptflow compare`` trains each one); the
    advisor's learning-rate profile still applies to it when ``choose_strategy`` is on.
    """
    if not cfg.choose_strategy:
        return ft if strategy is None else ft.model_copy(update={"strategy": strategy})
    update: dict[str, object] = {"strategy": strategy or decision.strategy}
    if decision.layer_decay is not None:
        update["layer_decay"] = decision.layer_decay
    return ft.model_copy(update=update)
