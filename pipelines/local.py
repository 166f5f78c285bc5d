"""Running the DAG on one machine through ``kfp.local`` (SubprocessRunner, no venv, no pip)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from adaptflow.config import Settings
from adaptflow.errors import AdaptflowError
from adaptflow.steps import SUMMARY_FILE
from adaptflow.tracking import finish_pipeline_run, start_pipeline_run

log = logging.getLogger(__name__)


def patch_kfp_local_oneof_artifacts() -> None:
    """kfp 2.17's local orchestrator resolves ``dsl.OneOf`` for parameters but not for artifacts.

    This mirrors its parameter logic for artifact selectors: take the one branch that produced
    an output. It only touches the local orchestrator; compiled IR and clusters are unaffected.
    """
    from kfp.local.orchestrator import orchestrator_utils as ou

    if getattr(ou.OrchestratorUtils, "_adaptflow_oneof_patch", False):
        return

    def get_dag_output_artifacts(cls: Any, dag_outputs_spec: Any, io_store: Any) -> dict[str, Any]:
        outputs: dict[str, Any] = {}
        for key, spec in dag_outputs_spec.artifacts.items():
            found = []
            for selector in spec.artifact_selectors:
                try:
                    found.append(
                        io_store.get_task_output(selector.producer_subtask, selector.output_artifact_key)
                    )
                except (KeyError, ValueError):
                    continue  # that branch did not run
            if len(found) != 1:
                raise ValueError(
                    f"dsl.OneOf output {key!r}: expected one produced artifact, got {len(found)}"
                )
            outputs[key] = found[0]
        return outputs

    ou.OrchestratorUtils.get_dag_output_artifacts = classmethod(get_dag_output_artifacts)
    ou.OrchestratorUtils._adaptflow_oneof_patch = True


def patch_kfp_local_loop_task_outputs() -> None:
    """kfp 2.17's local ParallelFor replaces *every* upstream task-output input of a loop with the item.

    ``create_parameter_loop_iteration_task_spec`` turns each ``task_output_parameter`` input of the
    loop task into the loop item, so a loop body that also takes, say, ``ingest``'s run id gets the
    strategy name instead. The compiled IR is right (a cluster resolves it properly); this restores
    those inputs after kfp.local builds each iteration, except the list being iterated over.
    """
    from kfp.local.orchestrator import task_spec_utils as tsu

    if getattr(tsu, "_adaptflow_loop_patch", False):
        return
    build_iteration = tsu.create_parameter_loop_iteration_task_spec

    def create_parameter_loop_iteration_task_spec(
        original_task_spec: Any, loop_item: Any, loop_task_name: str
    ) -> Any:
        iteration = build_iteration(original_task_spec, loop_item, loop_task_name)
        iterated = original_task_spec.parameter_iterator.items.input_parameter
        for name, spec in original_task_spec.inputs.parameters.items():
            if spec.HasField("task_output_parameter") and name != iterated:
                iteration.inputs.parameters[name].CopyFrom(spec)
        return iteration

    tsu.create_parameter_loop_iteration_task_spec = create_parameter_loop_iteration_task_spec
    tsu._adaptflow_loop_patch = True


def init_kfp_local(pipeline_root: Path) -> None:
    """kfp.local with adaptflow's settings: subprocesses in this environment, the two fixes above."""
    from kfp import local

    patch_kfp_local_oneof_artifacts()
    patch_kfp_local_loop_task_outputs()
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True
    )


class PipelineFailed(AdaptflowError):
    exit_code = 1


def run_local(settings: Settings, data_uri: str, force: bool = False) -> dict[str, Any]:
    """Runs the compiled DAG locally and returns the run summary."""
    from adaptflow.pipelines.pipeline import build_pipeline

    from adaptflow.tracking import lineage_tags

    workdir = Path(settings.workdir).resolve()
    attempt = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    root = workdir / "kfp-local"
    error_file = workdir / "runs" / attempt / "error.json"
    error_file.parent.mkdir(parents=True, exist_ok=True)
    os.environ["ADAPTFLOW_ERROR_FILE"] = str(error_file)  # components inherit it under kfp.local
    ctx = start_pipeline_run(settings, f"adaptflow {attempt}", {"adaptflow.data_uri": data_uri})
    init_kfp_local(root)
    pipeline = build_pipeline(settings)
    started = time.perf_counter()
    try:
        # kfp.local prints task logs on stdout; keep stdout for the summary (--json).
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task = pipeline(
                data_uri=data_uri,
                config_json=settings.to_json(),
                parent_run_id=ctx.parent_run_id,
                force=force,
                pipeline_version="local",
            )
    except Exception as error:
        finish_pipeline_run(ctx, "FAILED")
        if error_file.exists():
            info = json.loads(error_file.read_text())
            raise PipelineFailed(
                f"stage {info['stage']} failed: {info['message']}", hint=info.get("hint")
            ) from None
        raise PipelineFailed(f"pipeline failed: {error}", hint="the stage's log is printed above") from None
    summary: dict[str, Any] = json.loads((Path(task.output.path) / SUMMARY_FILE).read_text())
    lineage = lineage_tags(ctx.tracking_uri, ctx.parent_run_id)
    summary["kfp"] = {
        "run_id": lineage.get("kfp.run_id"),
        "pipeline_root": str(root),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    return summary
