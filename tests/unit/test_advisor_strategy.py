"""The advisor's strategy choice (baseline.advisor.choose_strategy), one test per branch."""

from __future__ import annotations

import pytest

from adaptflow.config import AdvisorConfig, FinetuneConfig, load_settings
from adaptflow.contracts import FinetuneDecision
from adaptflow.training.advisor import advise, finetune_settings

ON = AdvisorConfig(choose_strategy=True, high_shift=1.0, few_images_per_class=50, min_images_per_class=20)


def _signals(
    acc: float = 0.8, per_class: int = 100, shift: float | None = 0.3, estimate: float = 10.0
) -> dict:
    return {
        "baseline_val_accuracy": acc,
        "min_train_images_per_class": per_class,
        "estimated_finetune_seconds": estimate,
        "domain_shift": shift,
    }


def test_choice_is_on_by_default_and_can_be_turned_off() -> None:
    advisor = load_settings().baseline.advisor
    assert advisor.choose_strategy is True and advisor.high_shift == 0.25
    off = AdvisorConfig(choose_strategy=False)
    decision = advise(_signals(shift=5.0, per_class=30), off, FinetuneConfig(strategy="lora"))
    assert decision.should_finetune and decision.strategy == "lora" and decision.layer_decay is None
    assert "chosen" not in decision.reason
    ft = FinetuneConfig(strategy="lora", layer_decay=0.5)
    assert finetune_settings(ft, decision, off) == ft


def test_high_shift_chooses_full_with_uniform_rates() -> None:
    decision = advise(_signals(shift=1.7, per_class=30), ON, FinetuneConfig(strategy="lora"))
    assert decision.should_finetune and decision.strategy == "full" and decision.layer_decay == 1.0
    assert (
        "domain shift 1.70 >= high_shift 1.00" in decision.reason
        and "uniform learning rates" in decision.reason
    )
    trained = finetune_settings(FinetuneConfig(strategy="lora", layer_decay=0.5), decision, ON)
    assert trained.strategy == "full" and trained.layer_decay == 1.0
    # compare names each strategy itself; the advisor's rate profile still applies to it
    assert finetune_settings(FinetuneConfig(layer_decay=0.5), decision, ON, "partial").model_dump() == (
        FinetuneConfig(strategy="partial", layer_decay=1.0).model_dump()
    )


def test_decisions_saved_before_layer_decay_existed_still_load() -> None:
    old = {"should_finetune": True, "strategy": "full", "reason": "r", "signals": {}}
    assert FinetuneDecision.model_validate(old).layer_decay is None


def test_low_shift_and_few_images_chooses_partial() -> None:
    decision = advise(_signals(shift=0.4, per_class=30), ON, FinetuneConfig(strategy="full"))
    assert decision.should_finetune and decision.strategy == "partial" and decision.layer_decay is None
    assert "30 images in the smallest class (< 50)" in decision.reason


@pytest.mark.parametrize("shift", [0.4, None])
def test_low_or_unknown_shift_with_enough_images_keeps_the_configured_strategy(shift: float | None) -> None:
    decision = advise(_signals(shift=shift, per_class=200), ON, FinetuneConfig(strategy="gradual"))
    assert decision.should_finetune and decision.strategy == "gradual"
    assert "gradual kept" in decision.reason


@pytest.mark.parametrize(
    ("signals", "phrase"),
    [
        (_signals(acc=0.99, shift=3.0), "transfer learning is enough"),
        (_signals(per_class=5, shift=3.0), "too little data"),
        (_signals(estimate=1e6, shift=3.0), "over budget"),
    ],
)
def test_choice_never_overrides_keeping_the_baseline(signals: dict, phrase: str) -> None:
    decision = advise(signals, ON, FinetuneConfig())
    assert not decision.should_finetune and phrase in decision.reason


def test_few_images_alone_no_longer_keeps_the_baseline_by_default() -> None:
    # measured: with 6 training images per class fine-tuning beat the linear probe (bench/RESULTS.md)
    assert AdvisorConfig().min_images_per_class is None
    decision = advise(_signals(per_class=6, shift=0.1), AdvisorConfig(), FinetuneConfig())
    assert decision.should_finetune and "too little data" not in decision.reason


@pytest.mark.parametrize(("acc", "low", "enough"), [(1.0, 0.72, False), (0.99, 0.975, True)])
def test_enough_is_judged_on_the_lower_bound_of_val_accuracy(acc: float, low: float, enough: bool) -> None:
    signals = {**_signals(acc=acc), "baseline_val_accuracy_low": low}
    decision = advise(signals, AdvisorConfig(), FinetuneConfig())
    assert decision.should_finetune is not enough
    assert f"95% lower bound {low:.3f}" in decision.reason
