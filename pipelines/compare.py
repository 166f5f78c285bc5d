"""``build_compare_pipeline(settings, image)``: transfer learning versus fine-tuning on a cluster.

ingest -> baseline -> dsl.ParallelFor(strategies): compare_strategy (one GPU task each)
                   -> compare_report (dsl.Collected outcomes: table, plots, HTML + Markdown)

Locally, ``adaptflow compare`` runs this DAG through kfp.local (``pipelines/local.run_compare_local``),
one strategy at a time.
"""

from pathlib import Path
from typing import Any

from adaptflow.components import pipeline_components
from adaptflow.components.compare import compare_components
from adaptflow.pipelines.pipeline import (
    DEFAULT_IMAGE,
    adaptflow_dag,
    add_ingest_and_baseline,
    apply_cluster_settings,
)
from kfp import compiler, dsl

from adaptflow.config import FINETUNE_STRATEGIES, Settings

COMPARE_PIPELINE_NAME = "adaptflow-compare"
COMPARE_DESCRIPTION = (
    "Every fine-tuning strategy against the transfer-learning baseline, one task per strategy, "
    "scored on the same test split; ends in an HTML/Markdown report."
)
DEFAULT_STRATEGIES = list(FINETUNE_STRATEGIES)


def build_compare_pipeline(
    settings: Settings, image: str | None = None, name: str = COMPARE_PIPELINE_NAME, parallelism: int = 0
) -> Any:
    """The compare DAG; ``parallelism`` caps the strategy tasks running at once (0: no cap)."""
    cluster = settings.cluster
    img = image or cluster.image or DEFAULT_IMAGE
    c = pipeline_components(img)
    cc = compare_components(img)
    default_config = settings.to_json()

    def setup(task: Any, stage: str, display: str) -> Any:
        return apply_cluster_settings(task, stage, cluster).set_display_name(display)

    @adaptflow_dag(name, COMPARE_DESCRIPTION, cluster)
    def compare_pipeline(
        data_uri: str,
        strategies: list = DEFAULT_STRATEGIES,
        config_json: str = default_config,
        parent_run_id: str = "",
    ) -> dsl.Artifact:
        ingest, add_baseline = add_ingest_and_baseline(
            c, setup, data_uri, config_json, parent_run_id, True, name, ""
        )
        baseline = add_baseline()
        shared = {
            "snapshot": ingest.outputs["snapshot"],
            "baseline": baseline.outputs["result"],
            "config_json": config_json,
            "parent_run_id": ingest.outputs["parent_run_id"],
        }
        with dsl.ParallelFor(items=strategies, name="strategies", parallelism=parallelism) as strategy:
            task = cc.compare_strategy(strategy=strategy, fingerprint=ingest.outputs["fingerprint"], **shared)
            setup(task, "finetune", "strategy")
        outcomes = dsl.Collected(task.outputs["outcome"])
        report = cc.compare_report(outcomes=outcomes, data_uri=data_uri, **shared)
        setup(report, "evaluate", "compare report")
        return report.outputs["report"]

    return compare_pipeline


def compile_compare_pipeline(settings: Settings, output: str | Path, image: str | None = None) -> Path:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_compare_pipeline(settings, image), str(out))
    return out
