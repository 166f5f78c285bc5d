"""The advisor: should we fine-tune, and how? Decided from measured signals, explained in words.

Signals (all recorded in the decision and in MLflow):
- ``baseline_val_accuracy`` against ``target_accuracy``: transfer learning may already be enough.
- ``min_train_images_per_class``: with few images, fine-tuning a whole backbone overfits.
- ``domain_shift``: how far the target's frozen features sit from the source's (mean absolute
  standardized difference of feature means, using the statistics saved with the weights). Large
  values mean the frozen features were made for other images, so fine-tuning deeper pays more.
- ``estimated_finetune_seconds``: measured train throughput x planned epochs x train images,
  against ``budget_seconds``.

How domain shift is measured: the pretrained weights carry the source task's feature statistics
(``feature_mean``/``feature_std``, per feature dimension, over the source training images; written by
``adaptflow.training.pretrain``). The baseline computes the frozen features of the target's training
images anyway (they are cached), and the signal is

    mean_d |mean_target[d] - mean_source[d]| / (std_source[d] + 1e-3)

i.e. how many source standard deviations the average target feature moved. It is cheap (no extra
forward passes), needs no source images at run time, and is None for weights without statistics
(e.g. torchvision's ImageNet files). It looks at first moments only: a target that differs only in
feature correlations scores low.

Strategy choice (``choose_strategy``, off by default; only when fine-tuning pays): a shift at or
above ``high_shift`` picks ``full`` (the frozen features were made for other images, so the deep
layers must move); otherwise fewer than ``few_images_per_class`` training images in the smallest class
picks ``partial`` (fewer parameters to overfit with); otherwise ``finetune.strategy`` stays.

Measured limits (bench/RESULTS.md, split-task digits): the signal did NOT separate the targets there
(in-domain 5-9: 0.56, inverted + rotated 5-9: 0.54), although full fine-tuning gained most on the
shifted target. First moments of pooled features miss this kind of shift, which is why the choice is
off by default and the rule stays conservative; do not rely on ``high_shift`` without measuring it on
your own data.
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
    strategy: str = ft.strategy
    why = ""
    if cfg.choose_strategy:
        strategy, why = choose_strategy(signals, cfg, ft)

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
            f"{estimate:.0f}s fits the {cfg.budget_seconds:.0f}s budget{why}"
        ),
        signals=signals,
    )


def choose_strategy(
    signals: dict[str, SignalValue], cfg: AdvisorConfig, ft: FinetuneConfig
) -> tuple[str, str]:
    """(strategy, the reason's tail): high shift -> full; low shift + few images -> partial; else as configured."""
    shift = signals.get("domain_shift")
    per_class = int(signals.get("min_train_images_per_class") or 0)
    if isinstance(shift, (int, float)) and float(shift) >= cfg.high_shift:
        return "full", (
            f"; full fine-tuning chosen: domain shift {float(shift):.2f} >= high_shift {cfg.high_shift:.2f}, "
            "so the deep features must adapt"
        )
    if per_class < cfg.few_images_per_class:
        return "partial", (
            f"; partial fine-tuning chosen: {per_class} images in the smallest class (< {cfg.few_images_per_class})"
            " and low domain shift, so only the last blocks train"
        )
    return ft.strategy, f"; {ft.strategy} kept (finetune.strategy): low domain shift and enough images"
