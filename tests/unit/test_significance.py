"""McNemar's exact test (known values) and the gate's require_significance branch."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from adaptflow.config import GateConfig
from adaptflow.evaluation import mcnemar_exact
from adaptflow.promotion import decide_gate
from factories import export_result, model_score


def _pairs(only_a: int, only_b: int, both: int = 5, neither: int = 3) -> tuple[np.ndarray, ...]:
    """Labels and two prediction vectors with the given discordant counts."""
    n = only_a + only_b + both + neither
    y = np.zeros(n, dtype=int)
    a = np.zeros(n, dtype=int)
    b = np.zeros(n, dtype=int)
    b[:only_a] = 1  # A right, B wrong
    a[only_a : only_a + only_b] = 1  # B right, A wrong
    a[n - neither :] = b[n - neither :] = 2  # both wrong
    return y, a, b


def _exact(k: int, n: int) -> float:
    tail = sum(comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize(("only_a", "only_b"), [(8, 0), (10, 2), (2, 10), (6, 4), (1, 0), (15, 5), (0, 0)])
def test_mcnemar_exact_matches_the_binomial_formula(only_a: int, only_b: int) -> None:
    y, a, b = _pairs(only_a, only_b)
    expected = 1.0 if only_a + only_b == 0 else _exact(only_a, only_a + only_b)
    assert mcnemar_exact(y, a, b) == pytest.approx(expected)
    assert mcnemar_exact(y, b, a) == pytest.approx(expected)  # symmetric


def test_mcnemar_known_values() -> None:
    assert mcnemar_exact(*_pairs(10, 2)) == pytest.approx(0.03857421875)  # 2 * 79/4096
    assert mcnemar_exact(*_pairs(1, 0)) == 1.0
    assert mcnemar_exact(*_pairs(6, 0)) == pytest.approx(0.03125)
    # concordant images (both right or both wrong) never change the p-value
    assert mcnemar_exact(*_pairs(10, 2, both=0, neither=0)) == mcnemar_exact(
        *_pairs(10, 2, both=50, neither=9)
    )


EXPORT = export_result()


@pytest.mark.parametrize(
    ("p_value", "promote", "phrase"),
    [
        (0.01, True, "McNemar p=0.0100 < alpha 0.05"),
        (0.05, False, "not significant: McNemar p=0.0500 >= alpha 0.05"),  # alpha itself is not enough
        (0.3, False, "not significant"),
        (None, False, "not significant: McNemar p=1.0000"),  # no test = no evidence
    ],
)
def test_gate_require_significance(p_value: float | None, promote: bool, phrase: str) -> None:
    cfg = GateConfig(require_significance=True, alpha=0.05, min_delta=0.005, min_accuracy=0.5)
    decision = decide_gate(model_score("w", 0.95), model_score("champion", 0.90), EXPORT, p_value, cfg)
    assert decision.promote is promote
    assert any(phrase in r for r in decision.reasons), decision.reasons


def test_gate_significance_is_informational_when_not_required() -> None:
    cfg = GateConfig(require_significance=False, min_accuracy=0.5)
    decision = decide_gate(model_score("w", 0.95), model_score("champion", 0.90), EXPORT, 0.4, cfg)
    assert decision.promote and any("informational" in r for r in decision.reasons)


def test_significance_cannot_rescue_a_model_below_min_delta() -> None:
    cfg = GateConfig(require_significance=True, alpha=0.05, min_delta=0.02, min_accuracy=0.5)
    decision = decide_gate(model_score("w", 0.91), model_score("champion", 0.90), EXPORT, 0.001, cfg)
    assert not decision.promote and any("delta +0.0100 < min_delta" in r for r in decision.reasons)


def test_first_run_ignores_significance() -> None:
    cfg = GateConfig(require_significance=True, min_accuracy=0.5)
    assert decide_gate(model_score("w", 0.95), None, EXPORT, None, cfg).promote
