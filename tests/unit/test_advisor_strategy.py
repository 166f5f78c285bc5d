"""The advisor's optional strategy choice (baseline.advisor.choose_strategy), one test per branch."""

from __future__ import annotations

import pytest

from adaptflow.config import AdvisorConfig, FinetuneConfig, load_settings
from adaptflow.training.advisor import advise

ON = AdvisorConfig(choose_strategy=True, high_shift=1.0, few_images_per_class=50)


def _signals(
    acc: float = 0.8, per_class: int = 100, shift: float | None = 0.3, estimate: float = 10.0
) -> dict:
    return {
        "baseline_val_accuracy": acc,
        "min_train_images_per_class": per_class,
        "estimated_finetune_seconds": estimate,
        "domain_shift": shift,
    }


def test_choice_is_off_by_default_and_keeps_the_configured_strategy() -> None:
    assert load_settings().baseline.advisor.choose_strategy is False
    decision = advise(_signals(shift=5.0, per_class=30), AdvisorConfig(), FinetuneConfig(strategy="lora"))
    assert decision.should_finetune and decision.strategy == "lora"
    assert "chosen" not in decision.reason


def test_high_shift_chooses_full() -> None:
    decision = advise(_signals(shift=1.7, per_class=30), ON, FinetuneConfig(strategy="lora"))
    assert decision.should_finetune and decision.strategy == "full"
    assert "domain shift 1.70 >= high_shift 1.00" in decision.reason


def test_low_shift_and_few_images_chooses_partial() -> None:
    decision = advise(_signals(shift=0.4, per_class=30), ON, FinetuneConfig(strategy="full"))
    assert decision.should_finetune and decision.strategy == "partial"
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
