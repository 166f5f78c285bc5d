"""What the comparison report may claim: the best row as the test split resolves it (ties go to the
cheaper strategy), the advisor's choice said as a prediction when it was not compared, the words
under the table, the domain-shift paragraph and legible confusion matrices."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest

from adaptflow import render
from adaptflow.contracts import CompareResult, FinetuneDecision, StrategyOutcome
from adaptflow.report_decision import TIE_RULE, advisor_headline, decide
from factories import compare_result, strategy_outcome

ROOT = Path(__file__).resolve().parents[2]
FULL = FinetuneDecision(
    should_finetune=True,
    strategy="full",
    reason="fine-tune (full): baseline val accuracy 0.800 is below the target 0.970",
    signals={"domain_shift": 1.23},
)


def row(
    strategy: str,
    accuracy: float,
    ci: tuple[float, float],
    p: float | None = None,
    params: int = 8_000_000,
    wall: float = 20.0,
) -> StrategyOutcome:
    o = strategy_outcome(strategy, accuracy, params, wall)
    score = o.score.model_copy(update={"accuracy_ci95": ci})
    return o.model_copy(update={"score": score, "p_value_vs_baseline": p})


def baseline(accuracy: float = 0.80, ci: tuple[float, float] = (0.70, 0.88)) -> StrategyOutcome:
    return row("baseline", accuracy, ci, None, params=1026, wall=2.0)


def result(*outcomes: StrategyOutcome, best: str | None = None, **fields: object) -> CompareResult:
    """``best``: the pipeline's own pick (choose_winner's), which the report must not simply trust."""
    picked = best or max(outcomes, key=lambda o: o.score.accuracy).strategy
    return compare_result(
        *outcomes, best=picked, best_reason=f"{picked} beats the baseline by the margin", **fields
    )


# -- the decision rule ------------------------------------------------------------------------------


def test_a_clear_winner_is_best() -> None:
    r = result(baseline(), row("partial", 0.95, (0.90, 0.99), p=0.001))
    d = decide(r)
    assert (d.best, d.tied_with) == ("partial", ())
    assert d.reason == r.best_reason  # the pipeline's words, confirmed by the test split
    (v,) = d.versus_baseline
    assert v.resolved and v.verdict == "better" and "p = 0.001 <= 0.05" in v.evidence()


def test_a_clear_winner_the_pipeline_missed_gets_its_own_reason() -> None:
    d = decide(result(baseline(), row("partial", 0.95, (0.90, 0.99), p=0.001), best="baseline"))
    assert d.best == "partial" and "McNemar p = 0.001" in d.reason and "disjoint" in d.reason


def test_p_025_is_a_tie_and_the_cheaper_baseline_is_preferred() -> None:
    """Even with disjoint intervals, p = 0.25 does not resolve the difference."""
    r = result(baseline(0.80, (0.70, 0.84)), row("partial", 0.92, (0.85, 0.97), p=0.25))
    assert r.best == "partial"  # what the report used to call best
    d = decide(r)
    assert (d.best, d.tied_with) == ("baseline", ("partial",))
    assert "McNemar p = 0.25 > 0.05" in d.reason and "tie" in d.reason
    assert "the cheaper baseline (1,026 trainable parameters" in d.reason
    assert d.top == "partial"


def test_overlapping_intervals_are_a_tie_even_at_p_001() -> None:
    d = decide(result(baseline(), row("partial", 0.90, (0.85, 0.95), p=0.01)))
    assert (d.best, d.tied_with) == ("baseline", ("partial",))
    assert "95% intervals overlap" in d.reason and "p = 0.01 <= 0.05" in d.reason


def test_no_p_value_is_no_evidence() -> None:
    d = decide(result(baseline(), row("partial", 0.99, (0.95, 1.0), p=None)))
    assert d.best == "baseline" and "no McNemar p-value recorded" in d.reason


def test_a_resolved_gain_below_the_finetune_margin_does_not_win() -> None:
    r = result(baseline(0.80, (0.70, 0.84)), row("partial", 0.90, (0.85, 0.95), p=0.001), finetune_margin=0.2)
    d = decide(r)
    assert d.best == "baseline" and "below the finetune_margin" in d.reason


def test_among_tied_strategies_the_cheaper_wins_parameters_then_wall_time() -> None:
    # linear_probe trains as many parameters as the baseline but took longer: the baseline stays
    d = decide(result(baseline(), row("linear_probe", 0.82, (0.72, 0.9), p=0.6, params=1026, wall=5.0)))
    assert (d.best, d.tied_with) == ("baseline", ("linear_probe",))
    # full and partial both beat the baseline; their intervals overlap, so the cheaper partial is best
    d = decide(
        result(
            baseline(0.70, (0.60, 0.78)),
            row("partial", 0.90, (0.84, 0.95), p=0.001, params=4_000_000, wall=20.0),
            row("full", 0.93, (0.88, 0.97), p=0.001, params=11_000_000, wall=30.0),
        )
    )
    assert (d.best, d.tied_with, d.top) == ("partial", ("full",), "full")
    assert "intervals overlap partial's" in d.reason and "the cheaper partial" in d.reason


def test_every_strategy_measurably_worse_keeps_the_baseline() -> None:
    d = decide(
        result(baseline(0.9, (0.85, 0.95)), row("scratch", 0.3, (0.2, 0.4), p=0.0001), best="baseline")
    )
    assert (d.best, d.tied_with) == ("baseline", ()) and "measurably worse" in d.reason


@pytest.mark.parametrize("p", [None, 0.001, 0.04, 0.25])
def test_the_best_is_always_a_compared_strategy(p: float | None) -> None:
    r = result(baseline(), row("partial", 0.95, (0.9, 0.99), p=p), best="partial")
    r = r.model_copy(update={"decision": FULL})  # the advisor chose full, which did not run
    assert decide(r).best in {"baseline", "partial"}


# -- the report and the terminal view ------------------------------------------------------------


def tie_result() -> CompareResult:
    gap = {"train_val_gap": -0.05, "train_accuracy": 0.8}
    partial = row("partial", 0.92, (0.85, 0.97), p=0.25).model_copy(update=gap)
    return result(
        baseline(0.80, (0.70, 0.84)),
        row("linear_probe", 0.82, (0.72, 0.9), p=0.6, params=1026, wall=5.0),
        partial,
        decision=FULL,
    )


@pytest.fixture(scope="module")
def tie_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    from adaptflow.report import write_report

    html_path, md_path = write_report(tie_result(), tmp_path_factory.mktemp("report"))
    return html_path.read_text(), md_path.read_text()


def test_the_report_headline_applies_the_tie_rule(tie_report: tuple[str, str]) -> None:
    page, md = tie_report
    assert "**Best**: baseline (tied with linear_probe, partial): this 20-image test split" in md
    assert "| baseline ★ |" in md and "| partial |" in md  # the ★ follows the rule too
    assert TIE_RULE in md and "How the best row is chosen" in page
    assert "The pipeline's own pick" in md and "partial: partial beats the baseline by the margin" in md


def test_the_advisor_choice_not_compared_is_a_prediction(tie_report: tuple[str, str]) -> None:
    for text in tie_report:
        assert "advisor predicted full (not compared here)" in text
        assert "not a measured result" in text
    assert "measured best is baseline" in tie_report[1]


def test_the_advisor_choice_that_was_compared_is_set_against_its_measurement() -> None:
    r = tie_result()
    partial = r.model_copy(update={"decision": FULL.model_copy(update={"strategy": "partial"})})
    line = advisor_headline(partial, decide(partial))
    assert line.startswith("advisor recommended partial, which was compared here: test accuracy 0.9200")
    assert "tied with the measured best, baseline" in line and "not compared" not in line
    keep = r.model_copy(update={"decision": FULL.model_copy(update={"should_finetune": False})})
    assert advisor_headline(keep, decide(keep)).startswith("advisor recommended baseline")


def test_the_report_explains_parameter_counts_and_a_negative_gap(tie_report: tuple[str, str]) -> None:
    _, md = tie_report
    assert "- baseline: 1,026 of 11,000,000 parameters trained (0.01%)" in md
    assert "L-BFGS" in md and "augmented images" in md
    assert "baseline and linear_probe show the same trainable count" in md
    assert "validation accuracy above training accuracy" in md and "is not overfitting" in md
    assert "Negative here on 20 validation images: partial (-0.050)" in md


def test_the_domain_shift_paragraph_is_what_shift_py_computes(tie_report: tuple[str, str]) -> None:
    from adaptflow.report import SHIFT_METHOD

    tree = ast.parse((ROOT / "src/adaptflow/training/shift.py").read_text())
    doc = ast.get_docstring(tree) or ""
    for text in ("BatchNorm", "KL(target || source)", "0.5 * (var_t / var_s + (mean_t - mean_s)"):
        assert text in doc and text in SHIFT_METHOD
    assert "averaged over the channels of a layer, then over the BatchNorm layers" in SHIFT_METHOD
    assert "source feature std" not in SHIFT_METHOD  # the older formula
    page, md = tie_report
    assert "KL(target || source)" in md and "KL(target || source)" in page


def test_compare_view_best_line_applies_the_tie_rule() -> None:
    from rich.console import Console

    console = Console(width=400, file=io.StringIO(), color_system=None)
    console.print(render.compare_view(tie_result()))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    best = next(line for line in text.splitlines() if line.startswith("best:"))
    assert best.startswith("best: baseline (tied with linear_probe, partial): this 20-image test split")
    assert "McNemar p = 0.25 > 0.05" in best
    assert "baseline ★" in text and "partial ★" not in text


# -- confusion matrices ----------------------------------------------------------------------------


def test_confusion_layout_grows_with_the_classes_and_stays_readable() -> None:
    from adaptflow.plots import ConfusionLayout, confusion_layout

    layouts = [confusion_layout([f"c{i}" for i in range(n)]) for n in (2, 5, 10, 20, 40)]
    sizes = [layout.panel_inches for layout in layouts]
    assert sizes == sorted(sizes) and sizes[0] >= 4.5 and sizes[-1] > 2 * sizes[0]
    for n, layout in zip((2, 5, 10, 20, 40), layouts, strict=True):
        assert layout.cell_font >= ConfusionLayout.MIN_FONT and layout.tick_font >= ConfusionLayout.MIN_FONT
        cell_points = (layout.panel_inches - 2) / n * 72
        assert layout.cell_font <= 0.5 * cell_points or layout.cell_font == ConfusionLayout.MIN_FONT
    assert confusion_layout(["cat", "dog"]).cell_font >= 12  # few classes: big numbers


def test_confusion_figure_annotates_counts_at_the_layout_sizes() -> None:
    from adaptflow.plots import confusion_layout
    from adaptflow.report import confusion_figure

    def figure(n: int):  # type: ignore[no-untyped-def]
        classes = [f"class-{i}" for i in range(n)]
        matrix = [[10 if i == j else 1 for j in range(n)] for i in range(n)]
        outcomes = [
            o.model_copy(update={"score": o.score.model_copy(update={"confusion_matrix": matrix})})
            for o in (baseline(), row("partial", 0.9, (0.8, 0.95)))
        ]
        return confusion_figure(outcomes, classes), confusion_layout(classes)

    small, small_layout = figure(2)
    large, large_layout = figure(15)
    try:
        assert large.get_size_inches()[0] * large.get_size_inches()[1] > 4 * (
            small.get_size_inches()[0] * small.get_size_inches()[1]
        )
        for fig, layout, n in ((small, small_layout, 2), (large, large_layout, 15)):
            ax = fig.axes[0]
            assert len(ax.texts) == n * n  # every cell's count
            assert {t.get_fontsize() for t in ax.texts} == {layout.cell_font}
            assert {t.get_fontsize() for t in ax.get_xticklabels()} == {layout.tick_font}
            assert fig.get_size_inches()[0] <= max(12.0, layout.panel_inches)  # side by side only if it fits
    finally:
        import matplotlib.pyplot as plt

        plt.close(small)
        plt.close(large)
