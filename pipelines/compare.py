"""``build_compare_pipeline(settings, image)``: transfer learning versus fine-tuning on a cluster.

ingest -> baseline -> dsl.ParallelFor(strategies): compare_strategy (one GPU task each)
                   -> compare_report (dsl.Collected outcomes: table, plots, HTML + Markdown)

Locally, ``adaptflow compare`` runs the same steps in sequence (``adaptflow.compare.run_compare``).
"""

from pathlib import Path
from typing import Any

from adaptflow.components import stage_components
from adaptflow.components.compare import compare_components
from adaptflow.pipelines.pipeline import DEFAULT_IMAGE, apply_cluster_settings
from kfp import compiler, dsl

from adaptflow.config import Settings

COMPARE_PIPELINE_NAME = "adaptflow-compare"
DEFAULT_STRATEGIES = ["linear_probe", "partial", "full", "lora", "gradual"]


def build_compare_pipeline(
    settings: Settings, image: str | None = None, name: str = COMPARE_PIPELINE_NAME
) -> Any:
    cluster = settings.cluster
    img = image or cluster.image or DEFAULT_IMAGE
    c = stage_components(img)
    cc = compare_components(img)
    default_config = settings.to_json()

    @dsl.pipeline(
        name=name,
        description="Every fine-tuning strategy against the transfer-learning baseline, one task per "
        "strategy, scored on the same test split; ends in an HTML/Markdown report.",
        pipeline_root=cluster.pipeline_root,
    )
    def compare_pipeline(
        data_uri: str,
        strategies: list = DEFAULT_STRATEGIES,
        config_json: str = default_config,
        parent_run_id: str = "",
    ) -> dsl.Artifact:
        ingest = c.ingest(
            data_uri=data_uri,
            config_json=config_json,
            parent_run_id=parent_run_id,
            force=True,
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            pipeline_name=name,
            pipeline_version="",
        )
        apply_cluster_settings(ingest, "ingest", cluster).set_display_name("ingest")
        run_id = ingest.outputs["parent_run_id"]
        fp = ingest.outputs["fingerprint"]
        baseline = c.baseline(
            snapshot=ingest.outputs["snapshot"],
            config_json=config_json,
            parent_run_id=run_id,
            fingerprint=fp,
            config_hash=ingest.outputs["config_hash"],
        )
        apply_cluster_settings(baseline, "baseline", cluster).set_display_name("baseline (transfer learning)")
        with dsl.ParallelFor(items=strategies, name="strategies") as strategy:
            task = cc.compare_strategy(
                snapshot=ingest.outputs["snapshot"],
                baseline=baseline.outputs["result"],
                strategy=strategy,
                config_json=config_json,
                parent_run_id=run_id,
                fingerprint=fp,
            )
            apply_cluster_settings(task, "finetune", cluster).set_display_name("strategy")
        report = cc.compare_report(
            snapshot=ingest.outputs["snapshot"],
            baseline=baseline.outputs["result"],
            outcomes=dsl.Collected(task.outputs["outcome"]),
            data_uri=data_uri,
            config_json=config_json,
            parent_run_id=run_id,
        )
        apply_cluster_settings(report, "evaluate", cluster).set_display_name("compare report")
        return report.outputs["report"]

    return compare_pipeline


def compile_compare_pipeline(settings: Settings, output: str | Path, image: str | None = None) -> Path:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_compare_pipeline(settings, image), str(out))
    return out
