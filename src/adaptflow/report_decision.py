"""What the comparison report may claim: the best strategy as the test split can resolve it, the
advisor's choice set against what was actually compared, and the words that explain each column.

:func:`decide` is pure: a :class:`~adaptflow.contracts.CompareResult` in, a :class:`Decision` out.
The report's headline, its ★ and ``adaptflow compare``'s "best" line all come from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from adaptflow.contracts import CompareResult, FinetuneDecision, StrategyOutcome

BASELINE = "baseline"  # as adaptflow.compare.BASELINE (not imported: compare imports the report)
ALPHA = 0.05

TIE_RULE = (
    f"How the best row is chosen: a strategy beats the baseline only when the shared test split "
    f"resolves the difference, i.e. its exact McNemar p-value against the baseline is at most {ALPHA} "
    f"and the two 95% accuracy intervals do not overlap, and the gain reaches the finetune_margin. "
    f"Any other difference is reported as a tie with the baseline. Among tied strategies the cheaper "
    f"one is preferred: fewer trainable parameters, then less training wall time (the baseline and "
    f"linear_probe train only the head, so they are the cheapest). Between fine-tuned strategies that "
    f"both beat the baseline only the intervals are available (no paired test between them is "
    f"recorded): overlapping intervals count as a tie, and the cheaper one is preferred."
)


@dataclass(frozen=True)
class VersusBaseline:
    """One strategy against the baseline on the same test images."""

    strategy: str
    gain: float  # test accuracy minus the baseline's
    p_value: float | None  # exact McNemar, two-sided
    intervals_overlap: bool
    below_margin: bool

    @property
    def resolved(self) -> bool:
        """The test split tells the two apart: p <= ALPHA and disjoint 95% intervals."""
        return self.p_value is not None and self.p_value <= ALPHA and not self.intervals_overlap

    @property
    def verdict(self) -> str:
        if not self.resolved:
            return "tie"
        if self.gain < 0:
            return "worse"
        return "below margin" if self.below_margin else "better"

    def evidence(self) -> str:
        p = (
            "no McNemar p-value recorded"
            if self.p_value is None
            else f"McNemar p = {self.p_value:.3g} {'<=' if self.p_value <= ALPHA else '>'} {ALPHA}"
        )
        spans = "95% intervals overlap" if self.intervals_overlap else "95% intervals disjoint"
        short = "; below the finetune_margin" if self.verdict == "below margin" else ""
        return f"{self.strategy} {self.gain:+.4f} vs the baseline ({p}; {spans}{short})"


@dataclass(frozen=True)
class Decision:
    """The best strategy among those compared, the ones it is tied with, and why."""

    best: str
    tied_with: tuple[str, ...]
    reason: str
    versus_baseline: tuple[VersusBaseline, ...]
    top: str  # the highest test accuracy, resolved or not


def _overlap(a: StrategyOutcome, b: StrategyOutcome) -> bool:
    (a_low, a_high), (b_low, b_high) = a.score.accuracy_ci95, b.score.accuracy_ci95
    return a_low <= b_high and b_low <= a_high


def cost_key(o: StrategyOutcome) -> tuple[int, float, bool]:
    """Cheaper first: fewer trainable parameters, then less wall time, then the baseline."""
    return o.trainable_params, o.wall_seconds, o.strategy != BASELINE


def baseline_of(result: CompareResult) -> StrategyOutcome:
    return next((o for o in result.outcomes if o.strategy == BASELINE), result.outcomes[0])


def _cost(o: StrategyOutcome) -> str:
    return f"{o.strategy} ({o.trainable_params:,} trainable parameters, {o.wall_seconds:.1f} s)"


def _preferred(best: StrategyOutcome, others: Sequence[StrategyOutcome]) -> str:
    return f"the cheaper {_cost(best)} is preferred over " + ", ".join(_cost(o) for o in others)


def decide(result: CompareResult) -> Decision:
    """The best strategy by the rule in :data:`TIE_RULE`, only ever one of ``result.outcomes``."""
    base = baseline_of(result)
    others = [o for o in result.outcomes if o is not base]
    margin = result.finetune_margin
    versus = tuple(
        VersusBaseline(
            o.strategy,
            o.score.accuracy - base.score.accuracy,
            o.p_value_vs_baseline,
            _overlap(o, base),
            o.score.accuracy - base.score.accuracy < margin,
        )
        for o in others
    )
    by_name = {v.strategy: v for v in versus}
    top = max(result.outcomes, key=lambda o: o.score.accuracy).strategy
    better = [o for o in others if by_name[o.strategy].verdict == "better"]
    if not better:
        tied = [base, *(o for o in others if by_name[o.strategy].verdict in ("tie", "below margin"))]
        best = min(tied, key=cost_key)
        rest = [o for o in tied if o is not best]
        if not others:
            reason = "only the transfer-learning baseline was trained"
        elif not rest:
            reason = "every compared strategy is measurably worse than the baseline: " + "; ".join(
                v.evidence() for v in versus
            )
        else:
            unresolved = [by_name[o.strategy] for o in tied if o is not base]
            worse = [v for v in versus if v.verdict == "worse"]
            reason = (
                f"this {base.score.n}-image test split resolves no compared strategy's lead over the "
                f"baseline ({'; '.join(v.evidence() for v in unresolved)}), so "
                f"{'it ties' if len(unresolved) == 1 else 'they tie'} with the baseline; "
                + _preferred(best, rest)
                + ("" if not worse else "; measurably worse: " + "; ".join(v.evidence() for v in worse))
            )
        return Decision(best.strategy, tuple(o.strategy for o in rest), reason, versus, top)
    lead = max(better, key=lambda o: o.score.accuracy)
    group = [o for o in better if _overlap(o, lead)]
    best = min(group, key=cost_key)
    rest = [o for o in group if o is not best]
    if not rest and best.strategy == result.best:
        reason = result.best_reason  # the pipeline's own words, and the test split confirms them
    elif not rest:
        reason = f"{best.strategy} beats the baseline: {by_name[best.strategy].evidence()}"
    else:
        reason = (
            f"{best.strategy} beats the baseline ({by_name[best.strategy].evidence()}); "
            f"{', '.join(o.strategy for o in rest)} also beat{'s' if len(rest) == 1 else ''} it, but "
            f"their 95% intervals overlap {best.strategy}'s, so they tie and " + _preferred(best, rest)
        )
    return Decision(best.strategy, tuple(o.strategy for o in rest), reason, versus, top)


def advisor_choice(decision: FinetuneDecision) -> str:
    """The strategy the advisor chose before anything was fine-tuned (keeping it: the baseline)."""
    return decision.strategy if decision.should_finetune else BASELINE


def advisor_headline(result: CompareResult, chosen: Decision) -> str:
    """The advisor's choice, said as what it is: measured here, or only predicted."""
    advised = advisor_choice(result.decision)
    compared = [o.strategy for o in result.outcomes]
    if advised not in compared:
        return (
            f"advisor predicted {advised} (not compared here): this is the advisor's prediction from "
            f"its signals, made before any strategy was trained, not a measured result. Among "
            f"the strategies compared ({', '.join(compared)}) the measured best is {chosen.best}."
        )
    o = result.outcome(advised)
    low, high = o.score.accuracy_ci95
    measured = f"test accuracy {o.score.accuracy:.4f} [{low:.3f}, {high:.3f}]"
    if advised == chosen.best:
        agreement = "the measured best too"
    elif advised in chosen.tied_with:
        agreement = f"tied with the measured best, {chosen.best}"
    else:
        agreement = f"the measured best is {chosen.best}"
    return f"advisor recommended {advised}, which was compared here: {measured}; {agreement}."


