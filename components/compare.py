"""The compare fan-out's components: one task per strategy (inside ``dsl.ParallelFor``), one report.

Thin shells over :mod:`adaptflow.compare` steps, built for adaptflow's own image like the stage
components (lightweight components, ``install_kfp_package=False``).
"""

from dataclasses import dataclass
from typing import Any, List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output


def compare_strategy(
    snapshot: Input[Dataset],
    baseline: Input[Model],
    strategy: str,
    config_json: str,
    parent_run_id: str,
    fingerprint: str,
    outcome: Output[Model],
) -> float:
    """Train one strategy from the baseline head and score it on the shared test split."""
    from adaptflow.steps import compare_strategy_step

    return compare_strategy_step(
        snapshot.path, baseline.path, strategy, config_json, parent_run_id, outcome.path
    )


def compare_report(
    snapshot: Input[Dataset],
    baseline: Input[Model],
    outcomes: Input[List[Model]],
    data_uri: str,
    config_json: str,
    parent_run_id: str,
    report: Output[Artifact],
) -> str:
    """Gather every strategy's outcome into the comparison table and the HTML/Markdown report."""
    from adaptflow.steps import compare_report_step

    return compare_report_step(
        snapshot.path,
        baseline.path,
        [o.path for o in outcomes],
        data_uri,
        config_json,
        parent_run_id,
        report.path,
    )


@dataclass(frozen=True)
class CompareComponents:
    compare_strategy: Any
    compare_report: Any


def compare_components(base_image: str) -> CompareComponents:
    def make(func: Any) -> Any:
        return dsl.component(base_image=base_image, install_kfp_package=False)(func)

    return CompareComponents(compare_strategy=make(compare_strategy), compare_report=make(compare_report))
