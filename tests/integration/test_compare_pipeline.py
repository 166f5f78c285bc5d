"""The cluster form of ``adaptflow compare``: the compiled ParallelFor fan-out, run through kfp.local.

On Kubeflow every strategy is its own (GPU) task and ``dsl.Collected`` gathers their outcomes
into the report task. kfp.local executes the same IR, so this runs the very DAG a cluster gets
(with ``kfp_local_run``'s fix for kfp.local's loop-input bug, which the IR does not have).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pytest
from adaptflow.pipelines.compare import build_compare_pipeline
from adaptflow.pipelines.kfp_local_compat import kfp_local_fixes
from adaptflow.pipelines.local import kfp_local_run, run_compare_local

from adaptflow.compare import CompareResult
from adaptflow.config import Settings, load_settings


def test_compare_pipeline_fans_out_per_strategy_and_collects_one_report(
    tiny_settings: Settings, tiny_assets: Any, tmp_path: Path
) -> None:
    settings = tiny_settings
    # kfp_local_run also keeps builtins.print: kfp.local's threaded loop iterations can leave theirs
    with kfp_local_run(tmp_path / "root"):
        task = build_compare_pipeline(settings)(
            data_uri=str(tiny_assets.target_shifted),
            strategies=["linear_probe", "partial"],
            config_json=settings.to_json(),
        )
    result = CompareResult.load(task.output.path)
    assert result.outcomes[0].strategy == "baseline"
    assert sorted(o.strategy for o in result.outcomes[1:]) == ["linear_probe", "partial"]
    # every row scored on the same test split
    assert all(sum(map(sum, o.score.confusion_matrix)) == result.test_size for o in result.outcomes)
    assert [r.name for r in result.references] == ["reference-logreg-pixels", "reference-majority"]
    assert all(r.n == result.test_size for r in result.references)
    partial = next(o for o in result.outcomes if o.strategy == "partial")
    assert partial.p_value_vs_baseline is not None and 0 < partial.trainable_params < partial.total_params
    assert result.report_html is not None
    assert Path(result.report_html).read_text().count('<img src="data:image/png;base64,') >= 3

    # one parent run, a nested run per strategy task, the report logged on the parent
    client = mlflow.MlflowClient(result.tracking_uri)
    assert result.run_id is not None
    parent = client.get_run(result.run_id)
    assert parent.data.tags["adaptflow.compare.best"] == result.best
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    names = {r.info.run_name for r in children}
    assert {"compare-linear_probe", "compare-partial"} <= names, names
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "report")}
    assert "report/compare.json" in artifacts and any(p.endswith(".html") for p in artifacts), artifacts


# slow (make test-all): a second compare DAG run; run_compare_local runs in CI in test_report_browser.py
@pytest.mark.slow
def test_adaptflow_compare_runs_the_dag_locally_and_copies_its_report_to_out(
    tiny_assets: Any, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    settings = load_settings(
        overrides=[*tiny_assets.overrides(tmp_path / "work"), "finetune.epochs=1", "baseline.epochs=10"]
    )
    # scratch before linear_probe: the table keeps the strategy list's order, not the request's
    result = run_compare_local(
        settings, str(tiny_assets.target), ["scratch", "linear_probe"], tmp_path / "out"
    )
    assert [o.strategy for o in result.outcomes] == ["baseline", "linear_probe", "scratch"]
    assert len({o.score.n for o in result.outcomes}) == 1 and result.test_size == result.outcomes[0].score.n
    scratch = result.outcome("scratch")
    assert scratch.trainable_params == scratch.total_params and scratch.p_value_vs_baseline is not None
    assert result.outcome("linear_probe").trainable_params == result.outcome("baseline").trainable_params
    assert CompareResult.load(tmp_path / "out") == result
    assert result.report_html == str(tmp_path / "out" / "report.html")  # --out is where the report lands
    assert Path(result.report_html).read_text().count('<img src="data:image/png;base64,') >= 3
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.run_id)
    assert parent.info.run_name == "compare" and parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    rows = {r.info.run_name: r for r in children if r.info.run_name.startswith("compare-")}
    assert sorted(rows) == ["compare-baseline", "compare-linear_probe", "compare-scratch"]
    assert all("test_accuracy" in r.data.metrics for r in rows.values())
    assert {"ingest", "baseline"} <= {r.info.run_name for r in children}  # the DAG's stages, nested
    assert result.outcome("baseline").run_id == rows["compare-baseline"].info.run_id
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "report")}
    assert {"report/report.html", "report/report.md"} <= artifacts
    # the test split's own verdict travels with the result and the run, beside the margin rule's pick
    assert result.supported_best in {o.strategy for o in result.outcomes} and result.supported_best_reason
    assert parent.data.tags["adaptflow.compare.supported_best"] == result.supported_best


def test_loop_iterations_keep_upstream_task_outputs() -> None:
    """kfp.local's loop-input bug is patched: the item replaces the loop variable, nothing else."""
    from kfp.local.orchestrator import task_spec_utils

    from adaptflow.config import load_settings

    loop = build_compare_pipeline(load_settings()).pipeline_spec.root.dag.tasks["for-loop-1"]
    assert loop.inputs.parameters["pipelinechannel--ingest-parent_run_id"].HasField("task_output_parameter")
    with kfp_local_fixes():
        iteration = task_spec_utils.create_parameter_loop_iteration_task_spec(loop, "partial", "for-loop-1")
    kept = iteration.inputs.parameters["pipelinechannel--ingest-parent_run_id"]
    assert kept.task_output_parameter.producer_task == "ingest"
    assert kept.task_output_parameter.output_parameter_key == "parent_run_id"
    item = iteration.inputs.parameters[loop.parameter_iterator.item_input]
    assert item.runtime_value.constant.string_value == "partial"
