"""The literature's direction, checked on split-task digits (bench/evidence.py, issue 5 item 4).

Protocol: the default config with fine-tuning fixed at 12 epochs (`finetune.epochs=12`; the default
now sizes the schedule from the data), the advisor's choice on, three training seeds
per condition on one snapshot and one test split; a claim holds when it holds in every seed and on
average by more than the promotion margin (0.01). Measured (bench/RESULTS.md):

- On the shifted target (inverted + rotated), full fine-tuning beats the frozen baseline:
  reproduced (0.988 mean vs 0.958, 3/3 seeds).
- With few images (10/class, in-domain), transfer beats training from scratch: reproduced at first
  (0.888 vs 0.805, 3/3 seeds), but only while 12 epochs of 64-image batches gave each run about 12
  optimizer steps. With the data-sized batches scratch caught up (gains -0.051, -0.084, 0.000): an
  xfail that says so.
- With few images in-domain, the advisor keeps the baseline "within the margin": NOT reproduced
  (fine-tuning gained +0.06/+0.07 in every seed), so the advisor now fine-tunes there, and the test
  checks that fine-tuning beats the baseline.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from bench_modules import load_bench

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def ev() -> ModuleType:
    return load_bench("evidence")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evidence")


def _by_strategy(rows: list) -> dict:
    return {r.strategy: r for r in rows}


@pytest.mark.slow
def test_shifted_target_fine_tuning_beats_the_frozen_baseline(ev: ModuleType, workdir: Path) -> None:
    runs = [
        _by_strategy(ev.run_condition(ev.Condition("target-shifted", None), workdir, ("full",), seed=seed))
        for seed in SEEDS
    ]
    advice = runs[0]["baseline"]
    # the advisor measures the shift and asks for full fine-tuning with uniform learning rates
    assert advice.domain_shift is not None and advice.domain_shift >= 0.25
    assert advice.advisor_finetune and advice.advisor_strategy == "full (layer_decay 1)", (
        advice.advisor_reason
    )
    gains = [run["full"].accuracy - run["baseline"].accuracy for run in runs]
    # fine-tuning wins with every training seed, and on average by more than the promotion margin
    assert min(gains) > 0 and sum(gains) / len(gains) > 0.01, gains


@pytest.fixture(scope="module")
def few_in_domain(ev: ModuleType, workdir: Path) -> list[dict]:
    """10 training images per class of the in-domain target: baseline, partial, full, scratch; per seed."""
    condition = ev.Condition("target", 10)
    return [
        _by_strategy(ev.run_condition(condition, workdir, ("partial", "full", "scratch"), seed=s))
        for s in SEEDS
    ]


@pytest.mark.slow
def test_few_images_in_domain_the_advisor_fine_tunes(few_in_domain: list[dict]) -> None:
    """Was "the advisor keeps the baseline": measured false (fine-tuning gained +0.06/+0.07 in every seed),
    so the few-images rule is off by default and fine-tuning trains for a step-sized schedule."""
    for run in few_in_domain:
        base = run["baseline"]
        assert base.advisor_finetune and "too little data" not in base.advisor_reason, base.advisor_reason


@pytest.mark.slow
def test_few_images_in_domain_fine_tuning_beats_the_baseline(few_in_domain: list[dict]) -> None:
    gains = [
        max(run["partial"].accuracy, run["full"].accuracy) - run["baseline"].accuracy for run in few_in_domain
    ]
    assert min(gains) > 0 and sum(gains) / len(gains) > 0.01, gains


@pytest.mark.slow
@pytest.mark.xfail(
    reason="not reproduced once both are trained for enough steps: with the data-sized batches (8 images, "
    "about 5 steps per epoch instead of 1) full fine-tuning minus scratch was -0.051, -0.084, 0.000 over "
    "3 seeds (2026-11-26); the earlier 0.888 vs 0.805 came from a from-scratch run of 12 optimizer steps",
    strict=False,
)
def test_few_images_transfer_beats_training_from_scratch(few_in_domain: list[dict]) -> None:
    """The same network and training (``full``), from the source weights or from a random init."""
    gains = [run["full"].accuracy - run["scratch"].accuracy for run in few_in_domain]
    assert min(gains) > 0 and sum(gains) / len(gains) > 0.01, gains
