"""The advisor: should we fine-tune, and how? Decided from measured signals, explained in words.

Signals (all recorded in the decision and in MLflow):
- ``baseline_val_accuracy`` against ``target_accuracy``: transfer learning may already be enough.
- ``min_train_images_per_class``: with few images, fine-tuning a whole backbone overfits.
- ``domain_shift``: how far the target's frozen features sit from the source's (mean absolute
  standardized difference of feature means, using the statistics saved with the weights). Large
  values mean the frozen features were made for other images, so fine-tuning deeper pays more.
- ``estimated_finetune_seconds``: measured train throughput x planned epochs x train images,
  against ``budget_seconds``.
"""

from __future__ import annotations

from adaptflow.config import AdvisorConfig, FinetuneConfig
from adaptflow.contracts import FinetuneDecision

SignalValue = float | int | str | None


def advise(signals: dict[str, SignalValue], cfg: AdvisorConfig, ft: FinetuneConfig) -> FinetuneDecision:
    acc = float(signals["baseline_val_accuracy"] or 0.0)
    per_class = int(signals["min_train_images_per_class"] or 0)
    estimate = float(signals["estimated_finetune_seconds"] or 0.0)
    shift = signals.get("domain_shift")
    shift_text = f", domain shift {float(shift):.2f}" if isinstance(shift, (int, float)) else ""
    strategy = ft.strategy

    if cfg.force is not None:
        verb = "fine-tune" if cfg.force else "keep the baseline"
        return FinetuneDecision(
            should_finetune=cfg.force,
            strategy=strategy,
            reason=f"forced by baseline.advisor.force={cfg.force}: {verb} (val accuracy {acc:.3f}{shift_text})",
            signals=signals,
        )
    if acc >= cfg.target_accuracy:
        return FinetuneDecision(
            should_finetune=False,
            strategy=strategy,
            reason=(
                f"transfer learning is enough: baseline val accuracy {acc:.3f} reaches the target "
                f"{cfg.target_accuracy:.3f}{shift_text}"
            ),
            signals=signals,
        )
    if per_class < cfg.min_images_per_class:
        return FinetuneDecision(
            should_finetune=False,
            strategy=strategy,
            reason=(
                f"too little data to fine-tune safely: {per_class} training images in the smallest class "
                f"(< {cfg.min_images_per_class}); fine-tuning would likely overfit, so the baseline stays"
            ),
            signals=signals,
        )
    if estimate > cfg.budget_seconds:
        return FinetuneDecision(
            should_finetune=False,
            strategy=strategy,
            reason=(
                f"over budget: fine-tuning is estimated at {estimate:.0f}s, above the "
                f"{cfg.budget_seconds:.0f}s budget"
            ),
            signals=signals,
        )
    return FinetuneDecision(
        should_finetune=True,
        strategy=strategy,
        reason=(
            f"fine-tune ({strategy}): baseline val accuracy {acc:.3f} is below the target {cfg.target_accuracy:.3f}"
            f"{shift_text}; the smallest class has {per_class} training images and the estimated "
            f"{estimate:.0f}s fits the {cfg.budget_seconds:.0f}s budget"
        ),
        signals=signals,
    )