STRATEGY_NOTES = {
    BASELINE: "the transfer-learning head alone, fitted by the pipeline's baseline stage: full-batch "
    "L-BFGS (L2-penalised logistic regression) on cached, un-augmented features of the frozen "
    "backbone, early-stopped on validation",
    "linear_probe": "the same head, started from the baseline's, trained again as a fine-tuning "
    "strategy: AdamW through the fine-tuning loop on augmented images, everything else frozen "
    "(BatchNorm statistics included)",
    "partial": "the head and the last finetune.unfreeze_blocks backbone blocks, the earlier blocks frozen",
    "full": "every parameter, with layer-wise learning-rate decay (uniform rates when the advisor "
    "measured a high domain shift)",
    "gradual": "head first, then one more backbone block per stage, top down; the count is what was "
    "unfrozen by the last epoch",
    "lora": "low-rank adapters on the backbone's conv and linear layers plus the head; the adapters are "
    "merged after training, so the total is the plain network's",
    "scratch": "every parameter of a randomly initialised backbone and head (the no-pretraining control)",
}


def parameter_notes(result: CompareResult) -> list[str]:
    """One line per row: trainable of total parameters, and what those trainable parameters are."""
    lines = []
    for o in result.outcomes:
        share = o.trainable_params / o.total_params if o.total_params else 0.0
        what = STRATEGY_NOTES.get(o.strategy, "as the strategy defines it")
        lines.append(
            f"{o.strategy}: {o.trainable_params:,} of {o.total_params:,} parameters trained "
            f"({share:.2%}): {what}."
        )
    names = {o.strategy: o for o in result.outcomes}
    if BASELINE in names and "linear_probe" in names:
        same = names[BASELINE].trainable_params == names["linear_probe"].trainable_params
        lines.append(
            f"baseline and linear_probe {'show the same trainable count' if same else 'both train the head'} "
            "because both train only the linear head on the frozen backbone; they differ in how: the "
            "baseline's L-BFGS fit on cached, un-augmented features versus linear_probe's AdamW epochs on "
            "augmented images, starting from the baseline's head. Different optimiser, data and stopping "
            "point give different weights, so their results differ."
        )
    return lines


GAP_NOTE = (
    "train-val gap: training minus validation accuracy at the best epoch. A large positive gap is "
    "overfitting. A negative gap (validation accuracy above training accuracy) is not overfitting: "
    "the fine-tuning strategies' training accuracy is the running average over the epoch's augmented "
    "images, taken while the weights are still changing, and validation is scored after the epoch on "
    "un-augmented images (adaptflow's heads have no dropout; models with dropout show the same effect "
    "from it); and a small or easy validation split can sit above the training split by a few images."
)


def gap_note(result: CompareResult) -> str:
    negative = [f"{o.strategy} ({o.train_val_gap:+.3f})" for o in result.outcomes if o.train_val_gap < 0]
    if not negative:
        return GAP_NOTE
    val = result.counts.get("val")
    split = f" on {val} validation images" if val else ""
    return f"{GAP_NOTE} Negative here{split}: {', '.join(negative)}."
